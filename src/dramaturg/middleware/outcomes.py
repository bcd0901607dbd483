"""What a handler did becomes what happens to its message: done, retried, or held.

Dramatiq's ``Retries`` middleware is replaced, not extended, because its semantics
cannot give ours: it dead-letters a task whose retries are exhausted (where it expires
after a week), cannot hold one on purpose, and publishes the retry copy in an
after-hook whose failure Dramatiq logs and then acknowledges the original anyway, so a
failed publish loses the task. Here:

- a normal return (or ``success()``) acknowledges the message;
- ``retry(delay)``, Dramatiq's ``Retry``, or any other exception publishes a copy with
  ``retries`` + 1 after the delay (or an exponential backoff with jitter), and the
  original is acknowledged only once the copy is published (with confirms on RabbitMQ);
- a task cancelled on request (:func:`dramaturg.cancel`: skipped when taken, or
  interrupted while it runs) is acknowledged, never retried nor held;
- ``hold(reason)``, an exception listed in the actor's ``hold_on``, or a failure after
  ``max_retries`` retries stores the task in the held store with its reason, traceback
  and attempts, and only then acknowledges the original;
- if the copy cannot be published or the held store cannot be written (after a few
  tries), the original is *not* acknowledged. When the broker could not be reached (the
  broker says which errors mean that: Redis's connection errors and timeouts), it is
  left *unsettled*, neither acknowledged nor rejected: on Redis its claim stays, and the
  worker gives it back to its queue once Redis answers (or another worker recovers it),
  so it runs again; an ERROR line says so. Rejecting it then would dead-letter a task
  for an outage, and the write may even have happened (a timeout). Any other failure
  rejects it into the broker's dead-letter queue, and a CRITICAL line says so. The same
  goes for a release (a task put back untouched by a stopping worker or a suspended
  queue) that cannot be published.

What code written for Dramatiq sees stays as under Dramatiq's ``Retries``: a failure
that counts toward ``max_retries`` sets the message's ``retries`` (failed attempts so
far), ``traceback`` and ``requeue_timestamp`` options before the ``on_failure``
callbacks run, and the retry copy carries them; ``max_backoff`` caps the backoff even
below ``min_backoff`` (``max_backoff=100`` means fast retries, as on Dramatiq); a held
task reports its failure to Dramatiq's ``Results`` backends (``get_result`` raises
``ResultFailure``) as a dead-lettered one does there; and a rate-limited task
(Dramatiq's ``RateLimitExceeded``) is retried with a DEBUG line, not a WARNING.

Every failure logs one line: actor, message id, attempt, exception type and message,
the file:line where it was raised, and what happens next; the same come as structured
fields (``extra={"dramaturg": {...}}``, with the traceback and, for a retry, when it is
due) for the JSON log format (:mod:`dramaturg.logs`). Dramatiq's own multi-line
"Failed to process message" error for the same failure is filtered out.

Actor options: ``max_retries``, ``min_backoff``, ``max_backoff`` (ms), ``hold_on``
(exception classes held at once). Per message: the same names in ``send_with_options``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.errors import RateLimitExceeded
from dramatiq.errors import Retry as DramatiqRetry
from dramatiq.middleware import SkipMessage
from dramatiq.results import Results

from .. import suspension
from ..held import HeldTask, describe, durable_write, hold_poison, origin
from ..logs import iso_utc
from ..queues import canonical_queue
from ..task import (
    Hold,
    Retry,
    RunOutcome,
    SuspendQueue,
    Task,
    TaskOutcome,
    outcome_of,
    set_current_task,
    start_run,
    taken_back,
)
from ..unknown_actors import unknown_actor_reason
from .shutdown import stopping
from .ttr import StopRequested, TaskCancelled, TimeToRunExceeded

__all__ = ["Outcomes", "StopRequested", "hold_poison", "outcome_of", "unknown_actor_reason"]

logger = logging.getLogger("dramaturg.outcomes")


class Outcomes(dramatiq.Middleware):
    """Decides each message's outcome (see the module docstring)."""

    def __init__(self, *, max_retries: int = 20, min_backoff: int = 15_000, max_backoff: int = 600_000) -> None:
        self.max_retries = max_retries
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        _silence_dramatiq_failure_lines()

    @property
    def actor_options(self) -> set[str]:
        return {"max_retries", "min_backoff", "max_backoff", "hold_on"}

    def option(self, message: Any, actor: Any, name: str, default: Any) -> Any:
        """An option resolved as message > actor > this middleware's default."""
        value = message.options.get(name)
        if value is None:
            value = actor.options.get(name, default)
        return value

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        set_current_task(Task(message, start_run(message)))
        if (stopping and threading.current_thread() in stopping) or suspension.remaining_s(
            canonical_queue(message.queue_name)
        ) > 0:
            # Taken by a thread told to stop, or before its queue was suspended: back it goes, unstarted.
            error = self._release(broker, message)
            if error is not None and _undone(broker, message, error) is RunOutcome.REJECTED:
                logger.critical("message %s could not be requeued; rejected into the dead-letter queue", message)
            elif error is not None:
                logger.error("message %s could not be requeued; %s", message, _UNSETTLED)
            raise SkipMessage("its worker is stopping, or its queue is suspended on this worker")
        if message.options.get("dramaturg_rerun"):
            logger.warning(
                "%s (message %s) runs again: it was interrupted when a worker stopped",
                message.actor_name,
                message.message_id,
            )
        elif message.__dict__.get("redelivered"):  # RabbitMQ's flag (getattr costs 1.3 us elsewhere)
            logger.info(
                "%s (message %s) was delivered again: a consumer that had it let go without acknowledging it"
                " (a worker stopped, died or lost its connection, a queue was suspended, or RabbitMQ's"
                " consumer_timeout closed the channel); if it had started, this run repeats it",
                message.actor_name,
                message.message_id,
            )

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        set_current_task(None)

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        set_current_task(None)
        if exception is None:
            return
        try:
            self.settle(broker, message, exception)
        except Exception:
            # Dramatiq would log this and acknowledge the message anyway: reject it instead.
            _reject(message)
            logger.critical(
                "could not settle message %s (%s); it is rejected into the dead-letter queue, not acknowledged",
                message.message_id,
                message.actor_name,
                exc_info=True,
            )

    def settle(self, broker: dramatiq.Broker, message: Any, exception: BaseException) -> None:
        """Retry or hold a message whose handler raised ``exception``."""
        actor = broker.get_actor(message.actor_name)
        retries = int(message.options.get("retries", 0))
        max_retries = int(self.option(message, actor, "max_retries", self.max_retries))
        hold_on = self.option(message, actor, "hold_on", ())
        queue = canonical_queue(message.queue_name)

        if isinstance(exception, StopRequested):
            # Interrupted because the worker stops: not the task's fault, not an attempt.
            error = self._release(broker, message, rerun=True)
            level = logging.WARNING
            next_step = "interrupted as its worker stopped; requeued untouched, it will run again"
            if error is not None:
                level, next_step = _after_failed_write(
                    broker, message, error, "interrupted as its worker stopped; could not be requeued"
                )
            _log_failure(level, message, exception, retries, max_retries, next_step)
            return

        if isinstance(exception, TaskCancelled):
            # Cancelled on request (dramaturg.cancel): done with, not the task's failure.
            run = start_run(message)
            run.outcome = RunOutcome.CANCELLED
            logger.info(
                "%s (message %s, attempt %d) was %s; acknowledged, not retried",
                message.actor_name,
                message.message_id,
                retries + 1,
                "purged from its queue, and delivered again as the purge lost its connection; dropped, not run"
                if run.purged
                else "cancelled while it ran"
                if str(exception) != "cancelled before it ran"
                else "cancelled before it ran",
                extra={
                    "dramaturg": {
                        "actor": message.actor_name,
                        "message_id": message.message_id,
                        "queue": queue,
                        "attempt": retries + 1,
                        "next": "cancelled",
                    }
                },
            )
            return

        if isinstance(exception, SuspendQueue) and getattr(broker, "runs_inline", False):
            # Eager mode: there is no queue to leave alone, and the caller is waiting.
            exception = Hold(f"queue {queue!r} suspended for {exception.delay_ms} ms: {exception.reason}")
        if isinstance(exception, SuspendQueue):
            suspension.suspend(queue, exception.delay_ms)
            error = self._release(broker, message)
            level, next_step = logging.WARNING, "the task is requeued untouched"
            if error is not None:
                level, next_step = _after_failed_write(broker, message, error, "the task could not be requeued")
            logger.log(
                level,
                "%s (message %s) suspended queue %r on this worker for %d ms: %s; %s",
                message.actor_name,
                message.message_id,
                queue,
                exception.delay_ms,
                exception.reason,
                next_step,
                extra={
                    "dramaturg": {
                        "actor": message.actor_name,
                        "message_id": message.message_id,
                        "queue": queue,
                        "attempt": retries + 1,
                        "next": next_step.removeprefix("the task ").removeprefix("is "),
                    }
                },
            )
            return

        run = start_run(message)
        if not isinstance(exception, TaskOutcome):  # an error, not retry()/hold() (for the state store)
            run.error = _error_line(exception)
        # hold() and hold_on (what Dramatiq's ``throws`` is for) do not count toward
        # max_retries; every other failure does, as under Dramatiq's Retries.
        counted = not isinstance(exception, Hold) and not (hold_on and isinstance(exception, hold_on))
        if isinstance(exception, Hold):
            reason: str | None = exception.reason
        elif hold_on and isinstance(exception, hold_on):
            reason = f"{type(exception).__name__}: {exception}"
        elif retries >= max_retries:
            reason = "TTR exceeded" if isinstance(exception, TimeToRunExceeded) else "retries exhausted"
        else:
            reason = None  # retry

        dramatiq_options = _dramatiq_retry_options(exception, retries) if counted else {}
        rate_limited = isinstance(exception, RateLimitExceeded)
        if reason is None:
            delay = self.delay_ms(message, actor, exception, retries)
            copy = message.copy(
                queue_name=queue,
                options={
                    **dramatiq_options,
                    "dramaturg_last_error": _error_line(exception),
                    "dramaturg_rerun": False,
                },
            )
            error = durable_write(lambda: _enqueue_copy(broker)(copy, delay=delay))
            done = error is None
            next_step = f"retrying in {delay} ms" if done else "the retry could not be published"
            retry_at = time.time() + delay / 1000 if done else None
            level = logging.DEBUG if rate_limited else logging.WARNING  # Dramatiq logs a rate limit at DEBUG
            run.outcome = RunOutcome.RETRIED
        else:
            retry_at = None
            task = HeldTask.from_message(message, reason, queue_name=queue, exception=exception)
            error = durable_write(lambda: broker.held.hold(task))  # type: ignore[attr-defined]
            done = error is None
            next_step = f"held: {reason}" if done else f"could not be held ({reason})"
            level = logging.WARNING if isinstance(exception, Hold) or rate_limited else logging.ERROR
            run.outcome = RunOutcome.HELD
            run.reason = reason
            if done:
                _report_to_result_backends(broker, message, exception)
        if error is not None:
            level, next_step = _after_failed_write(broker, message, error, next_step)
        _log_failure(level, message, exception, retries, max_retries, next_step, retry_at=retry_at)
        if dramatiq_options:
            # Last, once the copy and the held task are made from the options as they came, and
            # before the on_failure callbacks (whose after-hooks run after this one) read them.
            run.attempt = retries + 1  # the run that ended, for the state store
            message.options.update(dramatiq_options)

    def release(self, broker: dramatiq.Broker, message: Any, *, rerun: bool = False) -> bool:
        """Put ``message`` back on its queue untouched (the attempt is not counted).

        ``rerun`` marks a task that had started, so that its next run is logged.
        False when the copy could not be published.
        """
        return self._release(broker, message, rerun=rerun) is None

    def _release(self, broker: dramatiq.Broker, message: Any, *, rerun: bool = False) -> Exception | None:
        """:meth:`release`, returning why the copy could not be published (None: it was)."""
        # A copy put back unstarted keeps the mark of a task that had started before.
        rerun = rerun or bool(message.options.get("dramaturg_rerun"))
        start_run(message).outcome = RunOutcome.RELEASED
        if taken_back(message):  # RabbitMQ delivers it again by itself (marked redelivered)
            return None
        copy = message.copy(queue_name=canonical_queue(message.queue_name), options={"dramaturg_rerun": rerun})
        return durable_write(lambda: _enqueue_copy(broker)(copy))

    def delay_ms(self, message: Any, actor: Any, exception: BaseException, retries: int) -> int:
        """The explicit delay of a retry, else the backoff for this retry."""
        if isinstance(exception, Retry) and exception.delay_ms is not None:
            return exception.delay_ms
        if isinstance(exception, DramatiqRetry) and exception.delay is not None:
            return int(exception.delay)
        min_backoff = int(self.option(message, actor, "min_backoff", self.min_backoff))
        max_backoff = int(self.option(message, actor, "max_backoff", self.max_backoff))
        return backoff_ms(retries, min_backoff, max_backoff)


