"""Which worker processes are alive: host, pid, queues, threads, tasks running now.

::

    >>> for worker in dramaturg.workers():                      # doctest: +SKIP
    ...     print(worker.host, worker.pid, worker.queues, worker.running, "/", worker.threads)
    web-1 4021 ('default', 'imports') 3 / 8

Each worker process keeps its record in the state store (the broker's own Redis, or
``[state] url`` beside RabbitMQ): the :class:`~dramaturg.workers.registry.WorkerRegistry`
middleware writes it when the worker starts and every 5 seconds after, with a TTL of 15
seconds, and removes it when the worker stops cleanly. A worker that was killed, or is
stuck, or cannot reach the store, drops off the list within 15 seconds. The numbers a
record holds (tasks running now) are as of its last write, at most 5 seconds old.

Keys: ``<broker.namespace>:__worker__:<worker id>`` for a record (JSON, expiring),
``<broker.namespace>:__worker_ids__`` for the set of ids, which the reader prunes of
records that expired. A worker id is ``host:pid:<8 hex digits>``.

Cost: one write (a pipelined ``SET`` and ``SADD``) per worker process every 5 seconds,
never per task; per task, two operations on a set in memory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..errors import StateUnavailable
from .registry import FORGET_GONE, WorkerRegistry, index_key, record_prefix

if TYPE_CHECKING:
    import dramatiq

__all__ = ["WorkerInfo", "registry_of", "workers"]


@dataclass(frozen=True)
class WorkerInfo:
    """One live worker process, as its last record said."""

    #: ``host:pid:<8 hex digits>``, unique even when a pid is reused.
    worker_id: str
    host: str
    pid: int
    #: The queues it consumes (canonical names), sorted.
    queues: tuple[str, ...]
    #: Its worker threads: how many tasks it can run at once.
    threads: int
    #: Tasks it was running at its last write.
    running: int
    #: When it started, ms since the epoch.
    started_at: int
    #: When it last wrote its record, ms since the epoch (by its own clock).
    seen_at: int

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values (``queues`` a list)."""
        fields = asdict(self)
        fields["queues"] = list(self.queues)
        return fields

    @classmethod
    def from_json(cls, data: str | bytes) -> WorkerInfo | None:
        """The record stored as ``data``; None if it is not one this version reads."""
        try:
            raw = json.loads(data)
            return cls(
                worker_id=str(raw["worker_id"]),
                host=str(raw["host"]),
                pid=int(raw["pid"]),
                queues=tuple(str(queue) for queue in raw["queues"]),
                threads=int(raw["threads"]),
                running=int(raw["running"]),
                started_at=int(raw["started_at"]),
                seen_at=int(raw["seen_at"]),
            )
        except (ValueError, TypeError, KeyError):
            return None


def registry_of(broker: dramatiq.Broker) -> WorkerRegistry:
    """The :class:`WorkerRegistry` of ``broker`` (raises :class:`~dramaturg.StateUnavailable` without one)."""
    for middleware in broker.middleware:
        if isinstance(middleware, WorkerRegistry):
            return middleware
    raise StateUnavailable(
        "the worker list needs the worker registry middleware: the broker was not made by dramaturg.bootstrap()"
    )


def workers(broker: dramatiq.Broker | None = None) -> list[WorkerInfo]:
    """The worker processes alive now, by host and pid.

    Default ``broker``: the one :func:`dramaturg.bootstrap` built. Eager mode has no
    worker processes (an empty list). Raises :class:`~dramaturg.StateUnavailable` when
    there is no state store (RabbitMQ without ``[state] url``), and the Redis client's
    own error when the store does not answer.
    """
    if broker is None:
        from ..app import get_broker

        broker = get_broker()
    registry = registry_of(broker)
    if getattr(broker, "runs_inline", False):
        return []
    client = registry.client(broker)
    index, prefix = index_key(registry.namespace), record_prefix(registry.namespace)
    ids = sorted(member.decode() if isinstance(member, bytes) else str(member) for member in client.smembers(index))
    if not ids:
        return []
    found, gone = [], []
    for worker_id, data in zip(ids, client.mget([prefix + worker_id for worker_id in ids]), strict=True):
        info = WorkerInfo.from_json(data) if data is not None else None
        if data is None:
            gone.append(worker_id)
        elif info is not None:
            found.append(info)
    if gone:
        client.register_script(FORGET_GONE)(keys=[index, prefix], args=gone)
    return sorted(found, key=lambda info: (info.host, info.pid, info.started_at))
