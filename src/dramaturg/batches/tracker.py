"""The middleware that keeps batches: members join on send, end after their outcome, callbacks fire.

Where it sits in the stack (:func:`dramaturg.middleware.framework_middleware`): before
``Outcomes``, beside the status recorder, so that its after-hook runs once ``Outcomes``
has decided what became of the run (succeeded, held, rejected, retried), and before the
broker's consumer acknowledges the message.

- **Joining** (``before_enqueue``): a message sent inside ``with batch:``, or from a
  running member of a batch (a member that fans out), is recorded as a member of that
  batch *before* it is sent, and carries the batch id in its ``dramaturg_batch`` option.
  On Redis, with the batches in the broker's own Redis, the join is left on the message
  (:data:`BATCH_JOIN`) and written by the script that enqueues it, in the same step.
  If it cannot be recorded the send fails with :class:`~dramaturg.BatchSendError` and
  nothing is sent; if the send itself fails, the member is taken out again
  (:meth:`BatchTracker.forget_unsent`, and ``after_unsent_many`` for ``send_many``). A
  message that carries the option already (a retry, a release, a kick, a message of
  ``send_many``, whose chunk joined at once) is a member already.
- **Ending** (``after_process_message``): succeeded, held, rejected or cancelled ends the member,
  written before the acknowledgement (:mod:`dramaturg.batches.writer` says why and how
  it stays cheap: a succeeded member's end is written with its acknowledgement on Redis
  and RabbitMQ); a retry or a release makes it wait again. What the end fires is
  published before its message is acknowledged.
- **Firing**: a callback is a copy of the message given as ``on_complete`` /
  ``on_success``, with the batch's summary (:meth:`BatchStatus.to_dict`) as its last
  argument and the message id derived from batch id and event; a batch that is a member
  of another then ends as that member: succeeded when all its members did, cancelled
  when none failed but some were cancelled, else failed (and succeeded later if kicks
  make it so).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import dramatiq

from ..errors import BatchNotFound, BatchSendError, StateUnavailable, TaskHeld
from ..held import durable_write
from ..state_redis import state_redis
from ..task import RunOutcome, Task, current_task_or_none, progress_observers, run_of
from .state import BatchState, End, MemoryBatchState, RedisBatchState
from .summary import from_fields
from .writer import BatchWriter

if TYPE_CHECKING:
    from . import Batch

__all__ = [
    "BATCH_END",
    "BATCH_JOIN",
    "BATCH_OPTION",
    "CALLBACK_OPTION",
    "BatchTracker",
    "callback_id",
    "close_trackers",
    "current_batch_id",
    "tracker_of",
]

logger = logging.getLogger("dramaturg.batches")

#: The message option naming the batch a message is a member of.
BATCH_OPTION = "dramaturg_batch"
#: Where a member's end waits, on the processed message, for the acknowledgement that
#: writes it (Redis, RabbitMQ; see :meth:`BatchTracker.after_process_message`): (batch
#: keys' prefix, ttl ms, batch id, member id, code).
BATCH_END = "_dramaturg_batch_end"
#: Where a member's join waits, on the message being enqueued, for the enqueue that writes
#: it (the Redis broker, batches in its own Redis; see :meth:`BatchTracker.before_enqueue`):
#: (batch keys' prefix, batch id). The broker puts None there first to say it can.
BATCH_JOIN = "_dramaturg_batch_join"
#: The message option of a batch's callback (the batch id): it joins no batch.
CALLBACK_OPTION = "dramaturg_batch_of"
#: The namespace of callbacks' message ids (uuid5 of "<batch id>:<event>").
_CALLBACK_IDS = uuid.UUID("5b0f6f8e-4a8e-4b38-9a55-2b8d3d1f6c41")

#: How often a worker process looks for callbacks left unpublished (:meth:`BatchTracker.refire`)...
REFIRE_EVERY_S = 30.0
#: ...that have been firing for longer than this: much longer than the durable write's
#: tries of the publisher that fired them, which has given up by then.
REFIRE_AFTER_MS = 60_000
#: At most this many batches per look (each taken alone, just before it is published, so
#: that a slow publish never outlasts the others' takes).
REFIRE_LIMIT = 100
#: How many callbacks this process published, remembered (see BatchTracker._published).
PUBLISHED_KEPT = 10_000

#: The batch whose ``with`` block this thread (or coroutine) is in.
_current: ContextVar[Batch | None] = ContextVar("dramaturg_current_batch", default=None)


def current_batch_id() -> str | None:
    """The batch a message sent here joins: the ``with`` block's, else the running member's."""
    batch = _current.get()
    if batch is not None:
        return batch.id
    task = current_task_or_none()
    if task is not None:
        found = task.message.options.get(BATCH_OPTION)
        return str(found) if found else None
    return None


def callback_id(batch_id: str, event: str) -> str:
    """The message id of the callback ``event`` ("complete", "success") of a batch: the same
    for every publish of it."""
    return str(uuid.uuid5(_CALLBACK_IDS, f"{batch_id}:{event}"))


class BatchTracker(dramatiq.Middleware):
    """Keeps the batches of a broker (see the module). ``url``: ``[state] url``; ``ttl_ms``:
    ``[batch] ttl``."""

    def __init__(self, url: str | None, ttl_ms: int, namespace: str = "dramaturg") -> None:
        self.url = url
        self.ttl_ms = ttl_ms
        self.namespace = namespace
        self._state: BatchState | None = None
        self._writer: BatchWriter | None = None
        self._lock = threading.Lock()
        self._broker: dramatiq.Broker | None = None
        #: Per thread: the member joined by the last ``send()`` until its enqueue is done
        #: (see :meth:`forget_unsent`).
        self._sending = _Sending()
        #: Per worker of this process (by id): set when it stops, to end its refire thread
        #: (see :meth:`after_worker_boot`).
        self._refire_stops: dict[int, threading.Event] = {}
        #: The callbacks this process published, (batch id, event), the newest
        #: :data:`PUBLISHED_KEPT`: a fire tried again after its "published" mark failed
        #: (its owner retrying the member's end) marks them, and does not publish them again.
        #: Written by every thread that publishes (acknowledgements, end writers, seals, the
        #: refire sweep) without a lock: an OrderedDict, whose ``popitem`` evicts the oldest in
        #: one step (a dict's ``pop(next(iter(...)))`` raised when another thread inserted
        #: between its iter and its next).
        self._published: OrderedDict[tuple[str, str], None] = OrderedDict()
        #: (batch id, event) -> when this process's publishes of it began failing (monotonic):
        #: an owner stops keeping its member for it after :data:`REFIRE_AFTER_MS`.
        self._failing_since: dict[tuple[str, str], float] = {}
        #: What :meth:`_ends_with_ack` found, and for which broker (it does not change).
        self._with_ack: tuple[dramatiq.Broker, bool] | None = None
        if self._observe_progress not in progress_observers:
            progress_observers.append(self._observe_progress)

    # -- the store ---------------------------------------------------------------------------

    def state(self, broker: dramatiq.Broker) -> BatchState:
        """The store of ``broker``'s batches, made on first use (raises :class:`~dramaturg.StateUnavailable`)."""
        if self._state is None:
            with self._lock:
                if self._state is None:
                    self._state = self._make_state(broker)
                    self._broker = broker
        return self._state

    def _make_state(self, broker: dramatiq.Broker) -> BatchState:
        if getattr(broker, "runs_inline", False):
            return MemoryBatchState(ttl_ms=self.ttl_ms)
        client = state_redis(broker, self.url, needs="batches need")
        return RedisBatchState(client, namespace=self.namespace, ttl_ms=self.ttl_ms)

    def writer(self, broker: dramatiq.Broker) -> BatchWriter:
        writer = self._writer
        if writer is None:
            state = self.state(broker)
            with self._lock:
                if self._writer is None:
                    # Whole before it is published: writer()'s fast path reads it without the lock.
                    fresh = BatchWriter(state)
                    fresh.on_written = lambda written: self._fire_written(broker, written)
                    self._writer = fresh
                writer = self._writer
        return writer

    # -- joining -----------------------------------------------------------------------------

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        options = message.options
        if BATCH_OPTION in options or CALLBACK_OPTION in options or "dramaturg_kicks" in options:
            return  # a member already, a callback, or a held task kicked (never the kicker's member)
        batch_id = current_batch_id()
        if batch_id is not None:
            self.forget_unsent(broker)
            if BATCH_JOIN in message.__dict__ and self._joins_with_enqueue(broker):
                # Joined by the script that enqueues it (Redis: see the broker's enqueue),
                # in the same step: no call of its own, and a send that fails leaves no
                # member behind. A batch that is gone fails the send there.
                state: Any = self._state
                message.__dict__[BATCH_JOIN] = (state.prefix, batch_id)
                options[BATCH_OPTION] = batch_id
                return
            self.join(broker, batch_id, [message])
            self._sending.member = (batch_id, message.message_id)

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        member = self._sending.member
        if member is not None and member[1] == message.message_id:
            self._sending.member = None  # sent: a member for good

    def after_enqueue_many(self, broker: dramatiq.Broker, messages: Sequence[Any], delay: int | None) -> None:
        """Nothing: ``send_many``'s members are told apart by :meth:`after_unsent_many` (this
        only keeps a bulk send from calling :meth:`after_enqueue` for each message)."""

    def forget_unsent(self, broker: dramatiq.Broker) -> None:
        """Take out of its batch the member this thread's last ``send()`` joined, if that
        send never got to its after-hook (the broker refused it, or did not answer).

        Dramatiq has no hook for a failed send, so this is done at the next moment that
        matters: the thread's next send into a batch, the end of the ``with`` block, the
        end of the member whose handler sent it. If that send did reach the queue after
        all (a lost confirm), the member rejoins when it ends (an end counts a member it
        does not know).
        """
        member = self._sending.member
        if member is None:
            return
        self._sending.member = None
        try:
            events = self.state(broker).drop(member[0], [member[1]])
        except Exception:
            logger.warning("could not take unsent message %s out of batch %s", member[1], member[0], exc_info=True)
            return
        if events:
            self.fire(broker, member[0], events)

    def after_unsent_many(self, broker: dramatiq.Broker, messages: Sequence[Any]) -> None:
        """Messages of ``send_many`` certainly not sent (a chunk that failed) leave their batch."""
        by_batch: dict[str, list[str]] = {}
        for message in messages:
            batch_id = message.options.get(BATCH_OPTION)
            if batch_id:
                by_batch.setdefault(batch_id, []).append(message.message_id)
        for batch_id, member_ids in by_batch.items():
            events = self.state(broker).drop(batch_id, member_ids)
            if events:
                self.fire(broker, batch_id, events)

    def join(self, broker: dramatiq.Broker, batch_id: str, messages: Sequence[Any]) -> None:
        """Record ``messages`` as members of ``batch_id``, then mark them so; raises
        :class:`~dramaturg.BatchSendError` when they could not be recorded."""
        try:
            self.state(broker).add(batch_id, [message.message_id for message in messages])
        except BatchNotFound:
            raise BatchSendError(f"batch {batch_id!r} is gone (expired); the message was not sent") from None
        except StateUnavailable as error:
            raise BatchSendError(f"{error}; the message was not sent") from None
        except Exception as error:
            raise BatchSendError(
                f"the state store did not record the batch member ({type(error).__name__}: {error});"
                " the message was not sent"
            ) from None
        for message in messages:
            message.options[BATCH_OPTION] = batch_id

    def before_send_many(self, broker: dramatiq.Broker, messages: Sequence[Any]) -> None:
        """A chunk of ``send_many``: joins as one (see :mod:`dramaturg.bulk`)."""
        batch_id = current_batch_id()
        if batch_id is not None:
            self.join(broker, batch_id, [m for m in messages if BATCH_OPTION not in m.options])

    # -- running and ending ------------------------------------------------------------------

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self._broker = broker  # for progress(), which has the task but not its broker
        inner = getattr(message, "_message", message)  # not through the proxy: see _options
        batch_id = inner.options.get(BATCH_OPTION)
        if batch_id:
            (self._writer or self.writer(broker)).start(inner.message_id, batch_id)

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        if self._sending.member is not None:
            self.forget_unsent(broker)  # a send of its handler failed
        inner = getattr(message, "_message", message)  # not through the proxy: see _options
        batch_id = inner.options.get(BATCH_OPTION)
        if not batch_id:
            return
        member_id = inner.message_id
        writer = self._writer or self.writer(broker)
        writer.running.pop(member_id, None)  # not running here any more, whatever became of it
        run = run_of(message)
        outcome = None if run is None else run.outcome
        if outcome is None or outcome is RunOutcome.SUCCEEDED:
            if self._ends_with_ack(broker):
                # Written with the acknowledgement (Redis: in the same script, see settle.lua;
                # RabbitMQ: by the process's end writer thread, many in one call, before it
                # hands their acks to the consumers): durable no later than the ack, and no
                # call of its own.
                state: Any = self._state
                message.__dict__[BATCH_END] = (state.prefix, state.ttl_ms, batch_id, member_id, "s")
                return
            code = "s"
        elif outcome is RunOutcome.HELD:
            code = "h"
        elif outcome is RunOutcome.REJECTED:
            code = "f"
        elif outcome is RunOutcome.CANCELLED:
            code = "c"
        else:  # retried, released: it runs again; unsettled: the broker gives it back
            writer.note((batch_id, member_id, "w", ""))
            return
        events = writer.end_durably((batch_id, member_id, code))
        if events:
            self.fire(broker, batch_id, events)

    def _joins_with_enqueue(self, broker: dramatiq.Broker) -> bool:
        """Whether a member's join can go with its enqueue: the batches are in the broker's
        own Redis (no ``[state] url``), as for :meth:`_ends_with_ack`."""
        if self.url is not None:
            return False
        try:
            state = self.state(broker)
        except Exception:
            return False  # join() says why, as a BatchSendError
        return isinstance(state, RedisBatchState)

    def _ends_with_ack(self, broker: dramatiq.Broker) -> bool:
        """Whether members' ends go with their acknowledgements: the Redis broker's
        settling, with the batches in that same Redis (no ``[state] url``); or the RabbitMQ
        consumers', whose end writer thread writes the ends of the messages the worker
        threads acknowledge, many in one call, then has them acknowledged
        (:mod:`dramaturg.brokers.rabbitmq.ends`)."""
        known = self._with_ack
        if known is not None and known[0] is broker:
            return known[1]  # asked for every member: the lookups below cost a microsecond
        if not isinstance(self._state, RedisBatchState):
            return False
        # A miss on Dramatiq's RedisBroker goes through its __getattr__, which raises.
        value = bool(getattr(broker, "acks_write_batch_ends", False)) or (
            self.url is None and hasattr(broker, "settler")
        )
        self._with_ack = (broker, value)
        return value

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        batch_id = _options(message).get(BATCH_OPTION)
        if batch_id:
            writer = self.writer(broker)
            writer.running.pop(message.message_id, None)  # skipped after this tracker's start
            writer.note((batch_id, message.message_id, "w", ""))

    def _observe_progress(self, task: Task, fraction: float, text: str) -> None:
        broker = self._broker
        if broker is None:
            return
        value = f"{fraction:.4f}|{text[:200]}"
        try:
            writer = self.writer(broker)
        except StateUnavailable:
            return  # no store (RabbitMQ without [state] url): progress is kept nowhere
        writer.task_progress(task.message_id, value)
        batch_id = task.message.options.get(BATCH_OPTION)
        if batch_id:
            writer.note((batch_id, task.message_id, "g", value))

    # -- firing ------------------------------------------------------------------------------

    def seal(self, broker: dramatiq.Broker, batch_id: str) -> None:
        """Seal the batch; publish what that fires (all its members had ended already)."""
        self.forget_unsent(broker)
        events = self.state(broker).seal(batch_id)
        if events:
            self.fire(broker, batch_id, events)

    def fire(self, broker: dramatiq.Broker, batch_id: str, events: Sequence[str], *, strict: bool = False) -> None:
        """Publish the callbacks of ``events``; end the batch as a member of its parent.

        A callback that cannot be published (after :func:`~dramaturg.held.durable_write`'s
        tries) leaves its event "firing": a repeated end of the member publishes it again.
        ``strict``: raise that error once the others are done, for a caller that then
        leaves the member's message unacknowledged, so that it is tried again (the Redis
        consumer's acknowledgement, the RabbitMQ end writer: the "owners" of what their
        ends fire); without it the error is logged and the member's message is
        acknowledged all the same (an end written from a worker's after-hook), the batch
        waiting in the firing index for the workers' sweep (:meth:`refire`).

        A callback this process published already (its "published" mark failed) is only
        marked. An owner stops keeping its member for a callback that is refused rather
        than out of reach, or that has failed for :data:`REFIRE_AFTER_MS`: the batch goes
        to the firing index (``disown``) and the member is acknowledged.
        """
        state = self.state(broker)
        read = state.read(batch_id)
        if read is None:
            return
        meta, progress = read
        summary = from_fields(batch_id, meta, progress).to_dict()
        held: TaskHeld | None = None
        failed: Exception | None = None
        for event in events:
            stored = meta.get(f"on_{event}")
            key = (batch_id, event)
            if stored and key not in self._published:
                try:
                    self._publish(broker, batch_id, event, json.loads(stored), summary)
                except TaskHeld as error:  # eager mode: the callback ran and was held
                    held = held or error
                except Exception as error:
                    if len(self._failing_since) > PUBLISHED_KEPT:
                        self._failing_since.clear()
                    since = self._failing_since.setdefault(key, time.monotonic())
                    if strict and (not _passing(error) or time.monotonic() - since > REFIRE_AFTER_MS / 1000):
                        # It would fail again however often the member's end is tried (a
                        # unique key another task holds, a limit's key that cannot be made,
                        # a queue RabbitMQ refuses), or it has failed for a minute: the
                        # member's message is not kept for it (that holds a worker thread,
                        # or a delivery). Left to the workers' sweep, which tries it every
                        # minute, with this line each time.
                        state.disown(batch_id)
                        self._failing_since.pop(key, None)
                        logger.error(
                            "could not publish on_%s of batch %s (%s: %s); left to be published again later",
                            event,
                            batch_id,
                            type(error).__name__,
                            error,
                        )
                        continue
                    # Left "firing": a repeated end of this member (it runs again if its
                    # worker dies before acknowledging it) publishes it again.
                    logger.error(
                        "could not publish on_%s of batch %s (%s: %s); %s",
                        event,
                        batch_id,
                        type(error).__name__,
                        error,
                        "its last member's message stays unacknowledged, to try again" if strict else "it is not sent",
                    )
                    failed = failed or error
                    continue
                self._failing_since.pop(key, None)
                self._published[key] = None
                if len(self._published) > PUBLISHED_KEPT:
                    self._published.popitem(last=False)
            mark_error = durable_write(functools.partial(state.sent, batch_id, event))
            if mark_error is not None:
                # Published, not marked: an owner tries again (and only marks it, see
                # _published); otherwise the sweep finds its trace and marks it.
                logger.warning(
                    "on_%s of batch %s was published, but could not be marked so (%s: %s)",
                    event,
                    batch_id,
                    type(mark_error).__name__,
                    mark_error,
                )
                failed = failed or mark_error
        parent = meta.get("parent")
        if parent:
            code = "s" if int(meta.get("succeeded", 0)) == int(meta.get("total", 0)) else "f"
            if code == "f" and int(meta.get("failed", 0)) == 0:
                code = "c"  # none failed: some were cancelled
            parent_events = self.writer(broker).end_durably((parent, meta.get("parent_member", ""), code))
            if parent_events:
                self.fire(broker, parent, parent_events)
        if held is not None:
            raise held
        if strict and failed is not None:
            raise failed

    def _publish(
        self, broker: dramatiq.Broker, batch_id: str, event: str, stored: dict[str, Any], summary: dict[str, Any]
    ) -> None:
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=stored["queue_name"],
            actor_name=stored["actor_name"],
            args=(*stored.get("args", ()), summary),
            kwargs=stored.get("kwargs") or {},
            options={**(stored.get("options") or {}), CALLBACK_OPTION: batch_id},
            message_id=callback_id(batch_id, event),
            message_timestamp=int(time.time() * 1000),
        )
        if getattr(broker, "runs_inline", False):
            broker.enqueue(message)  # eager: runs it now; a hold raises TaskHeld
            return
        error = durable_write(lambda: broker.enqueue(message))
        if error is not None:
            raise error

    def refire(self, broker: dramatiq.Broker) -> int:
        """Publish again the callbacks left firing for over :data:`REFIRE_AFTER_MS`; how
        many batches were tried.

        A callback whose publish failed after the durable write's tries, where nothing
        tries it again (an end written by a worker's after-hook: a member held, rejected or
        cancelled; a seal; a purge), would leave its batch "firing" for good. ``batch.lua``
        keeps such batches in its firing index until their callbacks are out; each worker
        process looks there every :data:`REFIRE_EVERY_S`, and the one that takes a batch
        (taken for as long again) publishes it, with the callback's own message id.

        A callback that was published after all (its "published" mark lost: the publisher
        killed between the two, the state store failing in that moment) has left a trace:
        its record in the state store (queued, running, ended, held; on Redis also the
        message itself while it waits). Such a callback is only marked published, not
        published again.

        Each batch is taken alone, just before its callbacks are published, so that a slow
        publish never outlasts the take of another batch (whose callbacks another worker
        would then publish too). If its trace cannot be read, the batch waits for a later
        look. Either way the batch then ends as a member of its parent, as :meth:`fire`
        ends it (a repeated end counts once): the publisher may have been killed before.
        """
        state = self.state(broker)
        tried = 0
        while tried < REFIRE_LIMIT:
            taken = state.stale(REFIRE_AFTER_MS, 1)
            if not taken:
                break
            tried += 1
            batch_id = taken[0]
            read = state.read(batch_id)
            if read is None:
                continue  # expired meanwhile: the next look drops it from the index
            events: list[str] = []
            try:
                for event in ("complete", "success"):
                    if read[0].get(event) != "firing":
                        continue
                    if _was_published(broker, callback_id(batch_id, event)):
                        state.sent(batch_id, event)
                    else:
                        events.append(event)
            except Exception as error:
                logger.warning(
                    "batch %s: could not tell whether its callbacks went out (%s: %s); looked at again later",
                    batch_id,
                    type(error).__name__,
                    error,
                )
                continue
            if events:
                logger.warning("batch %s: publishing on_%s again (left unpublished)", batch_id, "/on_".join(events))
            self.fire(broker, batch_id, events)
        return tried

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Start the thread that publishes callbacks left unpublished (:meth:`refire`), on a
        broker with a queue and a state store."""
        if getattr(broker, "runs_inline", False):
            return
        stop = self._refire_stops[id(worker)] = threading.Event()
        threading.Thread(
            target=self._refire_loop, args=(broker, stop), name="dramaturg-batch-refire", daemon=True
        ).start()

    def _refire_loop(self, broker: dramatiq.Broker, stop: threading.Event) -> None:
        failing = False
        while not stop.wait(REFIRE_EVERY_S):
            try:
                self.refire(broker)
            except StateUnavailable:
                return  # no state store (RabbitMQ without [state] url): no batches
            except Exception as error:
                if not failing:
                    logger.warning(
                        "could not look for batch callbacks left unpublished (%s: %s); trying again",
                        type(error).__name__,
                        error,
                    )
                failing = True
            else:
                failing = False

    def _fire_written(self, broker: dramatiq.Broker, written: list[tuple[End, list[str]]]) -> None:
        for (batch_id, _, _), events in written:
            if events:
                self.fire(broker, batch_id, events)

    # -- the end -----------------------------------------------------------------------------

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        stop = self._refire_stops.pop(id(worker), None)
        if stop is not None:
            stop.set()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        for stop in list(self._refire_stops.values()):
            stop.set()
        if self._observe_progress in progress_observers:
            progress_observers.remove(self._observe_progress)
        if self._writer is not None:
            self._writer.close()
        if self._state is not None:
            self._state.close()


class _Sending(threading.local):
    """Per thread: the member joined by the thread's last ``send()`` until its enqueue is
    done. None by default, so that the after-hook of every task reads it without an
    AttributeError raised and caught (about half a microsecond)."""

    member: tuple[str, str] | None = None


def _passing(error: BaseException) -> bool:
    """Whether a publish failed for a cause that passes: the broker or the store out of
    reach (a lost connection, a timeout), rather than the message refused."""
    if isinstance(error, (dramatiq.errors.BrokerConnectionError, OSError)):
        return True
    try:
        import redis
    except ImportError:  # a RabbitMQ-only install
        return False
    return isinstance(error, (redis.ConnectionError, redis.TimeoutError))


def _was_published(broker: dramatiq.Broker, message_id: str) -> bool:
    """Whether the task ``message_id`` left a trace: its record in the state store (queued,
    running, ended, held), or on Redis the message waiting in its queue. Raises when the
    store cannot say. (Not the held stores: on RabbitMQ a lookup there reads every held
    queue; a held task's record says held.)"""
    from ..status import state_store

    try:
        store = state_store(broker)
    except StateUnavailable:
        store = None  # task status is off
    if store is not None and store.get(message_id) is not None:
        return True
    if getattr(broker, "finds_messages", False):
        return broker.find_message(message_id) is not None  # type: ignore[attr-defined]
    return False


def tracker_of(broker: dramatiq.Broker) -> BatchTracker:
    """The :class:`BatchTracker` of ``broker`` (raises :class:`~dramaturg.StateUnavailable` without one)."""
    for middleware in broker.middleware:
        if isinstance(middleware, BatchTracker):
            return middleware
    raise StateUnavailable("batches need the batch middleware: the broker was not made by dramaturg.bootstrap()")


def close_trackers(middleware: Sequence[dramatiq.Middleware]) -> None:
    """Write what the batch trackers of a broker's stack buffer, and stop their threads."""
    for item in middleware:
        if isinstance(item, BatchTracker):
            item.close()


def _options(message: Any) -> dict[str, Any]:
    """A processed message's options, from the message under Dramatiq's proxy: the proxy's
    ``__getattr__`` costs about 1 us, on every task whether or not it is in a batch."""
    options: dict[str, Any] = getattr(message, "_message", message).options
    return options
