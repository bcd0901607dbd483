"""Queue names: canonical names, delay queues and the priority lanes of Redis.

``priority`` is an int, 0 the most urgent (as in beanstalkd and Dramatiq), set per actor
(``@actor(priority=...)``) or per message (``send_with_options(priority=...)``).

- RabbitMQ has priorities of its own: queues are declared with ``x-max-priority``
  (``broker.max_priority``, default 9) and priority ``p`` is published as
  ``max_priority - min(p, max_priority)``, so 0..9 map onto 9..0; larger values count as 9.
- Redis has none, so each queue has three lanes, separate Dramatiq queues that every
  worker consumes: ``imports`` (priority 0), ``imports.P1`` (1 to 4) and ``imports.P2``
  (5 and above). Order inside a lane is first in, first out.
- On both, a worker runs the messages it holds most urgent first (by their own
  priority, not only their actor's), so an urgent message overtakes the prefetched ones.

The suffixes ``.DQ``, ``.XQ``, ``.HQ``, ``.P1`` and ``.P2`` are reserved.
"""

from __future__ import annotations

__all__ = ["REDIS_LANES", "canonical_queue", "lane_queue", "lanes"]

#: (lowest priority of the lane, suffix), most urgent first.
REDIS_LANES: tuple[tuple[int, str], ...] = ((0, ""), (1, ".P1"), (5, ".P2"))
_LANE_SUFFIXES = tuple(suffix for _, suffix in REDIS_LANES if suffix)


def canonical_queue(queue_name: str) -> str:
    """``imports.DQ``, ``imports.P2``, ``imports.P2.DQ`` -> ``imports``."""
    if queue_name.endswith((".DQ", ".XQ", ".HQ")):
        queue_name = queue_name[:-3]
    if queue_name.endswith(_LANE_SUFFIXES):
        queue_name = queue_name[:-3]
    return queue_name


def lane_queue(queue_name: str, priority: int) -> str:
    """The Redis lane of ``queue_name`` for ``priority``."""
    suffix = ""
    for lowest, lane_suffix in REDIS_LANES:
        if priority >= lowest:
            suffix = lane_suffix
    return queue_name + suffix


def lanes(queue_name: str) -> list[str]:
    """Every lane of a canonical queue, most urgent first."""
    return [queue_name + suffix for _, suffix in REDIS_LANES]
