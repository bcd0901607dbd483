"""Held tasks: parked durably with a reason, kept until someone kicks or purges them.

A task is held when its handler calls ``hold(reason)``, raises one of its actor's
``hold_on`` exceptions, runs out of retries, or cannot be run at all (an undecodable
body, an unknown actor, arguments that do not fit). Each broker keeps held tasks in a
store of its own behind :class:`HeldStore`:

- Redis and embedded: keys under ``<namespace>:__held__:<queue>`` that Dramatiq's
  flush and maintenance never touch (:class:`~dramaturg.brokers.redis.RedisHeldStore`);
- RabbitMQ: a durable queue ``<queue>.HQ`` per queue, persistent messages, publisher
  confirms, no TTL (:class:`~dramaturg.brokers.rabbitmq.RabbitmqHeldStore`).

Dramatiq's dead-letter queues are not used for this: they expire, are wiped by
``flush``, and cannot carry a reason.

Kicking takes tasks out of the store so that no two kickers requeue the same task,
publishes each again with a fresh retry budget and ``kicks`` + 1, and only then
forgets it; a kicker that dies half-way leaves its tasks held, never lost.
"""

from __future__ import annotations

import builtins
import json
import os
import socket
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import dramatiq

from .errors import DramaturgError

__all__ = ["HeldStore", "HeldTask", "KickError", "held_tasks"]

#: The longest traceback kept with a held task (characters, the end is kept).
MAX_TRACEBACK = 8_000
#: The longest undecodable body kept (characters).
MAX_RAW = 64_000
#: Options that belong to one delivery on one broker, not to the task.
_DELIVERY_OPTIONS = frozenset({"redis_message_id", "eta", "retries", "traceback", "requeue_timestamp"})


class KickError(DramaturgError):
    """A held task could not be requeued (the rest of the kick is undone, nothing lost)."""


@dataclass(frozen=True)
class HeldTask:
    """One held task: everything needed to examine it and run it again."""

    message_id: str
    queue_name: str
    actor_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    reason: str
    #: 1-based attempt that was running when the task was held.
    attempts: int
    #: When the task was first sent (ms since the epoch).
    enqueued_at: int
    #: When it was held (ms since the epoch).
    held_at: int
    host: str
    pid: int
    kicks: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    exception_type: str | None = None
    exception_message: str | None = None
    #: ``path/to/file.py:42``: where the exception that led here was raised.
    origin: str | None = None
    traceback: str | None = None
    #: The store context the task was sent in, if any.
    context: dict[str, Any] | None = None
    #: For a message that could not be decoded: its body as text; nothing else is known.
    raw: str | None = None

    @classmethod
    def from_message(
        cls,
        message: dramatiq.Message[Any],
        reason: str,
        *,
        queue_name: str,
        exception: BaseException | None = None,
    ) -> HeldTask:
        options = {k: v for k, v in message.options.items() if k not in _DELIVERY_OPTIONS}
        return cls(
            message_id=message.message_id,
            queue_name=queue_name,
            actor_name=message.actor_name,
            args=list(message.args),
            kwargs=dict(message.kwargs),
            reason=reason,
            attempts=int(message.options.get("retries", 0)) + 1,
            kicks=int(message.options.get("dramaturg_kicks", 0)),
            enqueued_at=int(message.message_timestamp),
            held_at=int(time.time() * 1000),
            host=socket.gethostname(),
            pid=os.getpid(),
            options=options,
            context=message.options.get("dramaturg_context"),
            **describe(exception),
        )

    @classmethod
    def from_raw(cls, body: bytes, reason: str, *, queue_name: str, message_id: str) -> HeldTask:
        """A message that could not be decoded: only its body and where it was found are known."""
        text = body.decode("utf-8", errors="replace")
        now = int(time.time() * 1000)
        return cls(
            message_id=message_id,
            queue_name=queue_name,
            actor_name="",
            args=[],
            kwargs={},
            reason=reason,
            attempts=0,
            enqueued_at=now,
            held_at=now,
            host=socket.gethostname(),
            pid=os.getpid(),
            raw=text[:MAX_RAW],
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), default=repr)

    @classmethod
    def from_json(cls, data: str | bytes) -> HeldTask:
        return cls(**json.loads(data))

    def to_message(self) -> dramatiq.Message[Any]:
        """The message to send when this task is kicked: same id, fresh retry budget."""
        if self.raw is not None:
            raise KickError(
                f"held message {self.message_id} could not be decoded, so it cannot be run again;"
                " examine it with `dramaturg held show` and purge it"
            )
        return dramatiq.Message(
            queue_name=self.queue_name,
            actor_name=self.actor_name,
            args=tuple(self.args),
            kwargs=self.kwargs,
            options={**self.options, "dramaturg_kicks": self.kicks + 1},
            message_id=self.message_id,
            message_timestamp=self.enqueued_at,
        )


