"""Sending many tasks at once: ``actor.send_many(rows)``.

An import of 100,000 users sends 100,000 tasks. ``send()`` makes one round trip per
message (and on RabbitMQ waits for each publisher confirm); ``send_many`` sends them in
chunks, one round trip per chunk on Redis (a pipeline) and, on RabbitMQ, a window of
publishes followed by waiting for all their confirms (confirms are never given up)::

    result = import_user.send_many(rows, chunk_size=1_000)      # each row: the one argument
    result.sent, result.seconds

    notify.send_many([(user_id, "welcome"), ...])              # a tuple: the positional arguments
    notify.send_many([dramaturg.Call(user_id, kind="welcome")])  # positional and keyword

Each message goes through the same middleware as one sent with ``send()``: context,
priority, ttr, its own id; ``options`` (``priority``, ``ttr``, ``delay``, ...) apply to
every message. On a failure, :class:`BulkSendError` says how many were sent and, for the
chunk that failed, which messages were not sent and which are *unknown*: they went out,
but the broker's answer never came back (the connection was lost), so they may well be
on the queue. Nothing is lost silently, and nothing known to be on the queue is ever
reported as not sent. Ctrl-C stops a send with :class:`BulkSendInterrupted`, still a
``KeyboardInterrupt``, which carries the same counts.

A middleware may take each chunk before it is sent with ``before_send_many(broker,
messages)`` (a batch records its members in one call); an error there stops the send
with the chunk as not sent. ``after_unsent_many(broker, messages)`` is told which
messages of a chunk were certainly not sent (a batch takes them out again).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dramatiq
from dramatiq.middleware import MiddlewareError

from .errors import BulkSendError, BulkSendInterrupted, SendError

if TYPE_CHECKING:
    from .actors import Actor

__all__ = ["BulkResult", "BulkSendError", "BulkSendInterrupted", "Call", "send_many"]

#: Messages per round trip (Redis pipeline) or confirm window (RabbitMQ).
DEFAULT_CHUNK = 1_000
#: The reason of a :class:`BulkSendInterrupted`'s counts.
_INTERRUPTED = "interrupted (Ctrl-C)"

logger = logging.getLogger("dramaturg.bulk")


class Call:
    """The arguments of one task in ``send_many``: ``Call(*args, **kwargs)``."""

    __slots__ = ("args", "kwargs")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"Call(*{self.args!r}, **{self.kwargs!r})"


@dataclass(frozen=True)
class BulkResult:
    """What ``send_many`` sent: how many messages, in how many seconds."""

    sent: int
    seconds: float

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.sent / self.seconds if self.seconds > 0 else float("inf")


def _chunks(actor: Actor[Any, Any], items: Iterable[Any], size: int, options: dict[str, Any]) -> Iterator[list[Any]]:
    """The messages for ``items``, ``size`` at a time: what ``actor.message_with_options``
    builds, built here without its per-message checks and with the ids of a chunk taken
    from one read of the system's random source (a ``uuid4()`` each costs a system call)."""
    options = dict(actor.message_with_options(**options).options)  # its checks, once
    queue_name, actor_name = actor.queue_name, actor.actor_name
    Message = dramatiq.Message
    iterator = iter(items)
    while True:
        rows = [item for _, item in zip(range(size), iterator, strict=False)]
        if not rows:
            return
        now = int(time.time() * 1000)
        chunk: list[dramatiq.Message[Any]] = []
        for item, message_id in zip(rows, new_ids(len(rows)), strict=True):
            if isinstance(item, Call):
                args, kwargs = item.args, item.kwargs
            elif isinstance(item, tuple):
                args, kwargs = item, {}
            else:
                args, kwargs = (item,), {}
            chunk.append(
                Message(
                    queue_name=queue_name,
                    actor_name=actor_name,
                    args=args,
                    kwargs=kwargs,
                    options=options.copy(),
                    message_id=message_id,
                    message_timestamp=now,
                )
            )
        yield chunk


_random = random.Random()
os.register_at_fork(after_in_child=_random.seed)  # a forked sender must not repeat its parent's ids
_VERSION_4 = ~(0xF000 << 64 | 0xC000 << 48) & (2**128 - 1), 0x4000 << 64 | 0x8000 << 48


def new_ids(count: int) -> list[str]:
    """``count`` random version-4 UUIDs as strings, like ``str(uuid.uuid4())``.

    From a generator seeded from ``os.urandom`` (again in a forked child) rather than
    ``os.urandom`` for each: on a virtual machine reading 16 random bytes costs ~4 us,
    more than the rest of building a message. Message ids are unique, not secret.
    """
    keep, set_bits = _VERSION_4
    ids = []
    for _ in range(count):
        h = f"{_random.getrandbits(128) & keep | set_bits:032x}"
        ids.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return ids


_encode_json = json.JSONEncoder(separators=(",", ":")).encode
_FIELDS = tuple(f.name for f in dataclasses.fields(dramatiq.Message))


def message_encoder() -> Callable[[dramatiq.Message[Any]], bytes]:
    """``message.encode``, or the same bytes faster when the encoder is Dramatiq's JSON one."""
    if type(dramatiq.get_encoder()) is not dramatiq.JSONEncoder:
        return lambda message: message.encode()

    def encode(message: dramatiq.Message[Any]) -> bytes:
        return _encode_json({name: getattr(message, name) for name in _FIELDS}).encode("utf-8")

    return encode


