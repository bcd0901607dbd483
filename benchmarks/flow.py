"""What a limit costs the drain: the same no-op tasks drained with and without a limit that never denies.

On a private Redis server (a free port, no persistence), in interleaved rounds, for each
of "plain" (no limit), "concurrency" (``concurrency(1_000_000, key="bench")``: one Lua
call to take the slot at the start, its release after) and "rate" (``rate(1_000_000_000,
per="1s", key="bench")``: one Lua call at the start, nothing after):

1. send N no-op messages with ``send_many`` (not timed into the drain);
2. start a Dramatiq worker in this process (``--threads`` threads) and time the drain
   from its start to the end of the last task (msgs/s), and the CPU time this process
   spent meanwhile (us/msg: steadier than the rate on a machine whose cores are shared;
   it includes the Redis client's work but not Redis's own).

Medians over the rounds are printed as a Markdown table with each mode's ratio to plain.
The issue's bar: a limit that never denies costs under 10% of the drain rate.

    python benchmarks/flow.py                         # 20,000 tasks, 3 rounds
    python benchmarks/flow.py --count 5000 --rounds 1
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import dramatiq  # noqa: E402
from drain_rounds import interleaved, print_table, private_redis  # noqa: E402

import dramaturg  # noqa: E402

MODES = ("plain", "concurrency", "rate")


def run_once(mode: str, url: str, count: int, threads: int) -> dict[str, float]:
    """One drain of ``count`` no-op tasks; its rate and CPU time per task."""
    settings = dramaturg.Settings(
        broker={"url": url, "namespace": f"bench-{uuid.uuid4().hex[:8]}"}, worker={"threads": threads}
    )
    broker = dramaturg.bootstrap(settings)
    done = threading.Event()
    ended = [0]
    lock = threading.Lock()
    limits: dict[str, list[Any]] = {
        "plain": [],
        "concurrency": [dramaturg.concurrency(1_000_000, key="bench")],
        "rate": [dramaturg.rate(1_000_000_000, per="1s", key="bench")],
    }

    @dramaturg.actor(queue_name="bench", actor_name=f"noop_{mode}", limits=limits[mode])
    def noop(n: int) -> None:
        with lock:
            ended[0] += 1
            if ended[0] == count:
                done.set()

    noop.send_many(range(count))
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    cpu0, t0 = time.process_time(), time.perf_counter()
    worker.start()
    if not done.wait(timeout=max(120, count / 200)):
        raise SystemExit(f"{mode}: only {ended[0]} of {count} ran")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    worker.stop()
    dramaturg.shutdown()
    return {"rate": count / seconds, "us_per_msg": cpu / count * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="tasks per drain (default: 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--threads", type=int, default=8, help="worker threads (default: 8)")
    args = parser.parse_args()
    with private_redis("bench-flow-") as url:
        medians = interleaved(MODES, args.rounds, lambda mode: run_once(mode, url, args.count, args.threads))
    print_table(medians, "plain", count=args.count, threads=args.threads, rounds=args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
