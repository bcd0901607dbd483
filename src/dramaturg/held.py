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
forgets it; a kicker that dies half-way leaves its tasks held, never lost. The take is a
lease: a kicker that stalls past it (a paused process, a long GC) finds its tasks given
back, and the move to the queue checks the lease in the same atomic step, so a task is
never queued twice by two kickers (Redis: a token per taken task checked by the script
that moves it; RabbitMQ: the unacknowledged delivery on the kicker's channel, published
and acknowledged in one transaction).

What a held task says (reason, exception message, traceback, an undecodable body) is
masked when it is built (see :mod:`dramaturg.masking`): a URL password in an error
message is never stored in clear, nor printed by ``dramaturg held``.

A message is acknowledged only once its outcome is durable: :func:`durable_write` tries
such a write (holding a task, publishing a retry's copy) a few times before it gives up,
and :func:`hold_poison` holds a message that cannot be run at all that way, for the
brokers' consumers.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import socket
import time
import traceback
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

import dramatiq

from .errors import DramaturgError, KickError, Poison, SendError
from .masking import mask_text

__all__ = ["HeldMatches", "HeldStore", "HeldTask", "KickError", "durable_write", "held_tasks", "hold_poison"]

# The outcome lines' logger (dramaturg.middleware.outcomes): holding a poison message is
# its outcome, and a failed durable write is one's.
logger = logging.getLogger("dramaturg.outcomes")

#: The longest traceback kept with a held task (characters, the end is kept).
MAX_TRACEBACK = 8_000
#: The longest undecodable body kept (characters).
MAX_RAW = 64_000
#: Options that belong to one delivery on one broker, not to the task.
_DELIVERY_OPTIONS = frozenset({"redis_message_id", "eta", "retries", "traceback", "requeue_timestamp"})
#: Tasks moved to the queue per atomic step of a kick (one Lua call, one AMQP transaction).
KICK_BATCH = 200
#: Why a task taken by a kick was not requeued by it: its lease ran out first.
LEASE_LOST = (
    "not requeued by this kick: it stalled past its lease and the task was given back"
    " (another kick may have requeued it; otherwise it is still held)"
)
#: The oldest held tasks of a queue that :meth:`HeldStore.find` reads at most.
FIND_SCAN = 10_000
# Dramatiq's queue names (dramatiq.actor's pattern); the suffixes are dramaturg's own.
_QUEUE_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9._-]*")
_RESERVED_SUFFIXES = (".DQ", ".XQ", ".HQ", ".P1", ".P2")


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

    def __post_init__(self) -> None:
        # Masked however the task is built (from a message, from the store, by hand):
        # what a handler's error says may hold a URL with its password.
        for name in ("reason", "exception_message", "traceback", "raw"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, mask_text(value))

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

    @classmethod
    def from_poison(cls, poison: Poison, queue_name: str, message_id: str | None = None) -> HeldTask:
        """The held task for a message that cannot be run (:class:`~dramaturg.errors.Poison`),
        found on ``queue_name`` (canonical).

        Its id is the message's own when it has a usable one, else ``message_id`` (the
        broker's id for the delivery), else a new one.
        """
        if poison.message is not None:
            return cls.from_message(poison.message, poison.reason, queue_name=queue_name)
        decoded = poison.fields if type(poison.fields) is dict else {}
        own_id = decoded.get("message_id")
        if type(own_id) is not str or not own_id:
            own_id = message_id or f"{'undecodable' if poison.fields is None else 'poison'}-{uuid.uuid4()}"
        task = cls.from_raw(poison.body, poison.reason, queue_name=queue_name, message_id=own_id)
        actor_name = decoded.get("actor_name")
        return replace(task, actor_name=actor_name) if type(actor_name) is str else task

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), default=repr)

    @classmethod
    def from_json(cls, data: str | bytes) -> HeldTask:
        """The task stored as ``data``; fields it does not know (from a newer version) are
        ignored. Raises ``ValueError`` naming the problem when ``data`` is not a held task."""
        try:
            stored = json.loads(data)
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
            raise ValueError(f"not JSON ({error})") from None
        if not isinstance(stored, dict):
            raise ValueError(f"a JSON {type(stored).__name__}, not an object")
        known = {name: stored[name] for name in _FIELD_TYPES if name in stored}
        for name, types in _FIELD_TYPES.items():
            if name not in known:
                if name in _REQUIRED:
                    raise ValueError(f"no {name!r} field")
            elif not isinstance(known[name], types) or (isinstance(known[name], bool) and bool not in types):
                raise ValueError(f"{name!r} is a {type(known[name]).__name__}")
        return cls(**known)

    @classmethod
    def unreadable(cls, message_id: str, queue_name: str, data: bytes | str, problem: str) -> HeldTask:
        """A stored entry that is not a held task this version can read: listed by its id,
        with what it holds as ``raw``, so it can be examined and purged (never kicked)."""
        text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
        return cls(
            message_id=message_id,
            queue_name=queue_name,
            actor_name="",
            args=[],
            kwargs={},
            reason=f"unreadable held entry: {problem}",
            attempts=0,
            enqueued_at=0,
            held_at=0,
            host="?",
            pid=0,
            raw=text[:MAX_RAW],
        )

    @property
    def is_unreadable(self) -> bool:
        return self.reason.startswith("unreadable held entry: ") and self.raw is not None and not self.actor_name

    def to_message(self) -> dramatiq.Message[Any]:
        """The message to send when this task is kicked: same id, fresh retry budget."""
        if self.is_unreadable:
            raise KickError(
                f"{self.reason}; it cannot be run again: examine it with `dramaturg held show {self.message_id}`"
                " and purge it"
            )
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


