"""Tasks for an actor this worker does not declare: given back for a while, then held.

During a rolling deploy, new code sends tasks for an actor that the workers still
running the old code do not have; two applications may share a queue. Holding such a
task at once would park it until someone kicks it, although a worker that knows the
actor may be starting that minute. So a worker that takes a task for an actor it does
not know gives it back to its queue: untouched (no attempt counted, its arguments and
options as they were, plus when it was first met) and a little later, so that it does
not spin between the old workers. A worker that knows the actor runs it meanwhile
(applications that share a queue for good are better given a queue each: their tasks
go round until a worker of theirs takes them). If none has after
``worker.unknown_actor_grace`` (default 5 minutes; 0 holds at once), the task is held
with the reason "unknown actor ...", to be kicked once the module declaring it is in
``worker.modules``. The first time a worker gives a task back it logs a WARNING.

The grace runs from the first time a worker met the task, carried in the task itself
(the option ``dramaturg_unknown_actor_since``, ms since the epoch), rather than from
the time it was sent: a task that waited in a backlog, or was sent with a delay, has
its whole grace when it reaches the old workers, however old it is; and since the time
travels with the task, every worker and every restart counts from the same moment
(a few seconds of clock skew between workers matter little against minutes). It is not
kept when the task is held, so a kick gives it a grace of its own again.

Each give-back waits half the time elapsed since then, between 1 and 30 s (and never
past the end of the grace): a task comes round 1, 2, 3, 4.5, 6.75 ... s after its
first sighting, then every 30 s. A delayed task is not looked at before its time: it
comes back to its queue and is met there.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import dramatiq
from dramatiq.common import current_millis

from .durations import format_ms
from .held import HeldTask, hold_poison

__all__ = ["DEFAULT_GRACE_MS", "UNKNOWN_ACTOR_SINCE", "settle", "unknown_actor_reason"]

logger = logging.getLogger("dramaturg.unknown_actors")

#: ``worker.unknown_actor_grace``'s default.
DEFAULT_GRACE_MS = 300_000
#: The option holding when a worker first met the task (ms since the epoch).
UNKNOWN_ACTOR_SINCE = "dramaturg_unknown_actor_since"
#: The shortest and the longest wait before a task given back comes round again.
MIN_STEP_MS, MAX_STEP_MS = 1_000, 30_000


def grace_ms(broker: dramatiq.Broker) -> int:
    """The broker's worker's grace (set at worker boot from ``worker.unknown_actor_grace``)."""
    return int(getattr(broker, "unknown_actor_grace_ms", DEFAULT_GRACE_MS))


def settle(broker: dramatiq.Broker, message: dramatiq.Message[Any], queue_name: str) -> bool:
    """Give ``message`` back to ``queue_name`` (canonical), or hold it once its grace is over.

    True when the delivery may be acknowledged (a copy is back on the queue, or the task
    is held); False when neither could be written (the caller leaves it to the broker).
    """
    now = current_millis()
    since = message.options.get(UNKNOWN_ACTOR_SINCE)
    first = since is None
    since = now if since is None else int(since)
    elapsed = max(0, now - since)
    left = grace_ms(broker) - elapsed
    fields = {"actor": message.actor_name, "message_id": message.message_id, "queue": queue_name}
    if left > 0:
        delay = min(max(elapsed // 2, MIN_STEP_MS), MAX_STEP_MS, left)
        copy = message.copy(queue_name=queue_name, options={UNKNOWN_ACTOR_SINCE: since})
        try:
            broker.enqueue(copy, delay=delay)
        except Exception:
            logger.error(
                "%s (message %s) on queue %r: no actor of that name is declared in this worker, and it could"
                " not be given back to the queue; it is held",
                message.actor_name,
                message.message_id,
                queue_name,
                exc_info=True,
            )
        else:
            logger.log(
                logging.WARNING if first else logging.DEBUG,
                "%s (message %s) on queue %r: no actor of that name is declared in this worker; given back to"
                " the queue for a worker that knows it (a rolling deploy, another application on this queue),"
                " and held if none has taken it in %s (worker.unknown_actor_grace)",
                message.actor_name,
                message.message_id,
                queue_name,
                format_ms(left),
                extra={"dramaturg": {**fields, "next": f"given back, again in {delay} ms"}},
            )
            return True
    # The first sighting is not kept: a kick gives the task a grace of its own again.
    options = {name: value for name, value in message.options.items() if name != UNKNOWN_ACTOR_SINCE}
    held = dataclasses.replace(message, options=options)
    reason = unknown_actor_reason(message.actor_name, broker)
    return hold_poison(broker, HeldTask.from_message(held, reason, queue_name=queue_name))


def unknown_actor_reason(actor_name: str, broker: dramatiq.Broker) -> str:
    """The reason a task for an actor ``broker`` does not know is held with."""
    known = ", ".join(sorted(broker.actors)) or "none"
    return (
        f"unknown actor {actor_name!r}: no actor of that name is declared in this worker (it has: {known});"
        " add the module that declares it to worker.modules, then kick the task"
    )
