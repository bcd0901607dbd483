"""What a task's status costs: the worker's hooks, the state writer, and Redis, per task.

Measured in CPU time, not in a drain rate: on a 2-core machine whose host is shared, the
drain rates of the same configuration scatter by 10-30% between rounds, more than the
few percent the status costs. Three figures, each the median of ``--rounds`` batches of
``--count`` tasks that start and end between two flushes (a worker's common case):

- hooks: :class:`~dramaturg.status.recorder.StatusRecorder`'s before- and after-hook
  for each task, in the worker thread (us of CPU per task);
- writer: the state store's flush of those tasks' events, in its writer thread: the
  records made and sent (us of CPU per record, the network wait excluded);
- Redis: the server's time in the flush's scripts and commands (``INFO commandstats``,
  us per record).

``--with-ack``: as on dramaturg's Redis broker, where a task that succeeded has its
record written by the script that acknowledges its message (``settle.lua``), not by the
writer. The hooks then make that record; the writer only counts; and two more figures
say what carrying the records costs the acknowledgements: the worker thread's CPU
(``ack +us/task``) and Redis's time (``ack Redis +us/task``), each the difference
between acknowledging the same number of messages with their records and without.

Uses Redis db 14 at ``--redis-url`` (default 127.0.0.1:6379), flushing it first.

    python benchmarks/state_writer.py
    python benchmarks/state_writer.py --count 5000 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import redis  # noqa: E402
from dramatiq import Message  # noqa: E402
from dramatiq.broker import MessageProxy  # noqa: E402

from dramaturg.brokers.redis.settling import Settler  # noqa: E402
from dramaturg.status.recorder import StatusRecorder  # noqa: E402
from dramaturg.task import run_of, start_run  # noqa: E402

SERVER_COMMANDS = ("evalsha", "eval", "set", "get", "hincrby", "pexpire")


class _Broker:
    """What the recorder needs of a broker: the Redis client its store writes to (and, with
    ``--with-ack``, the settler that acknowledges messages)."""

    def __init__(self, client: redis.Redis, settler: Settler | None = None) -> None:
        self.client = client
        if settler is not None:
            self.settler = settler


def ack_cost(settler: Settler, client: redis.Redis, messages: list[Any], with_records: bool) -> tuple[float, float]:
    """The worker thread's CPU and Redis's time (us per message) to acknowledge
    ``messages`` (unclaimed ids: settle.lua answers -1 and changes nothing but the records)."""
    before = server_usec(client)
    started = time.thread_time()
    for number, message in enumerate(messages):
        record = run_of(message).state_record if with_records else None  # type: ignore[union-attr]
        settler.settle("a", "default", f"bench-{number}", record)
    cpu = (time.thread_time() - started) / len(messages) * 1e6
    return cpu, (server_usec(client) - before) / len(messages)


def server_usec(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(stats[f"cmdstat_{name}"]["usec"]) for name in SERVER_COMMANDS if f"cmdstat_{name}" in stats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000, help="tasks per flush (default: 1000)")
    parser.add_argument("--rounds", type=int, default=12, help="flushes measured (default: 12)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="(default: %(default)s)")
    parser.add_argument("--with-ack", action="store_true", help="records written with the acknowledgements")
    args = parser.parse_args()

    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    recorder = StatusRecorder(None, 86_400_000, "bench-state")
    settler = Settler(client, "bench-state", "bench-worker") if args.with_ack else None
    broker = _Broker(client, settler)
    ack_cpu, ack_server = [], []
    store = recorder.store(broker)  # type: ignore[arg-type]
    store.flush_interval_s = 3600  # flushed here, by hand
    hooks, writer, server = [], [], []
    for _ in range(args.rounds + 2):  # the first two warm up
        messages = [
            MessageProxy(Message(queue_name="default", actor_name="noop", args=(), kwargs={}, options={}))
            for _ in range(args.count)
        ]
        for message in messages:
            start_run(message)  # made by an earlier middleware of the stack
        started = time.thread_time()
        for message in messages:
            recorder.before_process_message(broker, message)  # type: ignore[arg-type]
            recorder.after_process_message(broker, message)  # type: ignore[arg-type]
        hooks.append((time.thread_time() - started) / args.count * 1e6)
        before = server_usec(client)
        started = time.thread_time()
        store.flush()
        writer.append((time.thread_time() - started) / args.count * 1e6)
        server.append((server_usec(client) - before) / args.count)
        if settler is not None:
            bare_cpu, bare_server = ack_cost(settler, client, messages, with_records=False)
            full_cpu, full_server = ack_cost(settler, client, messages, with_records=True)
            ack_cpu.append(full_cpu - bare_cpu)
            ack_server.append(full_server - bare_server)
    store.close()
    print(f"{args.count:,} tasks per flush, medians of {args.rounds} flushes{', with-ack' if settler else ''}")
    if settler is None:
        print("| hooks us/task | writer us/record | Redis us/record |")
        print("|---:|---:|---:|")
    else:
        print("| hooks us/task | writer us/task | Redis us/task (flush) | ack +us/task | ack Redis +us/task |")
        print("|---:|---:|---:|---:|---:|")
    extra = f" {statistics.median(ack_cpu[2:]):.1f} | {statistics.median(ack_server[2:]):.1f} |" if settler else ""
    print(
        f"| {statistics.median(hooks[2:]):.1f} | {statistics.median(writer[2:]):.1f}"
        f" | {statistics.median(server[2:]):.1f} |{extra}"
    )
    if settler is not None:
        settler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