#: What a log line says of an unsettled message.
_UNSETTLED = (
    "the broker cannot be reached: it is left unsettled (neither acknowledged nor rejected) and runs again"
    " once the broker answers"
)


def _undone(broker: dramatiq.Broker, message: Any, error: Exception) -> RunOutcome:
    """After the durable write of ``message``'s outcome failed with ``error``: leave it
    unsettled if the broker could not be reached (its ``unreachable(error)`` says so), else
    reject it into the dead-letter queue. Returns the outcome, unsettled or rejected."""
    unreachable: Callable[[BaseException], bool] | None = getattr(broker, "unreachable", None)
    if unreachable is not None and unreachable(error):
        start_run(message).outcome = RunOutcome.UNSETTLED  # the broker's consumer lets it go, unsettled
        return RunOutcome.UNSETTLED
    _reject(message)
    return RunOutcome.REJECTED


def _reject(message: Any) -> None:
    """Have Dramatiq reject ``message`` into the dead-letter queue instead of acknowledging
    it, and record so in its run (the metrics, the status and drains count it rejected)."""
    message.fail()
    start_run(message).outcome = RunOutcome.REJECTED


def _after_failed_write(broker: dramatiq.Broker, message: Any, error: Exception, what: str) -> tuple[int, str]:
    """The log level and next step of a message whose outcome (``what`` failed) could not
    be written: unsettled, or rejected (see :func:`_undone`)."""
    if _undone(broker, message, error) is RunOutcome.UNSETTLED:
        return logging.ERROR, f"{what}; {_UNSETTLED}"
    return logging.CRITICAL, f"{what}; the message is rejected into the dead-letter queue"