def describe(exception: BaseException | None) -> dict[str, Any]:
    """The exception's type, message, origin (file:line) and bounded traceback."""
    if exception is None:
        return {}
    text = "".join(traceback.format_exception(exception))
    return {
        "exception_type": type(exception).__name__,
        "exception_message": str(exception)[:2_000],
        "origin": origin(exception),
        "traceback": text[-MAX_TRACEBACK:],
    }


def origin(exception: BaseException) -> str | None:
    """``file:line`` of the innermost frame outside dramaturg where ``exception`` was raised."""
    frames = traceback.extract_tb(exception.__traceback__)
    package = os.path.dirname(os.path.abspath(__file__))
    for frame in reversed(frames):
        if not os.path.abspath(frame.filename).startswith(package + os.sep):
            return f"{frame.filename}:{frame.lineno}"
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None


class HeldStore(ABC):
    """Where a broker keeps its held tasks. Get it with :func:`held_tasks`.

    ``queue`` arguments are canonical queue names (``imports``, never ``imports.DQ``).
    Listing never removes anything; ``kick`` and ``purge`` with ``message_ids=None``
    act on every held task of the queue.
    """

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker

    # -- what each broker implements ------------------------------------------------

    @abstractmethod
    def hold(self, task: HeldTask) -> None:
        """Store ``task`` durably (replacing a held task with the same id)."""

    @abstractmethod
    def list(self, queue: str | None = None, *, offset: int = 0, limit: int = 50) -> list[HeldTask]:
        """Held tasks, oldest first, without removing them; ``queue=None``: every known queue."""

    @abstractmethod
    def count(self, queue: str | None = None) -> int:
        """How many tasks are held (in ``queue``, or in every known queue)."""

    @abstractmethod
    def get(self, message_id: str, queue: str | None = None) -> HeldTask | None:
        """The held task with ``message_id``, or None."""

    @abstractmethod
    def taking(
        self, queue: str, message_ids: Sequence[str] | None
    ) -> AbstractContextManager[Iterator[tuple[HeldTask, Any]]]:
        """Take tasks out of reach of other kickers, for the duration of the ``with`` block.

        Yields an iterator of ``(task, receipt)``; :meth:`forget` a receipt once its task
        has been requeued. Leaving the block gives back every task not forgotten.
        """

    @abstractmethod
    def forget(self, queue: str, receipt: Any) -> None:
        """Drop a task taken with :meth:`taking` for good."""

    @abstractmethod
    def purge(self, queue: str, message_ids: Sequence[str] | None = None) -> int:
        """Delete held tasks (all of ``queue`` when ``message_ids`` is None); returns how many."""

    @abstractmethod
    def queues(self) -> builtins.list[str]:
        """The queues that may hold tasks (those the broker knows, and any holding some)."""

    # -- shared behaviour -------------------------------------------------------------

    def kick(self, queue: str, message_ids: Sequence[str] | None = None, *, delay_ms: int | None = None) -> int:
        """Requeue held tasks (all of ``queue`` when ``message_ids`` is None); returns how many.

        Each runs again with a fresh retry budget and its ``kicks`` count + 1. Tasks that
        cannot be requeued stay held; the first failure is raised as :class:`KickError`
        after the others were tried.
        """
        kicked, failure = 0, None
        with self.taking(queue, message_ids) as taken:
            for task, receipt in taken:
                try:
                    self.broker.enqueue(task.to_message(), delay=delay_ms)
                except Exception as error:  # this task stays held; go on with the others
                    failure = failure or KickError(f"{task.message_id}: {error}")
                    continue
                self.forget(queue, receipt)
                kicked += 1
        if failure is not None:
            raise failure
        return kicked


def held_tasks(broker: dramatiq.Broker | None = None) -> HeldStore:
    """The held-task store of ``broker`` (default: the bootstrapped one)."""
    if broker is None:
        from .app import get_broker

        broker = get_broker()
    store = getattr(broker, "held", None)
    if not isinstance(store, HeldStore):
        raise DramaturgError(f"{broker!r} has no held-task store; build brokers with dramaturg.bootstrap()")
    return store


def with_kicks(task: HeldTask, kicks: int) -> HeldTask:
    return replace(task, kicks=kicks)
