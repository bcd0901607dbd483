"""Every error dramaturg raises on purpose, and the one interrupt it raises, in one place.

::

    DramaturgError
     +-- ConfigError            bad configuration: names the key, the bad value and the fix
     +-- BrokerUnreachable      the broker did not answer (also a dramatiq ConnectionFailed,
     |                          so Dramatiq's worker exits with its "connect" code)
     +-- BrokerNotInstalled     the broker's extra is missing (pip install 'dramaturg[redis]')
     +-- ActorError             a bad @actor declaration (unknown option, duplicate name)
     +-- SendError              a message that cannot be sent (unknown actor or queue,
     |    |                     arguments that do not fit the handler, non-JSON arguments)
     |    +-- ContextError      the context could not be captured (also a dramatiq
     |    |                     MiddlewareError, so Dramatiq lets it reach the sender)
     |    +-- BatchSendError    a batch member could not be recorded in the state store, so
     |    |                     it was not sent (also a MiddlewareError)
     |    +-- BulkSendError     send_many stopped: how many were sent, which were not, which may be
     |    +-- FlowSendError     a limit's or unique key cannot be made from the message, or
     |         |                the state store did not answer; not sent (also a MiddlewareError)
     |         +-- DuplicateTask  a unique task is queued or running already (its id)
     +-- TaskHeld               eager mode: a task sent with send() was held (its reason)
     +-- NotInTask              current_task() outside a task handler
     +-- KickError              held tasks could not be requeued; they stay held
     +-- StateUnavailable       task status without a state store ([state] url unset on RabbitMQ)
     +-- BatchNotFound          no batch has that id (never made, or expired after [batch] ttl)
     +-- TaskNotFound           dramaturg.cancel(): no task has that id (never sent, or its
     |                          record expired after [state] ttl)
     +-- ScheduleNotFound       no schedule has that id (dramaturg schedule run|pause|resume)
     +-- LockTimeout            dramaturg.lock(): another held the lock for all of ``wait``
     +-- LockLost               release or renew of a lock this holder no longer holds (ttl passed)
     +-- QueueNotFound          no queue of that name on the broker or among the actors' (the
     |                          closest known one named)
     +-- QueueInUse             dramaturg.delete_queue(): workers consume it, or tasks of it run
     |                          or are held (force=True removes it anyway)
     +-- UsageError             a command line mistake (dramaturg send/held/drain/stats/status: exit 2)
     +-- Poison                 a message taken from a broker that cannot be run; the consumer
                                holds it and goes on (it never reaches application code)

    KeyboardInterrupt
     +-- BulkSendInterrupted    Ctrl-C stopped send_many; carries a BulkSendError's counts

``BulkSendInterrupted`` is not a :class:`DramaturgError` on purpose: Ctrl-C must stay a
``KeyboardInterrupt``, so that ``except DramaturgError`` (or ``except Exception``) around
a bulk send cannot swallow it, and code that stops on Ctrl-C still does. It lives here
beside the :class:`BulkSendError` it carries.

What a handler raises to end a task (``Success``, ``Retry``, ``Hold``, ``SuspendQueue``)
is control flow, not an error: see :mod:`dramaturg.task`.

Messages say what was wrong and how to fix it; library errors are translated at the
boundary (``raise ConfigError(...) from None``) so that no traceback from deep inside
pika or redis reaches a user who only mistyped a key.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dramatiq
from dramatiq.errors import ConnectionFailed
from dramatiq.middleware import MiddlewareError

__all__ = [
    "ActorError",
    "BatchNotFound",
    "BatchSendError",
    "BrokerNotInstalled",
    "BrokerUnreachable",
    "BulkSendError",
    "BulkSendInterrupted",
    "ConfigError",
    "ContextError",
    "DramaturgError",
    "DuplicateTask",
    "FlowSendError",
    "KickError",
    "LockLost",
    "LockTimeout",
    "NotInTask",
    "Poison",
    "QueueInUse",
    "QueueNotFound",
    "ScheduleNotFound",
    "SendError",
    "StateUnavailable",
    "TaskHeld",
    "TaskNotFound",
    "UsageError",
    "did_you_mean",
]


class DramaturgError(Exception):
    """The root of every error dramaturg raises on purpose."""


class ConfigError(DramaturgError):
    """The configuration is invalid.

    ``key`` is the dotted settings key (``broker.type``) when one is to blame, and
    ``source`` where its value came from (a file path or an environment variable).
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.source = source


