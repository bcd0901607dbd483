"""What cancelling costs a task that is never cancelled: the same no-op tasks drained with
and without the worker's side of it (:class:`~dramaturg.cancelling.watch.CancelWatch`).

On a private Redis server (a free port, no persistence), in interleaved rounds, for each
of "off" (the stack without ``CancelWatch``) and "on" (the stack as ``bootstrap`` makes
it): send N no-op messages with ``send_many``, start a Dramatiq worker in this process
and time the drain from its start to the end of the last task (msgs/s), and the CPU
time this process spent meanwhile (us/msg, which includes the watcher thread's reads of
the feed). Then, with no broker in the way, the CPU time of the whole stack's
``before_process_message`` and ``after_process_message`` hooks for one task, with and
without it (the drain's numbers move by more than that between rounds on a shared
machine; this one is steadier).

    python benchmarks/cancelling.py                        # 5,000 tasks, 5 rounds
    python benchmarks/cancelling.py --count 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import dramatiq  # noqa: E402
from drain_rounds import interleaved, print_table, private_redis  # noqa: E402
from dramatiq.broker import MessageProxy  # noqa: E402

import dramaturg  # noqa: E402
from dramaturg.cancelling.watch import CancelWatch  # noqa: E402


def run_once(mode: str, url: str, count: int, threads: int) -> dict[str, float]:
    """One drain of ``count`` no-op tasks; its rate and CPU time per task."""
    settings = dramaturg.Settings(
        broker={"url": url, "namespace": f"bench-{uuid.uuid4().hex[:8]}"}, worker={"threads": threads}
    )
    broker = dramaturg.bootstrap(settings)
    if mode == "off":
        broker.middleware[:] = [m for m in broker.middleware if not isinstance(m, CancelWatch)]
    done = threading.Event()
    ended = [0]
    lock = threading.Lock()

    @dramaturg.actor(queue_name="bench", actor_name="noop")
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


def stack_cost(url: str, calls: int = 20_000, rounds: int = 10) -> dict[str, float]:
    """CPU microseconds of the whole middleware stack's before and after hooks for one task
    (no broker, no handler), with and without CancelWatch, interleaved; medians."""
    broker = dramaturg.bootstrap(dramaturg.Settings(broker={"url": url, "namespace": "bench-hooks"}))

    @dramaturg.actor(queue_name="bench", actor_name="noop-hooks")
    def noop(n: int) -> None:
        pass

    full = list(broker.middleware)
    stacks = {"on": full, "off": [m for m in full if not isinstance(m, CancelWatch)]}
    costs: dict[str, list[float]] = {"on": [], "off": []}
    for round_ in range(rounds):
        for mode in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
            broker.middleware[:] = stacks[mode]
            messages = [MessageProxy(dramatiq.Message("bench", "noop-hooks", (n,), {}, {})) for n in range(calls)]
            cpu0 = time.process_time()
            for message in messages:
                broker.emit_before("process_message", message)
                broker.emit_after("process_message", message, result=None)
            costs[mode].append((time.process_time() - cpu0) / calls * 1e6)
    dramaturg.shutdown()
    return {mode: statistics.median(values) for mode, values in costs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5_000, help="tasks per drain (default: 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--threads", type=int, default=8, help="worker threads (default: 8)")
    args = parser.parse_args()
    with private_redis("bench-cancelling-") as url:
        medians = interleaved(("off", "on"), args.rounds, lambda mode: run_once(mode, url, args.count, args.threads))
        stack = stack_cost(url)
    labels = {"off": "without CancelWatch", "on": "with CancelWatch"}
    print_table(medians, "off", count=args.count, threads=args.threads, rounds=args.rounds, labels=labels)
    print()
    print(
        f"The stack's hooks per task (CPU, median of 10): {stack['off']:.2f} us without CancelWatch,"
        f" {stack['on']:.2f} us with it"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
