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
every message. On a failure, :class:`BulkSendError` says how many were sent and gives
the messages that were not (their ids), so nothing is lost silently: a chunk is either
confirmed whole, or its unconfirmed messages are listed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dramatiq

from .errors import SendError

if TYPE_CHECKING:
    from .actors import Actor

__all__ = ["BulkResult", "BulkSendError", "Call", "send_many"]

#: Messages per round trip (Redis pipeline) or confirm window (RabbitMQ).
DEFAULT_CHUNK = 1_000


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


@dataclass
class BulkSendError(SendError):
    """A bulk send stopped. The first ``sent`` items were sent, ``unsent`` are the
    messages of the failing chunk that were not (their ids), and every item from
    ``sent + len(unsent)`` on was not attempted; ``reason`` says why."""

    reason: str
    sent: int
    unsent: list[dramatiq.Message[Any]] = field(default_factory=list)

    @property
    def next_item(self) -> int:
        """The index of the first item that was not attempted."""
        return self.sent + len(self.unsent)

    def __str__(self) -> str:
        ids = ", ".join(m.message_id for m in self.unsent[:5])
        more = f" and {len(self.unsent) - 5} more" if len(self.unsent) > 5 else ""
        return (
            f"bulk send failed after {self.sent} messages: {self.reason}; {len(self.unsent)} messages of the"
            f" failing chunk were not sent ({ids}{more}), nor any item from #{self.next_item} on: send them again"
        )


def _call_args(item: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(item, Call):
        return item.args, item.kwargs
    if isinstance(item, tuple):
        return item, {}
    return (item,), {}


def _chunks(actor: Actor[Any, Any], items: Iterable[Any], size: int, options: dict[str, Any]) -> Iterator[list[Any]]:
    chunk: list[dramatiq.Message[Any]] = []
    for item in items:
        args, kwargs = _call_args(item)
        chunk.append(actor.message_with_options(args=args, kwargs=kwargs, **options))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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
    started = time.perf_counter()
    sent = 0
    chunks = _chunks(actor, items, chunk_size, options)
    for chunk in chunks:
        try:
            if enqueue_many is not None:
                enqueue_many(chunk, delay=delay)
            else:
                for index, message in enumerate(chunk):
                    try:
                        broker.enqueue(message, delay=delay)
                    except Exception as error:
                        raise BulkSendError(f"{type(error).__name__}: {error}", 0, chunk[index:]) from error
        except BulkSendError as error:  # counts within the chunk: make them count from the start
            raise BulkSendError(error.reason, sent + error.sent, error.unsent) from error.__cause__
        sent += len(chunk)
    return BulkResult(sent=sent, seconds=time.perf_counter() - started)
