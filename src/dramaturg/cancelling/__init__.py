"""Cancelling tasks and batches: ``dramaturg.cancel(message_id)``, ``dramaturg cancel ID...``.

::

    message = import_user.send(row)
    dramaturg.cancel(message.message_id)          # -> Cancellation(outcome="requested", state="queued", ...)
    dramaturg.cancel_batch(batch.id)              # every member that has not ended

What becomes of the task depends on where it is:

- **waiting** (queued, delayed, between retries): it is skipped when a worker takes it;
  its handler never runs;
- **running**: it is interrupted within a second, while it runs Python code, by
  :class:`~dramaturg.middleware.ttr.TaskCancelled`, delivered as the TTR interrupt is (a
  ``BaseException``: the handler's ``except Exception:`` cannot swallow it; ``finally``
  blocks run);
- **held**: it is purged from the held store.

Each ends as **cancelled**: acknowledged, never retried, never counted as failed (task
status says ``cancelled``, with who asked and when; the metrics count the outcome
``cancelled``; in a batch it counts as cancelled, neither succeeded nor failed, and the
batch can complete). A task that had already ended is left as it ended, and the answer
says how (:attr:`Cancellation.outcome` ``"ended"``); one that ends while the request is
on its way (it returns before the interrupt lands) ends as it did, and the request
lapses: the task's status always tells the one way it ended.

Requests are kept in the state store (the broker's Redis, or ``[state] url`` beside
RabbitMQ; :class:`~dramaturg.StateUnavailable` without one) for ``[state] ttl``; how a
worker learns of them without a look-up per task: :mod:`dramaturg.cancelling.watch`.
In eager mode a task has ended by the time ``send()`` returns: only a held one can be
cancelled (purged) there.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import dramatiq

from ..errors import BatchNotFound, StateUnavailable, TaskNotFound
from ..middleware.ttr import TaskCancelled
from .requests import CancelRequests, Request
from .watch import SETTLE_S, CancelWatch, watch_of

__all__ = [
    "BatchCancellation",
    "CancelRequests",
    "CancelWatch",
    "Cancellation",
    "Request",
    "TaskCancelled",
    "cancel",
    "cancel_batch",
    "request_cancel",
    "settle",
    "withdraw_lapsed",
]

#: Task states in which a task has ended (a cancel changes nothing).
_ENDED = frozenset({"succeeded", "failed", "cancelled", "purged"})
#: What a cancel does to a task in each state it may be in, in words.
_WHAT_HAPPENS = {
    "queued": "it was queued; it is skipped when a worker takes it",
    "delayed": "it was delayed; it is skipped when a worker takes it",
    "retrying": "it was waiting to be retried; it is skipped when a worker takes it",
    "running": "it was running; it is interrupted within a second",
}

logger = logging.getLogger("dramaturg.cancelling")


@dataclass(frozen=True)
class Cancellation:
    """The answer to :func:`cancel`."""

    message_id: str
    #: ``"requested"``: it had not ended; it is skipped when a worker takes it, or
    #: interrupted where it runs. ``"purged"``: it was held, and is purged (cancelled).
    #: ``"ended"``: it had already ended, as ``state`` says; nothing was changed.
    outcome: str
    #: The task's state when the cancel came: task status's words (queued, delayed,
    #: retrying, running, held, succeeded, failed, cancelled), or ``"ended"`` in eager mode.
    state: str
    #: What happened, in words (what ``dramaturg cancel`` prints).
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BatchCancellation:
    """The answer to :func:`cancel_batch`."""

    batch_id: str
    #: Members asked to be cancelled: those that had not ended (a nested batch counts as one).
    requested: int
    #: The batch's state when the cancel came (open, running, complete).
    state: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cancel(message_id: str, *, by: str | None = None, broker: dramatiq.Broker | None = None) -> Cancellation:
    """Cancel the task ``message_id`` (see the module): skipped if waiting, interrupted if
    running, purged if held; a task that had ended is left as it ended.

    ``by``: who asks, kept with the request and shown in the task's status (default:
    ``user@host``). Raises :class:`~dramaturg.TaskNotFound` for an id no one knows,
    :class:`~dramaturg.StateUnavailable` without a state store. Repeating it is harmless:
    the first request stands.

    When it asked for a waiting or running task, it returns about half a second after
    writing the request (:data:`~dramaturg.cancelling.watch.SETTLE_S`): from then on no
    worker starts the task's handler, whenever it takes it.
    """
    answer = request_cancel(message_id, by=by, broker=broker)
    if answer.outcome == "requested":
        settle()
    return answer


def settle(since: float | None = None) -> None:
    """Wait until every worker has read the requests written before ``since``
    (``time.monotonic()``; default: now) before it takes a task."""
    since = time.monotonic() if since is None else since
    left = SETTLE_S - (time.monotonic() - since)
    if left > 0:
        time.sleep(left)


def request_cancel(message_id: str, *, by: str | None = None, broker: dramatiq.Broker | None = None) -> Cancellation:
    """:func:`cancel` without the wait: for many tasks at once, followed by one :func:`settle`."""
    if broker is None:
        from ..app import get_broker

        broker = get_broker()
    by = by or default_by()
    if getattr(broker, "runs_inline", False):
        return _cancel_eager(broker, message_id, by)
    from ..status import state_store, task_status

    requests = watch_of(broker).requests(broker)
    status = task_status(message_id, broker)
    if status.state == "unknown":
        # Sent from this process a moment ago: its first record may still be in the buffer.
        state_store(broker).flush()
        status = task_status(message_id, broker)
    state = status.state
    if state == "unknown":
        raise TaskNotFound(message_id)
    if state in _ENDED:
        return Cancellation(message_id, "ended", state, _ended_words(status))
    # First the request, then the purge: a kick racing the purge requeues a copy that a
    # worker skips, so the task ends cancelled either way.
    requests.request([message_id], by)
    if state != "held":
        return Cancellation(message_id, "requested", state, _WHAT_HAPPENS.get(state, f"it was {state}"))
    held = broker.held.get(message_id, status.queue)  # type: ignore[attr-defined]
    if held is None or not broker.held.purge(held.queue_name, [message_id]):  # type: ignore[attr-defined]
        # Taken meanwhile by a kick (which leaves a request made after the task was held
        # standing: see withdraw_lapsed) or by a reader of the held queue (RabbitMQ).
        settle()
        taken = (
            "it was held, and was taken from the held store meanwhile (a kick, or a reader on RabbitMQ);"
            " it is skipped when a worker takes it"
        )
        return Cancellation(message_id, "requested", state, taken)
    now = time.time()
    store = state_store(broker)
    store.record(
        message_id,
        {
            "state": "cancelled",
            "queue": held.queue_name,
            "actor": held.actor_name,
            "attempt": held.attempts,
            "enqueued_at": held.enqueued_at,
            "finished_at": int(now * 1000),
            "reason": f"was held ({held.reason}), then purged",
        },
        at=now,
    )
    store.flush()
    _end_member(broker, held.options.get("dramaturg_batch"), message_id)
    return Cancellation(message_id, "purged", state, f"it was held ({held.reason}); purged")


def cancel_batch(batch_id: str, *, by: str | None = None, broker: dramatiq.Broker | None = None) -> BatchCancellation:
    """Cancel every member of the batch ``batch_id`` that has not ended (and those of the
    batches nested in it), as :func:`cancel` does each; members that ended stay as they
    ended (a held member stays held). The batch completes once each cancelled member has
    ended as cancelled (a waiting one when a worker takes it), and ``on_complete`` fires
    then, with the cancelled members counted; ``on_success`` does not.

    Raises :class:`~dramaturg.BatchNotFound` for an unknown (or expired) id.
    """
    from ..batches import batch_status
    from ..batches.tracker import tracker_of

    if broker is None:
        from ..app import get_broker

        broker = get_broker()
    by = by or default_by()
    status = batch_status(batch_id, broker)  # BatchNotFound
    if status.state == "complete":
        return BatchCancellation(
            batch_id,
            0,
            status.state,
            f"it had already ended: {status.succeeded} succeeded, {status.failed} failed"
            f" ({status.held} held), {status.cancelled} cancelled of {status.total}",
        )
    state = tracker_of(broker).state(broker)
    members = state.unended(batch_id)
    tasks = [member for member in members if not member.startswith("batch:")]
    nested = [member.removeprefix("batch:") for member in members if member.startswith("batch:")]
    if tasks and not getattr(broker, "runs_inline", False):
        watch_of(broker).requests(broker).request(tasks, by)
        settle()
    for inner in nested:
        with contextlib.suppress(BatchNotFound):  # expired meanwhile
            cancel_batch(inner, by=by, broker=broker)
    state.describe(batch_id, {"cancel_requested_by": by, "cancel_requested_at": str(int(time.time() * 1000))})
    count = len(tasks) + len(nested)
    words = f"{count} member{'s' if count != 1 else ''} that had not ended"
    if status.state == "open":
        words += " (the batch is open: members sent from now on are not cancelled)"
    return BatchCancellation(batch_id, count, status.state, f"cancel requested for {words}")


def withdraw_lapsed(broker: dramatiq.Broker, held_at: Mapping[str, int]) -> None:
    """Withdraw the cancel requests that lapsed of held tasks about to be kicked: a
    request made while a task ran lapses when the task ends held instead (the request is
    older than ``held_at``, when each was held, ms), and a kick is a later decision to run
    it. A request made once the task was held stands (the cancel's purge lost a race with
    this kick). Nothing to do without a state store; when the store does not answer, a
    WARNING says so and the kick goes on (a task whose request stands is then skipped as
    cancelled)."""
    watch = next((m for m in broker.middleware if isinstance(m, CancelWatch)), None)
    if watch is None or not held_at:
        return
    try:
        watch.requests(broker).withdraw(held_at)
    except Exception as error:
        logger.warning(
            "could not withdraw the cancel requests of %d kicked tasks (%s: %s); any of them that had one"
            " is skipped as cancelled when taken",
            len(held_at),
            type(error).__name__,
            error,
        )


def default_by() -> str:
    """``user@host``: who asks, when ``by`` is not given."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for the uid (a container)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _cancel_eager(broker: dramatiq.Broker, message_id: str, by: str) -> Cancellation:
    """Eager mode: tasks end inside ``send()``; a held one is purged."""
    held = broker.held.get(message_id)  # type: ignore[attr-defined]
    if held is not None and broker.held.purge(held.queue_name, [message_id]):  # type: ignore[attr-defined]
        _end_member(broker, held.options.get("dramaturg_batch"), message_id)
        return Cancellation(message_id, "purged", "held", f"it was held ({held.reason}); purged")
    return Cancellation(
        message_id, "ended", "ended", "eager mode: a task has already ended when send() returns; nothing to cancel"
    )


def _end_member(broker: dramatiq.Broker, batch_id: Any, message_id: str) -> None:
    """A purged member of a batch moves from held to cancelled (nothing fires: it had ended)."""
    if not batch_id:
        return
    from ..batches.tracker import tracker_of

    try:
        tracker = tracker_of(broker)
        events = tracker.writer(broker).end_durably((str(batch_id), message_id, "c"))
    except StateUnavailable:
        return
    if events:
        tracker.fire(broker, str(batch_id), events)


def _ended_words(status: Any) -> str:
    """``it had already ended: succeeded at 2026-12-01T03:40:12+00:00``, and who cancelled a cancelled one."""
    words = {"cancelled": "it was cancelled", "purged": "it was purged from its queue"}.get(
        status.state, f"it had already ended: {status.state}"
    )
    if status.finished_at:
        words += " at " + datetime.fromtimestamp(status.finished_at / 1000, UTC).isoformat(timespec="seconds")
    if status.state == "cancelled" and status.cancel_requested_by:
        words += f" (asked by {status.cancel_requested_by})"
    if status.state == "failed":
        words += " (rejected into the dead-letter queue)"
    return words
