"""Task status by message id: what became of a task (``dramaturg status ID``).

``send()`` returns a message whose ``message_id`` names the task for its whole life
(retries and kicks keep it). :func:`task_status` tells what became of it: queued,
delayed (until when), running (on which worker, since when), succeeded (when, how
long), retrying (attempt n, next run at), held (reason), failed, cancelled (who asked,
when), or unknown, with the last error. ``dramaturg status ID`` prints the same, and a
running task's last ``task.progress()``.

Where it is kept: the state store (:mod:`dramaturg.status.store`), ``[state] url`` when
set, else the broker's own Redis on the Redis and embedded brokers. On RabbitMQ without
``[state] url`` there is no store and every task is "unknown" except held ones, which
the held store always knows. Each record expires ``[state] ttl`` (default one day)
after its last change, so the store never grows without bound; held tasks are not
subject to it.

Who writes it: senders and workers, through the
:class:`~dramaturg.status.recorder.StatusRecorder` middleware, in batches a
background thread writes (a status lags its task by up to 100 ms). The same store
counts the last minute's outcomes per queue for ``dramaturg stats``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import dramatiq

from ..batches.state import progress_prefix
from ..errors import StateUnavailable
from .recorder import StatusRecorder
from .store import StateStore, no_store_reason, queued_fields

__all__ = ["StateStore", "StateUnavailable", "TaskStatus", "from_record", "state_store", "task_status"]


@dataclass(frozen=True)
class TaskStatus:
    """What is known of one task. Times are ms since the epoch."""

    message_id: str
    #: queued, delayed, waiting (for a limit: the reason says which), running, succeeded,
    #: retrying, held, failed, cancelled, purged (dropped from its queue by ``dramaturg queue
    #: purge``/``delete``) or unknown.
    state: str
    queue: str | None = None
    actor: str | None = None
    #: The attempt running, done, or next (1-based).
    attempt: int | None = None
    enqueued_at: int | None = None
    #: delayed: until when; retrying: when the next attempt is due; waiting: its next try.
    eta: int | None = None
    #: ``host:pid`` and thread of the worker running (or that ran) it.
    worker: str | None = None
    started_at: int | None = None
    finished_at: int | None = None
    duration_ms: int | None = None
    #: held: why; waiting: for what (``waiting for concurrency tenant:fr``).
    reason: str | None = None
    #: The last error: ``Type: message``, and where it was raised when known.
    last_error: str | None = None
    #: When this was last true (the newest change the store saw).
    updated_at: int | None = None
    #: running: its last ``task.progress()``, 0.0 to 1.0, and its words.
    progress: float | None = None
    progress_text: str | None = None
    #: Who asked for it to be cancelled (:func:`dramaturg.cancel`'s ``by``), and when (ms
    #: since the epoch): a cancelled task's, or a request not yet carried out.
    cancel_requested_by: str | None = None
    cancel_requested_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def state_store(broker: dramatiq.Broker | None = None) -> StateStore:
    """The state store of ``broker`` (default: the app's). Raises :class:`StateUnavailable`."""
    if broker is None:
        from ..app import get_broker

        broker = get_broker()
    for middleware in broker.middleware:
        if isinstance(middleware, StatusRecorder):
            return middleware.store(broker)
    raise StateUnavailable(no_store_reason(broker))


def task_status(message_id: str, broker: dramatiq.Broker | None = None) -> TaskStatus:
    """What is known of the task ``message_id`` (see the module docstring).

    The held store answers for held tasks whatever the state store says (and whether
    or not there is one); raises :class:`StateUnavailable` only when neither knows.
    """
    if broker is None:
        from ..app import get_broker

        broker = get_broker()
    record: dict[str, Any] | None = None
    unavailable: StateUnavailable | None = None
    try:
        record = state_store(broker).get(message_id)
    except StateUnavailable as error:
        unavailable = error  # the held store may still know it
    queue = record.get("queue") if record else None
    held = broker.held.get(message_id, queue)  # type: ignore[attr-defined]
    if held is not None:
        last_error = None
        if held.exception_type and held.exception_type != "Hold":  # hold(reason): the reason says it
            last_error = f"{held.exception_type}: {held.exception_message}"
        if last_error and held.origin:
            last_error += f" (at {held.origin})"
        return TaskStatus(
            message_id=message_id,
            state="held",
            queue=held.queue_name,
            actor=held.actor_name or None,
            attempt=held.attempts,
            enqueued_at=held.enqueued_at,
            worker=f"{held.host}:{held.pid}",
            finished_at=held.held_at,
            reason=held.reason,
            last_error=last_error,
            updated_at=held.held_at,
        )
    if unavailable is not None and not getattr(broker, "runs_inline", False):
        raise unavailable
    if record is None and getattr(broker, "finds_messages", False):
        found = broker.find_message(message_id)  # type: ignore[attr-defined]
        if found is not None:
            message, delayed = found
            record = queued_fields(message, delay=1 if delayed else None)
            record["at"] = message.message_timestamp / 1000
    if record is None:
        return TaskStatus(message_id=message_id, state="unknown")
    status = from_record(message_id, record)
    if status.state in _CANCELLABLE and unavailable is None:
        status = _with_request(status, broker)
    # "queued" too: when a worker starts a task before its sender's news of it is
    # recorded, the record may say queued while it runs (the newer stamp wins).
    if status.state in {"running", "queued"} and unavailable is None:
        status = _with_progress(status, state_store(broker))
    return status


#: The states in which a task may have a cancel request to tell of.
_CANCELLABLE = frozenset({"queued", "delayed", "retrying", "running", "cancelled"})


def _with_request(status: TaskStatus, broker: dramatiq.Broker) -> TaskStatus:
    """``status`` with who asked for the task to be cancelled, and when, if anyone did."""
    from ..cancelling.watch import watch_of

    try:
        request = watch_of(broker).requests(broker).get(status.message_id)
    except StateUnavailable:
        return status
    if request is None:
        return status
    return replace(status, cancel_requested_by=request.by, cancel_requested_at=request.at)


def _with_progress(status: TaskStatus, store: StateStore) -> TaskStatus:
    """``status`` with the task's last ``progress()``, if it reported any (kept by the
    batch middleware's writer, :mod:`dramaturg.batches.writer`, under the same namespace)."""
    raw = store.client.get(progress_prefix(store.namespace) + status.message_id)
    if raw is None:
        return status
    fraction, _, text = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition("|")
    return replace(status, progress=float(fraction), progress_text=text or None)


def from_record(message_id: str, record: Mapping[str, Any]) -> TaskStatus:
    """A :class:`TaskStatus` from a stored record."""
    state = record.get("state", "unknown")
    reason = record.get("reason") or None
    if state == "held":
        # Not in the held store (checked first): it was purged since.
        state, reason = "unknown", f"was held ({reason}), then purged"
    eta = _int(record.get("eta"))
    if state == "delayed" and eta is not None and eta <= time.time() * 1000:
        state = "queued"  # due: it waits on its queue now
    keep_times = state in {"running", "succeeded", "failed", "cancelled", "purged", "unknown"}
    return TaskStatus(
        message_id=message_id,
        state=state,
        queue=record.get("queue"),
        actor=record.get("actor"),
        attempt=_int(record.get("attempt")),
        enqueued_at=_int(record.get("enqueued_at")),
        eta=eta if state in {"delayed", "retrying", "waiting"} else None,
        worker=record.get("worker") if keep_times else None,
        started_at=_int(record.get("started_at")) if keep_times else None,
        finished_at=_int(record.get("finished_at")) if state in _ENDED else None,
        duration_ms=_int(record.get("duration_ms")) if state in _ENDED else None,
        reason=reason,
        last_error=record.get("last_error") or None,
        updated_at=int(record["at"] * 1000) if "at" in record else None,
    )


_ENDED = frozenset({"succeeded", "failed", "cancelled", "purged", "unknown"})


def _int(value: Any) -> int | None:
    return None if value is None or value == "" else int(value)