def backoff_ms(retries: int, min_backoff: int, max_backoff: int) -> int:
    """``min_backoff * 2**retries`` plus up to half again of jitter, within [min, max].

    Unlike Dramatiq's (which may halve the delay), ``min_backoff`` is a real minimum, up to
    ``max_backoff``: a ``max_backoff`` below ``min_backoff`` wins, so that
    ``@actor(max_backoff=200)`` under the inherited 15 s minimum retries within 200 ms, as
    it does on Dramatiq.
    """
    base = min_backoff * 2 ** min(retries, 32)
    return min(max_backoff, max(min_backoff, int(base * (1 + random.random() / 2))))


def _dramatiq_retry_options(exception: BaseException, retries: int) -> dict[str, Any]:
    """The options Dramatiq's ``Retries`` sets on a failed message: failed attempts so far,
    the traceback (30 frames, as Dramatiq's) and when it was requeued (ms since the epoch)."""
    return {
        "retries": retries + 1,
        "traceback": "".join(traceback.format_exception(exception, limit=30)),
        "requeue_timestamp": int(time.time() * 1000),
    }


def _report_to_result_backends(broker: dramatiq.Broker, message: Any, exception: BaseException) -> None:
    """Store a held task's failure in Dramatiq's ``Results`` backends, if it stores results.

    Dramatiq's ``Results`` stores a failure when the message is rejected (``after_nack``);
    a held task is acknowledged instead, so it is told here: holding keeps the message, it
    does not hide the failure from ``message.get_result()``. A kicked task that succeeds
    later stores its result over it.
    """
    for middleware in broker.middleware:
        if isinstance(middleware, Results):
            store_results, result_ttl = middleware._lookup_options(broker, message)
            if store_results:
                try:
                    middleware.backend.store_exception(message, exception, result_ttl)
                except Exception:
                    logger.warning(
                        "could not store the failure of held message %s in the result backend",
                        message.message_id,
                        exc_info=True,
                    )


