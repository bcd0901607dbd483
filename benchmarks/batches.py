"""What a batch costs the drain: the same no-op tasks drained with and without a batch.

On a private Redis server (a free port, no persistence; ``--broker rabbitmq``: a private
RabbitMQ node, with that Redis as its state store), in interleaved rounds, for each
of "plain" (the tasks alone) and "batch" (the same tasks as the members of one batch,
with an ``on_complete``):

1. send N no-op messages with ``send_many`` (inside ``with dramaturg.batch(...)`` for
   "batch"; not timed into the drain);
2. start a Dramatiq worker in this process (``--threads`` threads) and time the drain
   from its start to the end of the last task (msgs/s), and the CPU time this process
   spent meanwhile (us/msg: steadier than the rate on a machine whose cores are shared;
   it includes the Redis client's work but not Redis's own);
3. for "batch", check the batch is complete with N succeeded and ``on_complete`` ran once.

Medians over the rounds are printed as a Markdown table with the batch's ratio to plain.
The issue's bar: a batch costs at most 5% of the drain rate. On Redis it is met (each
member's end goes with its acknowledgement); numbers, and RabbitMQ's, in ``docs/batches.md``.

    python benchmarks/batches.py                         # 100,000 tasks, 3 rounds
    python benchmarks/batches.py --count 20000 --rounds 1
    python benchmarks/batches.py --broker rabbitmq       # RabbitMQ, batches in a private Redis
    python benchmarks/batches.py --broker rabbitmq --prefetch 512   # room for ends being written
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import dramatiq  # noqa: E402
from drain_rounds import interleaved, print_table, private_rabbitmq, private_redis  # noqa: E402

import dramaturg  # noqa: E402


def run_once(
    mode: str, url: str, state_url: str | None, count: int, threads: int, prefetch: int | None = None
) -> dict[str, float]:
    """One drain of ``count`` no-op tasks; its rate and CPU time per task."""
    settings = dramaturg.Settings(
        broker={"url": url, "namespace": f"bench-{uuid.uuid4().hex[:8]}", "prefetch": prefetch},
        state={"url": state_url} if state_url else {},
        worker={"threads": threads},
    )
    broker = dramaturg.bootstrap(settings)
    done = threading.Event()
    ended = [0]
    lock = threading.Lock()
    completes: list[dict[str, Any]] = []

    @dramaturg.actor(queue_name="bench", actor_name="noop")
    def noop(n: int) -> None:
        with lock:
            ended[0] += 1
            if ended[0] == count:
                done.set()

    @dramaturg.actor(queue_name="bench-done", actor_name="report")
    def report(summary: dict[str, Any]) -> None:
        completes.append(summary)

    batch = None
    if mode == "batch":
        batch = dramaturg.batch("bench", on_complete=report.message())
        with batch:
            noop.send_many(range(count))
    else:
        noop.send_many(range(count))

    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    cpu0, t0 = time.process_time(), time.perf_counter()
    worker.start()
    if not done.wait(timeout=max(120, count / 200)):
        raise SystemExit(f"{mode}: only {ended[0]} of {count} ran")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    result = {"rate": count / seconds, "us_per_msg": cpu / count * 1e6}
    if batch is not None:
        deadline = time.monotonic() + 30
        while not completes and time.monotonic() < deadline:
            time.sleep(0.01)
        status = batch.status()
        assert status.succeeded == count and status.state == "complete", status
        assert len(completes) == 1, completes
    worker.stop()
    dramaturg.shutdown()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="tasks per drain (default: 100000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--threads", type=int, default=8, help="worker threads (default: 8)")
    parser.add_argument(
        "--prefetch", type=int, default=None, help="the worker's prefetch (default: dramaturg's for the broker)"
    )
    parser.add_argument(
        "--broker",
        choices=("redis", "rabbitmq"),
        default="redis",
        help="redis (default), or rabbitmq with a private Redis as its state store",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(private_redis("bench-batches-"))
        url, state_url = redis_url, None
        if args.broker == "rabbitmq":
            url, state_url = stack.enter_context(private_rabbitmq("bench-batches-rabbitmq-")), redis_url
        medians = interleaved(
            ("plain", "batch"),
            args.rounds,
            lambda mode: run_once(mode, url, state_url, args.count, args.threads, args.prefetch),
        )
    name = "RabbitMQ (state in Redis)" if args.broker == "rabbitmq" else "Redis"
    print_table(medians, "plain", count=args.count, threads=args.threads, rounds=args.rounds, broker=name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
