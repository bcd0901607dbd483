"""Where a message goes in Redis: its priority lane, its Redis id, its delay queue.

The broker places what it enqueues so, and the held store what it kicks back to a queue.
A new message's Redis id is its own id (so that
:meth:`~dramaturg.brokers.redis.RedisBroker.find_message` finds it by that). A message
enqueued before (a retry, a release, a kick) may still have a body under its id until
its first delivery is acknowledged: it gets a fresh one; or, for a copy that must be
enqueued once however often its write runs, one derived from its source's
(:func:`copy_id`).
"""

from __future__ import annotations

import uuid
from typing import Any

from dramatiq import Broker, Message
from dramatiq.common import current_millis, dq_name

from ...bulk import new_ids
from ...queues import canonical_queue, lane_queue, message_priority

__all__ = ["copy_id", "is_new", "lane_of", "placed"]

#: The UUID namespace of copy_id().
_COPIES = uuid.UUID("6f1d3c52-6b0e-4f43-9a57-3d2b9c1e8a40")


def copy_id(source_redis_id: str, retries: int) -> str:
    """The Redis id of a copy of the message enqueued under ``source_redis_id``, with
    ``retries`` failed attempts: the same for every run of the same write, so that it is
    queued once. A retry copy counts one more failed attempt than its source; a release or
    a delayed message's move counts as many; a copy of a copy has another source."""
    return str(uuid.uuid5(_COPIES, f"{source_redis_id}:{retries}"))


def is_new(message: Message[Any]) -> bool:
    """Never enqueued before: no Redis id yet, never held and kicked."""
    options = message.options
    return "redis_message_id" not in options and "dramaturg_kicks" not in options and not options.get("retries")


def lane_of(broker: Broker, message: Message[Any], *, priorities: bool) -> str:
    """The queue (lane) ``message`` goes to: that of its priority, with ``priorities`` on
    (``broker.priorities``), else its own."""
    if not priorities:
        return message.queue_name
    return lane_queue(canonical_queue(message.queue_name), message_priority(broker, message))


def placed(
    broker: Broker, message: Message[Any], delay: int | None, *, priorities: bool, copy: bool = False
) -> tuple[Message[Any], str]:
    """``message`` as it is stored (on its lane, or its lane's delay queue with its
    ``eta``), and its Redis id (for a ``copy``, derived from its source's: :func:`copy_id`)."""
    queue_name = lane_of(broker, message, priorities=priorities)
    if copy:
        redis_id = copy_id(str(message.options["redis_message_id"]), int(message.options.get("retries") or 0))
    else:
        redis_id = message.message_id if is_new(message) else new_ids(1)[0]
    options: dict[str, Any] = {"redis_message_id": redis_id}
    if delay is not None:
        queue_name = dq_name(queue_name)
        options["eta"] = current_millis() + delay
    return message.copy(queue_name=queue_name, options=options), redis_id