class EnqueueHooks:
    """A broker's enqueue hooks, for many messages: only the middleware that has them.

    ``emit_before`` goes through every middleware and looks each hook up by name, which
    cost more than the rest of building a message. Errors are treated as Dramatiq treats
    them: a :class:`~dramatiq.errors.MiddlewareError` stops the send, any other is logged.
    A middleware may take a whole chunk's after-hook at once with ``after_enqueue_many``.
    """

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker
        base = dramatiq.Middleware
        self.before: list[Callable[..., None]] = [
            m.before_enqueue for m in broker.middleware if type(m).before_enqueue is not base.before_enqueue
        ]
        self.after: list[tuple[Callable[..., None], bool]] = []
        for m in broker.middleware:
            if hasattr(m, "after_enqueue_many"):
                self.after.append((m.after_enqueue_many, True))
            elif type(m).after_enqueue is not base.after_enqueue:
                self.after.append((m.after_enqueue, False))
        self.after.reverse()  # after-hooks run in reverse order, as in Dramatiq

    def emit_before(self, message: dramatiq.Message[Any], delay: int | None) -> None:
        for hook in self.before:
            try:
                hook(self.broker, message, delay)
            except MiddlewareError:
                raise
            except Exception:
                logger.critical("unexpected failure in %r before enqueueing %s", hook, message, exc_info=True)

    def emit_after(self, messages: Sequence[dramatiq.Message[Any]], delay: int | None) -> None:
        for hook, many in self.after:
            try:
                if many:
                    hook(self.broker, messages, delay)
                    continue
            except Exception:
                logger.critical("unexpected failure in %r after enqueueing messages", hook, exc_info=True)
                continue
            for message in messages:
                try:
                    hook(self.broker, message, delay)
                except Exception:
                    logger.critical("unexpected failure in %r after enqueueing %s", hook, message, exc_info=True)


def send_many(
    actor: Actor[Any, Any], items: Iterable[Any], *, chunk_size: int = DEFAULT_CHUNK, **options: Any
) -> BulkResult:
    """Send one message to ``actor`` per item (see the module docstring). Streams ``items``:
    only one chunk of messages is in memory at a time."""
    if chunk_size < 1:
        raise SendError(f"send_many: chunk_size must be at least 1, got {chunk_size}")
    delay = options.pop("delay", None)
    broker = actor.broker
    enqueue_many = getattr(broker, "enqueue_many", None)
    # Middleware that take a whole chunk before it is sent (a batch records its members in one call).
    before_chunk = [m.before_send_many for m in broker.middleware if hasattr(m, "before_send_many")]
    unsent_hooks = [m.after_unsent_many for m in broker.middleware if hasattr(m, "after_unsent_many")]
    started = time.perf_counter()
    sent = 0
    chunks = _chunks(actor, items, chunk_size, options)
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            break
        except SendError:  # a check of the options, before anything is sent
            raise
        except KeyboardInterrupt as interrupt:  # reading the items: every chunk before was sent
            raise BulkSendInterrupted(BulkSendError(_INTERRUPTED, sent)) from interrupt
        except Exception as error:  # reading the items: every chunk before was sent
            raise BulkSendError(f"reading the items failed: {type(error).__name__}: {error}", sent) from error
        index = 0
        try:
            for hook in before_chunk:
                hook(broker, chunk)
        except Exception as error:  # refused before anything of the chunk was sent
            _tell_unsent(unsent_hooks, broker, chunk)
            raise BulkSendError(f"{type(error).__name__}: {error}", sent, chunk) from error
        try:
            if enqueue_many is not None:
                enqueue_many(chunk, delay=delay)
            else:
                for index, message in enumerate(chunk):
                    try:
                        broker.enqueue(message, delay=delay)
                    except Exception as error:
                        raise BulkSendError(f"{type(error).__name__}: {error}", index, chunk[index:]) from error
        except BulkSendError as error:  # counts within the chunk: make them count from the start
            _tell_unsent(unsent_hooks, broker, error.unsent)
            raise BulkSendError(error.reason, sent + error.sent, error.unsent, error.unknown) from error.__cause__
        except KeyboardInterrupt as interrupt:  # what was written of the chunk may be on the queue
            if enqueue_many is not None:
                progress = BulkSendError(_INTERRUPTED, sent, unknown=chunk)
            else:
                progress = BulkSendError(_INTERRUPTED, sent + index, chunk[index + 1 :], [chunk[index]])
            _tell_unsent(unsent_hooks, broker, progress.unsent)
            raise BulkSendInterrupted(progress) from interrupt
        except Exception as error:  # a broker of another kind failed in its own way: nothing is known
            raise BulkSendError(f"{type(error).__name__}: {error}", sent, unknown=chunk) from error
        sent += len(chunk)
    return BulkResult(sent=sent, seconds=time.perf_counter() - started)


def _tell_unsent(
    hooks: Sequence[Callable[..., None]], broker: dramatiq.Broker, messages: Sequence[dramatiq.Message[Any]]
) -> None:
    """Tell the middleware that take them which messages of a chunk were certainly not sent."""
    if not messages:
        return
    for hook in hooks:
        try:
            hook(broker, messages)
        except Exception:
            logger.warning("unexpected failure in %r after a chunk was not sent", hook, exc_info=True)