# HeldTask's fields as stored, and the JSON types each may have.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "message_id": (str,),
    "queue_name": (str,),
    "actor_name": (str,),
    "args": (list,),
    "kwargs": (dict,),
    "reason": (str,),
    "attempts": (int,),
    "enqueued_at": (int,),
    "held_at": (int,),
    "host": (str,),
    "pid": (int,),
    "kicks": (int,),
    "options": (dict,),
    "exception_type": (str, type(None)),
    "exception_message": (str, type(None)),
    "origin": (str, type(None)),
    "traceback": (str, type(None)),
    "context": (dict, type(None)),
    "raw": (str, type(None)),
}
_REQUIRED = frozenset(f.name for f in fields(HeldTask) if f.default is MISSING and f.default_factory is MISSING)


def describe(exception: BaseException | None) -> dict[str, Any]:
    """The exception's type, message, origin (file:line) and bounded traceback, masked."""
    if exception is None:
        return {}
    text = "".join(traceback.format_exception(exception))
    return {
        "exception_type": type(exception).__name__,
        "exception_message": mask_text(str(exception)[:2_000]),
        "origin": origin(exception),
        "traceback": mask_text(text[-MAX_TRACEBACK:]),
    }


def origin(exception: BaseException) -> str | None:
    """``file:line`` of the innermost frame outside dramaturg where ``exception`` was raised."""
    frames = traceback.extract_tb(exception.__traceback__)
    package = os.path.dirname(os.path.abspath(__file__))
    for frame in reversed(frames):
        if not os.path.abspath(frame.filename).startswith(package + os.sep):
            return f"{frame.filename}:{frame.lineno}"
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None


@dataclass(frozen=True)
class HeldMatches:
    """A page of the held tasks that match a filter (:meth:`HeldStore.find`)."""

    #: The page: matching tasks, oldest first.
    tasks: list[HeldTask]
    #: How many of the tasks read match.
    matched: int
    #: How many tasks were read (the oldest of the queue).
    scanned: int
    #: Whether every held task of the queue was read (else ``matched`` counts the oldest ``scanned``).
    complete: bool


