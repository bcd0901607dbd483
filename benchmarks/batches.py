"""What a batch costs the drain: the same no-op tasks drained with and without a batch.

On a private Redis server (a free port, no persistence; ``--broker rabbitmq``: a private
RabbitMQ node, with that Redis as its state store), in rounds. Each round:

1. sends N no-op messages to one queue ("plain") and N to another as the members of one
   batch with an ``on_complete`` ("batch"), with ``send_many`` (not timed);
2. drains them in turns, ``--segments`` turns of each (N / segments tasks a turn, in the
   order plain, batch, batch, plain, plain, batch...): a Dramatiq worker started in this
   process for the turn's queue (``--threads`` threads), timed from its first task to the
   turn's last, and stopped. The machine's speed drifts over minutes on a shared host;
   turns of a second or two, alternated, see the same drift (whole drains of 100,000 one
   after the other scattered by 15%, more than the cost measured);
3. checks that the batch is complete with N succeeded and that ``on_complete`` ran once.

Per round and mode: tasks / drain time (msgs/s) and the CPU time this process spent in
the turns per task (us/msg: it includes the Redis client's work, not Redis's own).
Medians over the rounds are printed as a Markdown table with the batch's ratio to plain.
The issue's bar: a 100,000-member batch costs at most 5% of the drain rate. Numbers in
``docs/batches.md``.

    python benchmarks/batches.py                         # 100,000 tasks each, 10 turns, 3 rounds
    python benchmarks/batches.py --count 20000 --rounds 1
    python benchmarks/batches.py --broker rabbitmq       # RabbitMQ, batches in a private Redis
    python benchmarks/batches.py --broker rabbitmq --prefetch 512   # room for ends being written
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import dramatiq  # noqa: E402
from drain_rounds import KEYS, print_table, private_rabbitmq, private_redis  # noqa: E402

import dramaturg  # noqa: E402


def machine_cpu() -> tuple[float, float]:
    """The machine's busy and idle CPU seconds so far, all cores (``/proc/stat``; 0, 0 elsewhere)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:8]]
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / tick, idle / tick


def run_round(
    url: str, state_url: str | None, count: int, threads: int, segments: int, prefetch: int | None = None
) -> dict[str, dict[str, float]]:
    """One round: ``count`` tasks of each mode drained in alternating turns; each mode's rate and CPU per task."""
    settings = dramaturg.Settings(
        broker={"url": url, "namespace": f"bench-{uuid.uuid4().hex[:8]}", "prefetch": prefetch},
        state={"url": state_url} if state_url else {},
        worker={"threads": threads},
    )
    broker = dramaturg.bootstrap(settings)
    lock = threading.Lock()
    done = threading.Event()
    ended = {"plain": 0, "batch": 0}
    turn: dict[str, Any] = {"mode": "", "until": 0, "first": 0.0, "last": 0.0}
    completes: list[dict[str, Any]] = []

    def noop_of(mode: str) -> Any:
        @dramaturg.actor(queue_name=f"bench-{mode}", actor_name=f"noop_{mode}")
        def noop(n: int) -> None:
            with lock:
                ended[mode] += 1
                if mode == turn["mode"]:
                    now = time.perf_counter()
                    turn["first"] = turn["first"] or now
                    if ended[mode] == turn["until"]:
                        turn["last"] = now
                        done.set()

        return noop

    noops = {mode: noop_of(mode) for mode in ended}

    @dramaturg.actor(queue_name="bench-done", actor_name="report")
    def report(summary: dict[str, Any]) -> None:
        completes.append(summary)

    noops["plain"].send_many(range(count))
    batch = dramaturg.batch("bench", on_complete=report.message())
    with batch:
        noops["batch"].send_many(range(count))

    spent = {mode: {"tasks": 0.0, "seconds": 0.0, "cpu": 0.0, "busy": 0.0, "idle": 0.0} for mode in ended}
    order = [("plain", "batch")[(i + i // 2) % 2] for i in range(2 * segments)]  # plain, batch, batch, plain...
    for i, mode in enumerate(order):
        left = order[i:].count(mode)
        before = ended[mode]
        turn.update(mode=mode, until=before + (count - before) // left, first=0.0, last=0.0)
        done.clear()
        worker = dramatiq.Worker(broker, queues={f"bench-{mode}"}, worker_threads=threads, worker_timeout=100)
        cpu0, (busy0, idle0) = time.process_time(), machine_cpu()
        worker.start()
        if not done.wait(timeout=max(120, count / segments / 100)):
            raise SystemExit(f"{mode}: only {ended[mode]} of {turn['until']} ran")
        cpu, (busy, idle) = time.process_time() - cpu0, machine_cpu()
        worker.stop()
        # Each Worker adds its own middleware to the broker and leaves it there.
        broker.middleware[:] = [m for m in broker.middleware if type(m).__name__ != "_WorkerMiddleware"]
        spent[mode]["tasks"] += turn["until"] - before - 1  # timed from the first task's end
        spent[mode]["seconds"] += turn["last"] - turn["first"]
        spent[mode]["cpu"] += cpu * (turn["until"] - before - 1) / (turn["until"] - before)
        spent[mode]["busy"] += busy - busy0
        spent[mode]["idle"] += idle - idle0
    if ended["plain"] < count or ended["batch"] < count:
        raise SystemExit(f"not every task ran: {ended}")
    worker = dramatiq.Worker(broker, queues={"bench-done"}, worker_threads=1, worker_timeout=100)
    worker.start()  # the batch's on_complete
    deadline = time.monotonic() + 30
    while not completes and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop()
    status = batch.status()
    assert status.succeeded == count and status.state == "complete", status
    assert len(completes) == 1, completes
    dramaturg.shutdown()
    return {
        mode: {
            "rate": s["tasks"] / s["seconds"],
            "us_per_msg": s["cpu"] / s["tasks"] * 1e6,
            "machine_us_per_msg": s["busy"] / s["tasks"] * 1e6,
            "idle": s["idle"] / max(s["busy"] + s["idle"], 1e-9),
        }
        for mode, s in spent.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="tasks per drain (default: 100000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default: 3)")
    parser.add_argument("--segments", type=int, default=10, help="turns of each mode in a round (default: 10)")
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
        results: dict[str, list[dict[str, float]]] = {"plain": [], "batch": []}
        for round_ in range(args.rounds):
            result = run_round(url, state_url, args.count, args.threads, args.segments, args.prefetch)
            for mode, measured in result.items():
                results[mode].append(measured)
            print(
                f"round {round_ + 1}: plain {result['plain']['rate']:,.0f} msgs/s, "
                f"{result['plain']['us_per_msg']:.1f} us/msg; batch {result['batch']['rate']:,.0f} msgs/s, "
                f"{result['batch']['us_per_msg']:.1f} us/msg; machine CPU (all processes) "
                f"{result['plain']['machine_us_per_msg']:.0f} and {result['batch']['machine_us_per_msg']:.0f} us/msg, "
                f"idle {result['plain']['idle']:.0%} and {result['batch']['idle']:.0%}; "
                f"drain {result['batch']['rate'] / result['plain']['rate']:.3f} of plain",
                flush=True,
            )
    medians = {mode: {k: statistics.median(r[k] for r in rs) for k in KEYS} for mode, rs in results.items()}
    name = "RabbitMQ (state in Redis)" if args.broker == "rabbitmq" else "Redis"
    print_table(medians, "plain", count=args.count, threads=args.threads, rounds=args.rounds, broker=name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
