"""Queue statistics: the same columns on every broker.

:func:`queue_stats` returns one :class:`QueueStats` per queue: what is ready, delayed,
in flight (taken by a worker, not yet acknowledged), held and dead-lettered, and how many
worker processes consume it; with a counter store, what happened in the last minute.

::

    >>> for row in dramaturg.queue_stats(["imports"]):
    ...     print(row.queue, row.ready, row.in_flight, row.held)
    imports 10 2 1

Each broker reads its own numbers (``brokers/redis/stats.py``,
``brokers/rabbitmq/stats.py``, the stub broker) behind :class:`StatsReader`;
``docs/operations/stats.md`` says which number comes from where. A number the broker cannot give
is ``None``: RabbitMQ's in-flight counts without its management plugin, anything the
stub broker does not track, and the per-minute counts unless ``counters`` is given.

Queue names are canonical (``imports``, never ``imports.DQ``): a queue's delay and
dead-letter queues, and its priority lanes on Redis, are counted in its row.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import dramatiq

from .errors import DramaturgError, StateUnavailable
from .queues import canonical_queue
from .status import state_store
from .status.store import COUNTERS

logger = logging.getLogger("dramaturg.stats")

__all__ = ["COUNTERS", "Counters", "QueueStats", "StatsReader", "queue_stats", "stats_reader"]

#: A counter store's query: queue names -> ``{queue: {"processed": n, "failed": n, ...}}``
#: for the last minute, one key per name of :data:`COUNTERS` (the state store's, which
#: defines them). A queue missing from the answer has no counts (``None``).
Counters = Callable[[Sequence[str]], Mapping[str, Mapping[str, int]]]


@dataclass(frozen=True)
class QueueStats:
    """The state of one queue; ``None`` where the broker cannot tell (shown as ``-``)."""

    queue: str
    #: Waiting to be taken by a worker (every priority lane).
    ready: int | None
    #: Sent with a delay that has not passed yet (including those a worker holds until due).
    delayed: int | None
    #: Taken by a worker and not acknowledged yet: running, or prefetched.
    in_flight: int | None
    #: Held tasks (see :mod:`dramaturg.held`).
    held: int | None
    #: In Dramatiq's dead-letter queue (``<queue>.XQ``).
    dead: int | None
    #: Worker processes alive that consume the queue.
    workers: int | None
    #: Tasks of the queue that succeeded, failed, were retried, were held in the last minute:
    #: ``<name>_per_min`` for each name of :data:`COUNTERS`.
    processed_per_min: int | None = None
    failed_per_min: int | None = None
    retried_per_min: int | None = None
    held_per_min: int | None = None
    #: Tasks put back to wait for a concurrency slot or a rate token (see
    #: :mod:`dramaturg.flow`), refused in the last minute and not started since; they are
    #: among ``delayed`` (or ``ready`` once their wait is over). ``None`` without a state store.
    waiting_for_limits: int | None = None

    def with_counters(self, counts: Mapping[str, int] | None) -> QueueStats:
        """This row with the per-minute counts of a counter store (``None``: unknown)."""
        if counts is None:
            return self
        columns: dict[str, Any] = {f"{name}_per_min": counts.get(name) for name in COUNTERS}
        return replace(self, **columns)


class StatsReader(ABC):
    """Reads the statistics of one broker's queues. Get it with :func:`stats_reader`."""

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker

    @abstractmethod
    def read(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """One row per queue, in the order given; ``None``: every known queue, by name.

        The known queues are :meth:`known_queues` and those the broker holds messages
        or workers for. Raises :class:`~dramaturg.errors.BrokerUnreachable`.
        """

    def known_queues(self) -> set[str]:
        """The application's declared queues and those with held tasks (canonical names)."""
        names = {canonical_queue(name) for name in self.broker.get_declared_queues()}
        held = getattr(self.broker, "held", None)
        if held is not None:
            names.update(held.queues())
        return names


def stats_reader(broker: dramatiq.Broker | None = None) -> StatsReader:
    """The statistics reader of ``broker`` (default: the bootstrapped one)."""
    if broker is None:
        from .app import get_broker

        broker = get_broker()
    reader = getattr(broker, "stats", None)
    if not isinstance(reader, StatsReader):
        raise DramaturgError(f"{broker!r} has no queue statistics; build brokers with dramaturg.bootstrap()")
    return reader


def queue_stats(
    queues: Sequence[str] | None = None,
    broker: dramatiq.Broker | None = None,
    *,
    counters: Counters | None = None,
) -> list[QueueStats]:
    """The statistics of ``queues`` (default: every known queue, by name).

    ``broker`` defaults to the bootstrapped one. ``counters`` is a counter store's query
    for the per-minute columns; by default the state store's (:mod:`dramaturg.status`),
    and without one they are ``None``. Names are canonicalised:
    ``imports.DQ`` is ``imports``.

    >>> dramaturg.queue_stats(["imports"])[0].ready
    10
    """
    reader = stats_reader(broker)
    names = None if queues is None else list(dict.fromkeys(canonical_queue(name) for name in queues))
    rows = reader.read(names)
    if counters is None:
        counters = _state_store_counts(broker)
    if not rows:
        return rows
    if counters is not None:
        counts = counters([row.queue for row in rows])
        rows = [row.with_counters(counts.get(row.queue)) for row in rows]
    waiting = _waiting_for_limits(reader.broker, [row.queue for row in rows])
    if waiting is None:
        return rows
    return [replace(row, waiting_for_limits=waiting.get(row.queue, 0)) for row in rows]


def totals(rows: Sequence[QueueStats]) -> dict[str, Any]:
    """Each numeric column summed over ``rows`` (``None`` if any row's is unknown), as a dict.

    ``workers`` is left out: one worker process consumes many queues.
    """
    summed: dict[str, Any] = {}
    for name in QueueStats.__dataclass_fields__:
        if name in {"queue", "workers"}:
            continue
        values = [getattr(row, name) for row in rows]
        summed[name] = None if any(value is None for value in values) else sum(values)
    return summed


def _waiting_for_limits(broker: dramatiq.Broker, queues: Sequence[str]) -> dict[str, int] | None:
    """Per queue, the tasks waiting for a limit (see :mod:`dramaturg.flow`); ``None``
    without a flow control state store, or when it does not answer."""
    from .flow.control import state_of

    try:
        return state_of(broker).waiting_in(queues)
    except StateUnavailable:
        return None
    except Exception as error:  # the queues' own numbers are still worth showing
        logger.warning("stats: the tasks waiting for limits could not be read: %s: %s", type(error).__name__, error)
        return None


def _state_store_counts(broker: dramatiq.Broker | None) -> Counters | None:
    """The state store's per-minute counts (see :mod:`dramaturg.status`), if there is one."""
    try:
        return state_store(broker).minute_counts
    except StateUnavailable:
        return None
