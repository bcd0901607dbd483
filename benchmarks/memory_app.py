"""The application of ``benchmarks/worker_memory.py``: one no-op actor that counts itself.

Set up on bare Dramatiq (``MEMORY_SYSTEM=dramatiq``: this module is the broker module,
``dramatiq memory_app``) or on dramaturg (``MEMORY_SYSTEM=dramaturg``: the actor module
named in ``worker.modules``, imported by ``dramatiq dramaturg.worker`` or ``dramaturg
worker``, which read the configuration as users' workers do). ``MEMORY_URL`` is the
broker; ``MEMORY_COUNT_DIR`` where each process writes how many no-ops it ran (every
500th, and the count is a multiple of 500).
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

SYSTEM = os.environ.get("MEMORY_SYSTEM", "dramatiq")
QUEUE = f"memory_{SYSTEM}"
COUNT_DIR = os.environ.get("MEMORY_COUNT_DIR")
_done = itertools.count(1)


def _counted() -> None:
    done = next(_done)
    if COUNT_DIR and done % 500 == 0:
        Path(COUNT_DIR, f"{os.getpid()}.count").write_text(str(done))


if SYSTEM == "dramaturg":
    import dramaturg

    @dramaturg.actor(queue_name=QUEUE)
    def noop(number: int) -> None:
        _counted()

else:
    import dramatiq

    url = os.environ["MEMORY_URL"]
    if url.startswith("amqp"):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker: dramatiq.Broker = RabbitmqBroker(url=url)
    else:
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(url=url, namespace="memory-dramatiq")
    dramatiq.set_broker(broker)

    @dramatiq.actor(queue_name=QUEUE)
    def noop(number: int) -> None:  # type: ignore[no-redef]
        _counted()


if __name__ == "__main__":  # python memory_app.py N: send N no-ops
    for number in range(int(sys.argv[1])):
        noop.send(number)
