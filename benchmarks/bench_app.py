"""The benchmark's application, set up either on bare Dramatiq or on dramaturg.

Imported by ``dramatiq bench_app`` in the worker processes, and run as a script to
enqueue: ``python bench_app.py enqueue N``. The system and broker come from the
environment (set by throughput.py):

- ``BENCH_SYSTEM``: ``dramatiq`` (Dramatiq's own broker and default middleware) or
  ``dramaturg`` (``dramaturg.bootstrap`` with its defaults);
- ``BENCH_URL``: the broker URL; ``BENCH_CONFIRM``: "1" for publisher confirms on bare
  Dramatiq's RabbitMQ broker (dramaturg always confirms); ``BENCH_MAX_PRIORITY``: its
  queues' ``x-max-priority``; ``BENCH_SETTINGS``: JSON overrides of dramaturg's settings;
- ``BENCH_COUNT_DIR``: where each worker process reports how many messages it processed;
- ``BENCH_DROP``: comma-separated middleware class names taken out of the stack, to see
  what one costs (``BENCH_DROP=CancelWatch``; for experiments, not a configuration);
- ``BENCH_QUEUE``: the queue (default ``bench``; peers.py uses its own);
- ``BENCH_BATCH_FLUSH_S``: how often batch news is written, and ``BENCH_COUNT_EVERY_S``
  how often the count is (``batch_instructions.py`` stretches both as valgrind slows the
  worker, so that work done on a timer weighs no more per task than at full speed).

Both systems get the same counting middleware, so its cost is the same on both sides.
benchmarks/peers.py uses the ``peer_*`` actors instead, whose bodies are
``peer_apps.work``'s functions (they count themselves, as on Celery, RQ and Huey).
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dramatiq
from peer_apps import work

SYSTEM = os.environ.get("BENCH_SYSTEM", "dramatiq")
URL = os.environ["BENCH_URL"]
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
NAMESPACE = f"bench-{SYSTEM}"
COUNT_EVERY_S = float(os.environ.get("BENCH_COUNT_EVERY_S", "0.01"))


class Counter(dramatiq.Middleware):
    """Counts processed messages; a thread writes the count to a file every 10 ms
    (``BENCH_COUNT_EVERY_S``).

    Messages sent with a negative number are latency probes: their end-to-end latency
    (sent -> processed) is recorded too.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processed = itertools.count(1)
        self.done = 0
        self.latencies_ms: list[float] = []

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None, exception: Any = None) -> None:
        self.done = next(self.processed)
        if message.args and isinstance(message.args[0], int) and message.args[0] < 0:
            self.latencies_ms.append(time.time() * 1000 - message.message_timestamp)

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        threading.Thread(target=self._report, daemon=True).start()

    def _report(self) -> None:
        path = self.directory / f"{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        while True:
            tmp.write_text(json.dumps({"processed": self.done, "latencies_ms": self.latencies_ms}))
            os.replace(tmp, path)
            time.sleep(COUNT_EVERY_S)


def _setup() -> tuple[Any, Any]:
    """The broker, and the decorator that declares an actor on it."""
    if SYSTEM == "dramaturg":
        import dramaturg

        overrides = json.loads(os.environ.get("BENCH_SETTINGS", "{}"))
        broker = dramaturg.bootstrap(
            dramaturg.Settings(broker={"url": URL, "namespace": NAMESPACE, **overrides.pop("broker", {})}, **overrides)
        )
        return broker, lambda name: dramaturg.actor(queue_name=QUEUE, actor_name=name)

    if URL.startswith("amqp"):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        max_priority = int(os.environ.get("BENCH_MAX_PRIORITY", "0")) or None
        broker = RabbitmqBroker(
            url=URL, confirm_delivery=os.environ.get("BENCH_CONFIRM") == "1", max_priority=max_priority
        )
    else:
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(url=URL, namespace=NAMESPACE)
    dramatiq.set_broker(broker)
    return broker, lambda name: dramatiq.actor(queue_name=QUEUE, actor_name=name, broker=broker)


broker, declare = _setup()


@declare("noop")
def noop(number: int) -> None:
    pass


# benchmarks/peers.py: the same work as on Celery, RQ and Huey (peer_apps/work.py).
@declare("peer_noop")
def peer_noop(number: int) -> None:
    work.noop(number)


@declare("peer_sleep")
def peer_sleep(number: int) -> None:
    work.sleep_10ms(number)


@declare("peer_import_user")
def peer_import_user(row: dict[str, Any]) -> None:
    work.import_user(row)


if os.environ.get("BENCH_BATCH_FLUSH_S"):
    # By its module's name: the package exports a function named ``batches``.
    importlib.import_module("dramaturg.batches.writer").FLUSH_INTERVAL_S = float(os.environ["BENCH_BATCH_FLUSH_S"])

for _name in filter(None, os.environ.get("BENCH_DROP", "").split(",")):
    broker.middleware[:] = [m for m in broker.middleware if type(m).__name__ != _name]

if os.environ.get("BENCH_COUNT_DIR"):
    broker.add_middleware(Counter(Path(os.environ["BENCH_COUNT_DIR"])))


def enqueue(count: int) -> float:
    """Send ``count`` messages one by one; return the seconds it took."""
    started = time.perf_counter()
    for number in range(count):
        noop.send(number)
    return time.perf_counter() - started


if __name__ == "__main__":
    if sys.argv[1] == "enqueue":
        print(json.dumps({"seconds": enqueue(int(sys.argv[2]))}))
    elif sys.argv[1] == "probe":
        # Latency probes: one message every `interval` seconds, negative numbers.
        count, interval = int(sys.argv[2]), float(sys.argv[3])
        for number in range(1, count + 1):
            noop.send(-number)
            time.sleep(interval)
    broker.close()