class BrokerUnreachable(DramaturgError, ConnectionFailed):
    """The broker could not be reached. The URL in the message is always masked."""

    def __init__(self, message: str) -> None:
        DramaturgError.__init__(self, message)
        self.message = message


class BrokerNotInstalled(DramaturgError):
    """The client library for the configured broker is not installed."""


class ActorError(DramaturgError):
    """An actor was declared wrongly (unknown option, name already taken)."""


class TaskHeld(DramaturgError):
    """Eager mode: a task sent with ``send()`` was held (``reason``); nothing is lost.

    ``task`` is the :class:`~dramaturg.HeldTask`, also in ``dramaturg.held_tasks()``.
    """

    def __init__(self, reason: str, task: Any = None) -> None:
        super().__init__(f"task held: {reason}")
        self.reason = reason
        self.task = task


class SendError(DramaturgError):
    """A message could not be sent: unknown actor or queue, or arguments that do not fit."""


class ContextError(SendError, MiddlewareError):
    """The context of a message could not be captured; the message is not sent.

    (A :class:`dramatiq.middleware.MiddlewareError`, so that Dramatiq lets it reach the
    sender instead of logging it and sending the message without its context.)
    """


@dataclass
class BulkSendError(SendError):
    """A bulk send stopped; ``reason`` says why. Of the items sent so far:

    - ``sent``: how many messages the broker took (RabbitMQ confirmed them; Redis ran
      the enqueue and answered);
    - ``unsent``: messages of the failing chunk that the broker certainly does not have
      (never written, refused, unroutable): send them again;
    - ``unknown``: messages of the failing chunk whose fate is unknown: they were
      written, but the answer was lost with the connection, so they may be on the queue
      (look before sending them again, or accept a duplicate).

    Every item from :attr:`next_item` on was not attempted.
    """

    reason: str
    sent: int
    unsent: list[dramatiq.Message[Any]] = field(default_factory=list)
    unknown: list[dramatiq.Message[Any]] = field(default_factory=list)

    @property
    def next_item(self) -> int:
        """The index of the first item that was not attempted."""
        return self.sent + len(self.unsent) + len(self.unknown)

    def __str__(self) -> str:
        parts = [f"bulk send failed after {self.sent} messages were sent: {self.reason}"]
        if self.unknown:
            parts.append(
                f"{len(self.unknown)} messages of the failing chunk may or may not have been delivered (they were"
                f" sent, but no answer came: {_ids(self.unknown)}); look for them before sending them again"
            )
        if self.unsent:
            parts.append(f"{len(self.unsent)} messages of the failing chunk were not sent ({_ids(self.unsent)})")
        parts.append(f"no item from #{self.next_item} on was sent")
        return "; ".join(parts)


class BulkSendInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a bulk send. Still a ``KeyboardInterrupt``, so code that
    catches one sees it as before; :attr:`progress` says what was sent, as a
    :class:`BulkSendError` does (the chunk being sent when it came is *unknown*: it may
    be on the queue in part)."""

    def __init__(self, progress: BulkSendError) -> None:
        super().__init__(str(progress))
        self.progress = progress


def _ids(messages: Sequence[dramatiq.Message[Any]]) -> str:
    ids = ", ".join(m.message_id for m in messages[:5])
    return ids + (f" and {len(messages) - 5} more" if len(messages) > 5 else "")


class NotInTask(DramaturgError):
    """``current_task()`` was called outside a task handler."""


class KickError(DramaturgError):
    """Held tasks could not be requeued; they stay held (nothing lost).

    ``kicked`` is how many others the same kick requeued, ``failures`` the
    ``(message id, why)`` of each task it did not.
    """

    def __init__(self, message: str, *, kicked: int = 0, failures: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.kicked = kicked
        self.failures = list(failures)


class StateUnavailable(DramaturgError):
    """There is no state store: the broker is RabbitMQ (or stub) and ``[state] url`` is unset."""


class BatchNotFound(DramaturgError):
    """No batch has this id: it was never made, or its state expired ``[batch] ttl`` after it ended."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"no batch {batch_id!r}: never made, or expired after it ended ([batch] ttl)")
        self.batch_id = batch_id


