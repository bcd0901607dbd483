"""Queue names: canonical names, delay queues and the priority lanes of Redis.

``priority`` is an int, 0 the most urgent (as in beanstalkd and Dramatiq), set per actor
(``@actor(priority=...)``) or per message (``send_with_options(priority=...)``).

The broker orders messages in three bands: priority 0 (urgent, the default), 1 to 4,
and 5 and above; first in, first out within a band.

- RabbitMQ: queues are declared with ``x-max-priority`` 2 and the bands are published
  as RabbitMQ priorities 2, 1 and 0. (Ten levels cost 20-30% of the drain rate in
  ``benchmarks/throughput.py``; three cost less, and match Redis.)
- Redis: each queue has three lanes, separate Dramatiq queues that every worker
  consumes: ``imports``, ``imports.P1`` and ``imports.P2``.
- On both, a worker runs the messages it holds most urgent first by their exact
  priority (not only their actor's), so an urgent message overtakes the prefetched ones.

``broker.priorities = false`` turns the bands off (plain queues, no lanes); workers
still order what they hold.

The suffixes ``.DQ``, ``.XQ``, ``.HQ``, ``.P1`` and ``.P2`` are reserved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dramatiq

__all__ = ["BANDS", "band", "canonical_queue", "lane_queue", "lanes", "message_priority"]

#: (lowest priority of the band, Redis lane suffix), most urgent first.
BANDS: tuple[tuple[int, str], ...] = ((0, ""), (1, ".P1"), (5, ".P2"))
_LANE_SUFFIXES = tuple(suffix for _, suffix in BANDS if suffix)


def message_priority(broker: dramatiq.Broker, message: Any) -> int:
    """The message's own priority, else its actor's, else 0."""
    priority = message.options.get("priority")
    if priority is None:
        actor = broker.actors.get(message.actor_name)
        priority = actor.priority if actor is not None else 0
    return int(priority)


def band(priority: int) -> int:
    """The band of ``priority``: 0 (most urgent) to ``len(BANDS) - 1``."""
    index = 0
    for position, (lowest, _) in enumerate(BANDS):
        if priority >= lowest:
            index = position
    return index


def canonical_queue(queue_name: str) -> str:
    """``imports.DQ``, ``imports.P2``, ``imports.P2.DQ`` -> ``imports``."""
    if queue_name.endswith((".DQ", ".XQ", ".HQ")):
        queue_name = queue_name[:-3]
    if queue_name.endswith(_LANE_SUFFIXES):
        queue_name = queue_name[:-3]
    return queue_name


def lane_queue(queue_name: str, priority: int) -> str:
    """The Redis lane of ``queue_name`` for ``priority``."""
    return queue_name + BANDS[band(priority)][1]


def lanes(queue_name: str) -> list[str]:
    """Every lane of a canonical queue, most urgent first."""
    return [queue_name + suffix for _, suffix in BANDS]
