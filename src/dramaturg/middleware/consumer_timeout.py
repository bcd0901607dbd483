"""RabbitMQ's ``consumer_timeout``, which no touch() can extend.

RabbitMQ closes a channel whose oldest unacknowledged delivery is older than the
server's ``consumer_timeout`` (30 minutes by default; one global setting in 3.10), and
gives every delivery on that channel back to the queue, flagged as redelivered. On a
Dramatiq worker a delivery stays unacknowledged while:

- its task runs (up to its ttr, longer with touch());
- it waits in the worker's prefetch for a free thread (``broker.prefetch``);
- it is a delayed message (a retry's backoff, ``send_with_options(delay=...)``):
  Dramatiq's worker holds those until they are due.

So a task running, or a message waiting, longer than the timeout costs a closed channel
and a second run. dramaturg cannot change the server's setting; it is told it with
``broker.consumer_timeout`` and:

- warns at worker boot for every actor whose ttr or maximum retry backoff exceeds it,
  and at send time for a delay that does;
- when the channel is closed anyway, logs an ERROR naming the timeout, and each task
  that runs again is logged as delivered again; a task that finishes after its channel
  was closed is not acknowledged on the new one (Dramatiq would acknowledge whatever
  delivery has the same number there), and is logged.

Prefetch guidance: a prefetched message waits about ``prefetch / threads`` task
durations before it starts; for tasks that take minutes, set ``broker.prefetch`` to
the thread count or less.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq

from ..durations import format_ms

__all__ = ["ConsumerTimeoutCheck", "fmt_ms"]

logger = logging.getLogger("dramaturg.rabbitmq")

#: The former name of :func:`dramaturg.durations.format_ms`, the one duration formatter.
fmt_ms = format_ms


class ConsumerTimeoutCheck(dramatiq.Middleware):
    """Warns at worker boot about actors that can outlast ``consumer_timeout`` (RabbitMQ)."""

    def __init__(self, consumer_timeout_ms: int) -> None:
        self.consumer_timeout_ms = consumer_timeout_ms

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        for line in self.problems(broker):
            logger.warning("%s", line)

    def problems(self, broker: dramatiq.Broker) -> list[str]:
        """One line per actor and limit that exceeds the server's consumer_timeout."""
        from .outcomes import Outcomes
        from .ttr import TimeToRun

        limit = self.consumer_timeout_ms
        ttr = next((m for m in broker.middleware if isinstance(m, TimeToRun)), None)
        outcomes = next((m for m in broker.middleware if isinstance(m, Outcomes)), None)
        lines = []
        for name in sorted(broker.actors):
            actor = broker.actors[name]
            if ttr is not None:
                actor_ttr = actor.options.get("ttr")
                if actor_ttr is None:
                    actor_ttr = ttr.queues.get(actor.queue_name, ttr.default_ms)
                if actor_ttr > limit:
                    lines.append(
                        f"actor {name!r}: its ttr ({format_ms(actor_ttr)}) exceeds RabbitMQ's consumer_timeout"
                        f" ({format_ms(limit)}, broker.consumer_timeout): RabbitMQ closes the channel of a task"
                        " running longer than that and the task runs again; raise consumer_timeout on the server"
                        " (and broker.consumer_timeout to match) or lower the ttr"
                    )
            if outcomes is not None:
                backoff = int(actor.options.get("max_backoff") or outcomes.max_backoff)
                if backoff > limit:
                    lines.append(
                        f"actor {name!r}: its retries wait up to {format_ms(backoff)} (max_backoff), more than"
                        f" RabbitMQ's consumer_timeout ({format_ms(limit)}, broker.consumer_timeout): a worker holds"
                        " a delayed message unacknowledged until it is due, so RabbitMQ would close its channel;"
                        " lower max_backoff or raise consumer_timeout on the server"
                    )
        return lines