class HeldStore(ABC):
    """Where a broker keeps its held tasks. Get it with :func:`held_tasks`.

    ``queue`` arguments are canonical queue names (``imports``, never ``imports.DQ``).
    Listing never removes anything; ``kick`` and ``purge`` with ``message_ids=None``
    act on every held task of the queue (an empty list acts on none). A stored entry
    this version cannot read is listed as :meth:`HeldTask.unreadable`, never kicked.
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
        has been requeued (or :meth:`requeue` it). Leaving the block, also by an
        exception, gives back every task not forgotten, at once.
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

    def requeue(
        self, queue: str, batch: Sequence[tuple[dramatiq.Message[Any], Any]], delay_ms: int | None
    ) -> builtins.list[tuple[str, str]]:
        """Enqueue each message of ``batch`` and forget its receipt (taken with :meth:`taking`).

        Returns ``(message id, why)`` for each message this did not requeue; may raise
        instead when the whole batch failed. Durable stores override this to
        enqueue and forget in one step that checks the kicker's lease, so that a kicker
        that stalled past it requeues nothing another kicker took meanwhile.
        """
        failures = []
        for message, receipt in batch:
            try:
                self.broker.enqueue(message, delay=delay_ms)
            except Exception as error:  # this task stays held; go on with the others
                failures.append((message.message_id, f"{type(error).__name__}: {error}"))
                continue
            self.forget(queue, receipt)
        return failures

    def check_queue(self, queue: str) -> str:
        """``queue`` if it can name a queue of this broker; else :class:`~dramaturg.SendError`
        saying why (a typo, an empty name, a reserved suffix)."""
        if not queue:
            raise SendError("the queue name is empty")
        if not _QUEUE_NAME.fullmatch(queue):
            raise SendError(
                f"{queue[:80]!r} is not a queue name: letters, digits, '.', '_' and '-', not starting with a"
                " digit, '.' or '-'"
            )
        if queue.endswith(_RESERVED_SUFFIXES):
            raise SendError(f"{queue!r} is not a queue name: {queue[-3:]} is reserved; did you mean {queue[:-3]!r}?")
        return queue

    # -- shared behaviour -------------------------------------------------------------

    def find(
        self,
        queue: str,
        *,
        reason: str | None = None,
        actor: str | None = None,
        offset: int = 0,
        limit: int = 50,
        scan: int = FIND_SCAN,
    ) -> HeldMatches:
        """The held tasks of ``queue`` whose reason contains ``reason`` (ignoring case) and
        whose actor is ``actor`` (exactly), oldest first: the page ``offset``, ``limit``
        of them.

        No broker indexes held tasks by reason or actor: this reads the oldest ``scan``
        tasks of the queue in one listing (one Lua call on Redis, one pass over the held
        queue on RabbitMQ) and filters them here; ``complete`` says whether that was all.

        >>> store.find("imports", reason="retries exhausted", actor="sync_orders").matched  # doctest: +SKIP
        12
        """
        read = self.list(queue, offset=0, limit=scan + 1)
        complete = len(read) <= scan
        read = read[:scan]
        needle = reason.casefold() if reason else None
        hits = [
            task
            for task in read
            if (needle is None or needle in task.reason.casefold()) and (not actor or task.actor_name == actor)
        ]
        return HeldMatches(hits[offset : offset + limit], len(hits), len(read), complete)

    def kick(self, queue: str, message_ids: Sequence[str] | None = None, *, delay_ms: int | None = None) -> int:
        """Requeue held tasks (all of ``queue`` when ``message_ids`` is None); returns how many.

        Each runs again with a fresh retry budget and its ``kicks`` count + 1. Tasks that
        cannot be requeued (an unreadable entry, a broker error, a lease that ran out
        while this kicker stalled) stay held; after the others were tried, a
        :class:`KickError` says which, and how many were requeued.
        """
        kicked, failures = 0, []
        held_at: dict[str, int] = {}  # when each task of the batch was held (ms)
        with self.taking(queue, message_ids) as taken:
            batch: builtins.list[tuple[dramatiq.Message[Any], Any]] = []
            for task, receipt in taken:
                try:
                    batch.append((task.to_message(), receipt))
                    held_at[task.message_id] = task.held_at
                except KickError as error:
                    failures.append((task.message_id, str(error)))
                if len(batch) >= KICK_BATCH:
                    kicked += self._requeue_batch(queue, batch, delay_ms, failures, held_at)
                    batch, held_at = [], {}
            if batch:
                kicked += self._requeue_batch(queue, batch, delay_ms, failures, held_at)
        if failures:
            first_id, first_why = failures[0]
            raise KickError(
                f"{len(failures)} held task{'s' if len(failures) != 1 else ''} of {queue} not requeued by this"
                f" kick (nothing is lost); {first_id}: {first_why}",
                kicked=kicked,
                failures=failures,
            )
        return kicked

    def _requeue_batch(
        self,
        queue: str,
        batch: Sequence[tuple[dramatiq.Message[Any], Any]],
        delay_ms: int | None,
        failures: builtins.list[tuple[str, str]],
        held_at: dict[str, int],
    ) -> int:
        from .cancelling import withdraw_lapsed

        withdraw_lapsed(self.broker, held_at)
        try:
            failed = self.requeue(queue, batch, delay_ms)
        except Exception as error:  # none of the batch was requeued; go on with the next
            failed = [(message.message_id, f"{type(error).__name__}: {error}") for message, _ in batch]
        failures += failed
        return len(batch) - len(failed)


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


#: How often a durable write is tried before its message is left unsettled or rejected.
WRITE_ATTEMPTS = 3
_WRITE_PAUSES_S = (0.1, 0.5)


def durable_write(write: Callable[[], object]) -> Exception | None:
    """Run a durable write, trying again after a short pause when it fails; None once
    done, else the last error. A try that failed may have been done all the same (a
    timeout, a lost reply): the writes are idempotent where the broker allows it (Redis:
    a copy's id is derived from its source's, and enqueued once)."""
    error: Exception | None = None
    for attempt in range(WRITE_ATTEMPTS):
        try:
            write()
            return None
        except Exception as failure:
            error = failure
            logger.warning("durable write failed (try %d of %d)", attempt + 1, WRITE_ATTEMPTS, exc_info=True)
            if attempt < len(_WRITE_PAUSES_S):
                time.sleep(_WRITE_PAUSES_S[attempt])
    return error


def hold_poison(broker: dramatiq.Broker, task: HeldTask) -> bool:
    """Hold a message that cannot be run at all; logs one line. False if it could not be stored."""
    if durable_write(lambda: broker.held.hold(task)) is None:  # type: ignore[attr-defined]
        logger.error(
            "poison message %s on queue %r: %s; held",
            task.message_id,
            task.queue_name,
            task.reason,
            extra={"dramaturg": {"message_id": task.message_id, "queue": task.queue_name, "next": "held"}},
        )
        return True
    logger.critical(
        "poison message %s on queue %r: %s; it could not be held and stays on the queue",
        task.message_id,
        task.queue_name,
        task.reason,
    )
    return False