class TaskNotFound(DramaturgError):
    """No task is known by this message id: never sent, or its status record expired
    ``[state] ttl`` after its last change (see :func:`dramaturg.cancel`)."""

    def __init__(self, message_id: str) -> None:
        super().__init__(f"no task {message_id!r}: never sent, or its record expired ([state] ttl)")
        self.message_id = message_id


class ScheduleNotFound(DramaturgError):
    """No schedule (in code or the config file) has this id."""


class QueueNotFound(DramaturgError):
    """No queue of this name on the broker or among the application's actors' queues."""


class QueueInUse(DramaturgError):
    """A queue could not be deleted: workers consume it, or tasks of it run or are held."""


class BatchSendError(SendError, MiddlewareError):
    """A message sent into a batch could not be recorded as its member (the state store
    did not answer, or the batch is gone); the message is not sent, so that no member runs
    untracked.

    (A :class:`dramatiq.middleware.MiddlewareError`, so that Dramatiq lets it reach the
    sender instead of logging it and sending the message anyway.)
    """


class FlowSendError(SendError, MiddlewareError):
    """A message of an actor with limits or a unique key was not sent: a key template names
    an argument or context value the message does not have (the message says which key),
    or the state store that keeps the keys did not answer.

    (A :class:`dramatiq.middleware.MiddlewareError`, so that Dramatiq lets it reach the
    sender instead of logging it and sending the message anyway.)
    """


class DuplicateTask(FlowSendError):
    """A task of a unique actor was not sent: ``existing_id`` names the task queued or
    running for the same ``key``. Raised by ``send()`` for ``unique(..., on_duplicate="raise")``;
    with the default ``"return"``, ``send()`` returns that task's message instead."""

    def __init__(self, key: str, existing_id: str, actor_name: str = "") -> None:
        super().__init__(
            f"{actor_name or 'task'}: a task with unique key {key!r} is queued or running already"
            f" ({existing_id}); not sent again"
        )
        self.key = key
        self.existing_id = existing_id


class LockTimeout(DramaturgError):
    """:func:`dramaturg.lock` waited ``wait`` for the lock ``name`` and another still held it."""

    def __init__(self, name: str, waited_ms: int, holder: str | None = None) -> None:
        by = f" (held by {holder})" if holder else ""
        super().__init__(f"lock {name!r} was not free within {waited_ms} ms{by}")
        self.name = name
        self.waited_ms = waited_ms
        self.holder = holder


class LockLost(DramaturgError):
    """A release or renew of the lock ``name`` was refused: this holder no longer holds it
    (its ttl passed, and someone else may hold it now). Whatever it guarded may have been
    done by another holder meanwhile: compare fencing tokens (``lock.token``)."""


class UsageError(DramaturgError):
    """A command was given something it cannot use: an option's value (``--delay soon``),
    arguments that do not go together, an id or file that is not there.

    Raised by the ``dramaturg`` commands before they change anything; the command prints
    the message in one line and exits 2, as argparse does for its own usage errors.
    """


class Poison(DramaturgError):
    """A message taken from a broker that cannot be run at all, and why.

    Raised by :func:`dramaturg.envelope.decode`; the consumer holds the message and goes
    on (it never leaves the consumer).
    """

    def __init__(self, reason: str, body: bytes, fields: Any = None, message: dramatiq.Message[Any] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.body = body
        #: What the body decoded to (None when it did not decode).
        self.fields = fields
        #: The message, when only its queue was wrong: it can be kicked onto the queue it came from.
        self.message = message


def quoted(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error line, cut past ``limit`` characters (saying how long it was).

    >>> quoted("x" * 100, 10)
    "'xxxxxxxx... (102 characters)"
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}... ({len(text):,} characters)"


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or ``""`` when none is close."""
    matches = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {matches[0]!r}?" if matches else ""
