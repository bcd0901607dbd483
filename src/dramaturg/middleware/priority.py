"""Per-message priority on every broker (see :mod:`dramaturg.queues` for the mapping).

A message's priority is its ``priority`` option (``send_with_options(priority=3)``),
else its actor's ``priority``; 0 is the most urgent. This middleware

- publishes its band as RabbitMQ's ``broker_priority`` (2 for the most urgent band),
- makes each worker run the messages it holds by their own priority: Dramatiq orders
  its in-memory work queue by the *actor's* priority only, so an urgent message of a
  busy actor would otherwise wait behind everything that actor had prefetched;
- on Redis, extends a worker's queue selection to the lanes of the selected queues
  (the broker routes each message to the lane of its priority).
"""

from __future__ import annotations

import dataclasses
import logging
from queue import Empty, PriorityQueue
from typing import Any

import dramatiq

from ..queues import BANDS, band, lanes, message_priority

__all__ = ["MessagePriorityQueue", "Priority", "message_priority"]

logger = logging.getLogger("dramaturg.priority")

#: Actors whose explicit broker_priority was reported (once per actor in this process).
_warned: set[str] = set()


class MessagePriorityQueue(PriorityQueue):  # type: ignore[type-arg]
    """Dramatiq's work queue, ordered by each message's priority rather than its actor's.

    It never hands out a delivery its broker has already taken back: a RabbitMQ message
    whose consumer is ``gone`` (its channel closed or its connection lost while the
    message waited here) is dropped, not started; RabbitMQ delivers it again. Started,
    it would run twice. The check is a dict lookup and an attribute read per message.

    ``gate`` (a Redis broker's ``claims``) holds every message back from worker threads
    while the worker may have been taken for dead (``gate.suspected``) until
    ``gate.trusted`` is set: by then the messages another worker recovered meanwhile are
    out of this queue (see :mod:`dramaturg.brokers.redis.claims`). One attribute read per
    message.
    """

    def __init__(self, gate: Any = None) -> None:
        super().__init__()
        self.gate = gate

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        priority = getattr(item, "message", None) and item.message.options.get("priority")
        if priority is not None and priority != item.priority:
            # Never raise here: it would stop the consumer that is putting the message
            # (consumers hold messages whose priority is not an integer before this).
            try:
                priority = int(priority)
            except (TypeError, ValueError, OverflowError):
                priority = item.priority  # its actor's, then
            item = dataclasses.replace(item, priority=priority)
        super().put(item, block, timeout)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        while True:
            gate = self.gate
            # Worker threads wait (a stopping worker empties the queue without blocking: what
            # it requeues goes back only if this worker still claims it).
            if gate is not None and gate.suspected and block and not gate.trusted.wait(timeout):
                raise Empty  # the worker thread looks again after its timeout (or stops)
            item = super().get(block, timeout)
            source = item.message.__dict__.get("_dramaturg_consumer")  # set by the RabbitMQ consumer
            if source is None or not source.gone:
                return item
            self.task_done()  # taken back by the broker: done here, as far as join() goes
            logger.debug(
                "%s (message %s) not started: RabbitMQ took it back when the channel it came on closed",
                item.message.actor_name,
                item.message.message_id,
            )


class Priority(dramatiq.Middleware):
    """Carries message priorities to the broker and through the worker."""

    def __init__(self, *, broker_priorities: bool = False, lanes: bool = False) -> None:
        self.broker_priorities = broker_priorities
        self.lanes = lanes

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        if self.broker_priorities:
            options = message.options
            published = len(BANDS) - 1 - band(message_priority(broker, message))
            explicit = options.get("broker_priority")
            # A copy (a retry, a release) carries the value set here; any other was the sender's.
            if explicit is not None and explicit != published and message.actor_name not in _warned:
                _warned.add(message.actor_name)
                logger.warning(
                    "%s: the message option broker_priority=%r is replaced by %d, its priority band:"
                    " dramaturg orders messages by priority= (0 is the most urgent); send it with priority=",
                    message.actor_name,
                    explicit,
                    published,
                )
            options["broker_priority"] = published

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        worker.work_queue = MessagePriorityQueue(gate=getattr(broker, "claims", None))
        if self.lanes and worker.consumer_whitelist:
            worker.consumer_whitelist = {lane for queue in worker.consumer_whitelist for lane in lanes(queue)}
