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

from dramaturg.status.recorder import StatusRecorder  # noqa: E402
from dramaturg.task import start_run  # noqa: E402

SERVER_COMMANDS = ("evalsha", "eval", "set", "get", "hincrby", "pexpire")


class _Broker:
    """What the recorder needs of a broker: the Redis client its store writes to."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client


def server_usec(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(stats[f"cmdstat_{name}"]["usec"]) for name in SERVER_COMMANDS if f"cmdstat_{name}" in stats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000, help="tasks per flush (default: 1000)")
    parser.add_argument("--rounds", type=int, default=12, help="flushes measured (default: 12)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="(default: %(default)s)")
    args = parser.parse_args()

    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    recorder = StatusRecorder(None, 86_400_000, "bench-state")
    broker = _Broker(client)
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
    store.close()
    print(f"{args.count:,} tasks per flush, medians of {args.rounds} flushes")
    print("| hooks us/task | writer us/record | Redis us/record |")
    print("|---:|---:|---:|")
    print(
        f"| {statistics.median(hooks[2:]):.1f} | {statistics.median(writer[2:]):.1f}"
        f" | {statistics.median(server[2:]):.1f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
