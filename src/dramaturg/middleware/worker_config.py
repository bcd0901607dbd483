"""Applies the ``[worker]`` and ``broker.prefetch`` settings Dramatiq's CLI cannot carry.

Prefetch: how many messages a worker process holds beyond the ones running. Dramatiq
prefetches two per worker thread, and a worker holding its prefetched messages sleeps
instead of fetching: on a 2-core machine that capped draining at about 4,200 no-op
messages/s on Redis with the CPU 38% idle. A larger prefetch keeps the threads fed. The
cost: prefetched messages wait in this process's memory (another worker cannot take
them), and on RabbitMQ they age toward the server's ``consumer_timeout`` while they
wait. Set ``broker.prefetch`` lower for long tasks.

Queues: ``worker.queues`` limits which queues a worker consumes, also when it was
started as ``dramatiq dramaturg.worker`` without ``-Q`` (``-Q`` wins when given).

Unknown actors: ``worker.unknown_actor_grace`` is handed to the broker's consumers (see
:mod:`dramaturg.unknown_actors`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from dramatiq import Broker, Middleware

from ..unknown_actors import DEFAULT_GRACE_MS

__all__ = ["DEFAULT_PREFETCH", "WorkerConfig"]

#: Tuned defaults per broker type, chosen from benchmarks/throughput.py on 2 cores.
DEFAULT_PREFETCH: dict[str, int] = {
    "redis": 64,
    "embedded": 64,
    "rabbitmq": 128,
    "stub": 16,
}


class WorkerConfig(Middleware):
    """Sets the worker's queue prefetch and queue selection before its consumers start.

    Prefetch resolves as ``broker.prefetch`` in the settings, else Dramatiq's own
    ``dramatiq_queue_prefetch`` environment variable, else the tuned default for the
    broker type (:data:`DEFAULT_PREFETCH`).
    """

    def __init__(
        self,
        broker_type: str,
        prefetch: int | None = None,
        queues: Sequence[str] = (),
        unknown_actor_grace_ms: int = DEFAULT_GRACE_MS,
    ) -> None:
        self.prefetch = self.resolve_prefetch(broker_type, prefetch)
        self.queues = set(queues)
        self.unknown_actor_grace_ms = unknown_actor_grace_ms

    @staticmethod
    def resolve_prefetch(broker_type: str, prefetch: int | None) -> int:
        if prefetch is not None:
            return prefetch
        from_env = os.environ.get("dramatiq_queue_prefetch", "")  # noqa: SIM112 (Dramatiq's name)
        if from_env.isdigit() and int(from_env) > 0:
            return int(from_env)
        return DEFAULT_PREFETCH.get(broker_type, 16)

    def before_worker_boot(self, broker: Broker, worker: Any) -> None:
        worker.queue_prefetch = self.prefetch
        broker.unknown_actor_grace_ms = self.unknown_actor_grace_ms  # type: ignore[attr-defined]
        if self.queues and not worker.consumer_whitelist:
            worker.consumer_whitelist = set(self.queues)