def _enqueue_copy(broker: dramatiq.Broker) -> Callable[..., Any]:
    """How ``broker`` enqueues a copy of a message it delivered (a retry, a release): its
    ``enqueue_copy`` where it has one (Redis: once, however often the write is run), else
    its ``enqueue``."""
    return getattr(broker, "enqueue_copy", broker.enqueue)


def _summary(exception: BaseException) -> str:
    return f"{type(exception).__name__}: {exception}"[:500]


def _error_line(exception: BaseException) -> str:
    """``Type: message (at file:line)`` for an error, ``Type: message`` for retry()."""
    where = None if isinstance(exception, TaskOutcome) else origin(exception)
    return _summary(exception) + (f" (at {where})" if where else "")


def _log_failure(
    level: int,
    message: Any,
    exception: BaseException,
    retries: int,
    max_retries: int,
    next_step: str,
    *,
    retry_at: float | None = None,
) -> None:
    details = describe(exception)
    fields: dict[str, Any] = {
        "actor": message.actor_name,
        "message_id": message.message_id,
        "queue": canonical_queue(message.queue_name),
        "attempt": retries + 1,
        "max_attempts": max_retries + 1,
        "exception_type": details["exception_type"],
        "exception_message": details["exception_message"],
        "origin": details["origin"],
        "next": next_step,
        "traceback": details["traceback"],
    }
    if retry_at is not None:
        fields["retry_at"] = iso_utc(retry_at)
        fields["next"] = f"{next_step} (at {fields['retry_at']})"
    logger.log(
        level,
        "%s failed (message %s, attempt %d of %d): %s: %s at %s; %s",
        fields["actor"],
        fields["message_id"],
        fields["attempt"],
        fields["max_attempts"],
        fields["exception_type"],
        fields["exception_message"],
        fields["origin"],
        next_step,
        extra={"dramaturg": fields},
    )


class _DramatiqFailureFilter(logging.Filter):
    """Drops Dramatiq's own per-failure lines (Outcomes logs one line for each failure),
    and its "was skipped" line for a message released because its queue is suspended."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str):
            return True
        if record.msg.startswith("Failed to process message"):
            return False
        if record.msg.startswith("Message %s was skipped") and isinstance(record.args, tuple) and record.args:
            return outcome_of(record.args[0]) != RunOutcome.RELEASED
        return True


def _silence_dramatiq_failure_lines() -> None:
    worker_logger = logging.getLogger("dramatiq.worker.WorkerThread")
    if not any(isinstance(f, _DramatiqFailureFilter) for f in worker_logger.filters):
        worker_logger.addFilter(_DramatiqFailureFilter())
