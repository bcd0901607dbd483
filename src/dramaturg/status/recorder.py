"""The middleware that keeps task status: each task's changes go to the state store.

It lives here, with the status it records, and takes its place in the stack of
:mod:`dramaturg.middleware` (before ``Outcomes``), as ``ContextMiddleware`` and
``Resources`` do from their modules.

Senders record a task's first news (queued, delayed, retrying) after each enqueue;
workers note when a task starts and how it ended. Nothing is written here: the
:class:`~dramaturg.status.store.StateStore` buffers it all and its writer thread makes
the records and the per-minute counts (see :mod:`dramaturg.status` for what is kept,
and :mod:`dramaturg.status.store` for why it costs the queue little).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import dramatiq

from ..task import RunOutcome, start_run
from .store import StateStore, queued_fields, store_for

__all__ = ["StatusRecorder", "close_stores"]

logger = logging.getLogger("dramaturg.status")

_HOST = socket.gethostname()


#: The message attribute (on Dramatiq's proxy) holding when this worker started it (wall clock).
_STARTED_AT = "_dramaturg_started_at"


class StatusRecorder(dramatiq.Middleware):
    """Records each task's changes in the :class:`~dramaturg.status.store.StateStore`, and counts outcomes.

    Placed before :class:`~dramaturg.middleware.Outcomes` in the stack, so that its
    after-hook runs once the outcome is decided.
    """

    def __init__(self, url: str | None, ttl_ms: int, namespace: str = "dramaturg") -> None:
        self.url = url
        self.ttl_ms = ttl_ms
        self.namespace = namespace
        self._store: StateStore | None = None
        self._store_lock = threading.Lock()

    def store(self, broker: dramatiq.Broker) -> StateStore:
        """The store of ``broker``, made on first use (raises :class:`~dramaturg.errors.StateUnavailable`)."""
        store = self._store
        if store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = store_for(broker, self.url, self.ttl_ms, self.namespace)
                store = self._store
        return store

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        """Note when the send began: its record is dated then, not after the send returned,
        by which time a worker may have started the task and recorded that (a later date
        would make "queued" win over "running")."""
        if message.options.get("redis_message_id") == message.message_id:
            return
        stamps: dict[str, float] = _sending.__dict__.setdefault("stamps", {})
        if len(stamps) >= 64:
            stamps.clear()  # sends whose after-hook never came (the broker refused them)
        stamps[message.message_id] = time.time()

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        if message.options.get("redis_message_id") == message.message_id:
            return  # a new message on Redis: task_status() finds it in the broker by its id
        stamps: dict[str, float] | None = getattr(_sending, "stamps", None)
        at = stamps.pop(message.message_id, None) if stamps else None
        self.store(broker).record(message.message_id, queued_fields(message, delay), at=at)

    def after_enqueue_many(self, broker: dramatiq.Broker, messages: Sequence[Any], delay: int | None) -> None:
        """The after-hook of a bulk send (:mod:`dramaturg.bulk`): new tasks that share
        their first record (actor, queue, time sent), written as one."""
        messages = [m for m in messages if m.options.get("redis_message_id") != m.message_id]
        if not messages:
            return  # new messages on Redis: task_status() finds them in the broker by their ids
        store = self.store(broker)
        groups: dict[tuple[Any, ...], tuple[dict[str, Any], list[str]]] = {}
        for message in messages:
            fields = queued_fields(message, delay)
            key = tuple(fields.values())
            group = groups.get(key)
            if group is None:
                groups[key] = (fields, [message.message_id])
            else:
                group[1].append(message.message_id)
        for fields, ids in groups.values():
            store.record_new(ids, fields)

    # The worker threads only note what happened (a tuple, under one lock); the records are
    # made by the writer thread at the flush (see store._apply_runs), where a task that started
    # and ended in the same interval costs one record.

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        run = start_run(message)
        inner = getattr(message, "_message", message)  # under Dramatiq's proxy: no __getattr__
        if message.__dict__.get("redelivered") and self._purged(broker, inner.message_id):
            # A queue purge recorded it and then lost its connection before acknowledging
            # it (RabbitMQ): the purge is finished here. Dropped before it runs (by
            # CancelWatch, with every before-hook done), its batch and unique key released
            # as a cancelled task's, and its record stays "purged".
            run.purged = True
            return
        at = time.time()
        # Kept for the end's record, so that both say the same start: recomputed there from
        # the monotonic clock it could differ by a millisecond (the clocks' rounding, drift).
        message.__dict__[_STARTED_AT] = at
        self.store(broker).task_event(("start", inner.message_id, at, inner, _worker_label()))

    def _purged(self, broker: dramatiq.Broker, message_id: str) -> bool:
        """Whether the record of a task delivered again says a purge dropped it: one read,
        for redelivered messages only. A store that does not answer: it runs (at least once)."""
        try:
            found = self.store(broker).get(message_id)
        except Exception as error:
            logger.warning(
                "could not read the record of %s, delivered again (%s: %s); it runs",
                message_id,
                type(error).__name__,
                error,
            )
            return False
        return found is not None and found.get("state") == "purged"

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        run = start_run(message)  # made here only when no before-hook ran (an earlier one raised)
        if run.purged:
            return  # its record says purged, as the purge wrote it
        outcome = run.outcome
        if outcome is RunOutcome.RELEASED or outcome is RunOutcome.UNSETTLED:
            return  # put back untouched (its copy's enqueue said "queued"), or it runs again
        now = time.time()
        inner = getattr(message, "_message", message)
        self.store(broker).task_event(
            (
                "end",
                inner.message_id,
                now,
                inner,
                _worker_label(),
                # The run's start, in wall-clock time: as its start's record said, else from
                # the monotonic start (no before-hook of this middleware ran).
                message.__dict__.get(_STARTED_AT) or now - (time.monotonic() - run.started),
                RunOutcome.SUCCEEDED if outcome is None else outcome,
                run.error,
                run.reason,
                # Outcomes counted the failure in the message's ``retries`` (for Dramatiq's callbacks).
                run.attempt,
            )
        )

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        if self._store is not None:
            self._store.flush()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def close_stores(middleware: Iterable[dramatiq.Middleware]) -> None:
    """Flush and stop the writers of a broker's stores (when the broker is closed)."""
    for item in middleware:
        if isinstance(item, StatusRecorder):
            item.close()


_labels = threading.local()
#: Per thread: when each send under way began (see StatusRecorder.before_enqueue).
_sending = threading.local()


def _worker_label() -> str:
    """``host:pid thread``, computed once per thread."""
    label: str | None = getattr(_labels, "label", None)
    if label is None:
        label = _labels.label = f"{_HOST}:{os.getpid()} {threading.current_thread().name}"
    return label


def _forget_labels() -> None:
    global _labels
    _labels = threading.local()


os.register_at_fork(after_in_child=_forget_labels)  # a forked thread keeps its thread-locals
