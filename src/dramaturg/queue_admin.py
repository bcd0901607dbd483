"""Queue administration: list, peek at, purge and delete queues, the same on every broker.

An operator who sent 50,000 tasks to the wrong queue empties it; one who wonders what is
waiting looks without taking anything; a queue no longer used is removed with everything
dramaturg made for it::

    >>> dramaturg.peek_queue("imports", limit=3)
    [WaitingTask(message_id='1f0c...', queue='imports', actor='import_user', ...), ...]
    >>> dramaturg.purge_queue("imports")
    50000
    >>> dramaturg.delete_queue("old-imports")
    DeletedQueue(queue='old-imports', dropped=0, removed=['old-imports', 'old-imports.DQ', ...])

What each touches (the broker's own part is ``brokers/redis/admin.py`` and
``brokers/rabbitmq/admin.py``, behind :class:`QueueAdmin`):

- **purge** drops the tasks *waiting* on the queue (every priority lane), and with
  ``delayed=True`` those waiting out a delay in its delay queue. Never a running task
  (taken by a worker, not acknowledged), never a held one (:mod:`dramaturg.held` has its own
  purge). A delayed task a worker already took to wait out its delay is running for
  this purpose: it is not dropped (``stats`` counts it as delayed). Where there is a
  state store (:mod:`dramaturg.status`) each purged task's record says ``purged``, and a
  purged member of a batch ends as cancelled in it (its ``on_complete`` fires once every
  member ended). Those are written, step by step, before the step's tasks are gone for
  good; a step whose writes fail is given back to the queue, and the purge stops
  (:func:`purge_stopped`): no task is dropped without its record. A purge *killed*
  between taking a step and writing its records loses nothing either: on RabbitMQ the
  step's messages were not acknowledged and come back (a worker drops those whose record
  says purged); on Redis the step waits in a record of its own and, once it is a minute
  old, the next purge or ``queue list`` of any queue, or any worker, finishes it
  (:func:`finish_left_purges`; see :mod:`dramaturg.brokers.redis.admin`).
- **peek** reads the next waiting tasks without taking them. On Redis it reads the lists
  and hashes: no side effect. RabbitMQ has no way to read a message and leave it
  untouched: peek takes them with ``basic.get`` and gives them back at once
  (``basic.nack``, requeue). RabbitMQ puts each back where it was, but marks it
  *redelivered*, and for those milliseconds workers cannot take them; the worker that
  runs one later logs that it "was delivered again" (INFO). (The management API's "get
  messages" does the same thing the same way.)
- **delete** purges (delayed too) and removes the queue with its delay, dead-letter and
  held companions and, on Redis, its priority lanes (see :mod:`dramaturg.queues`). It
  refuses (:class:`~dramaturg.errors.QueueInUse`) while workers consume the queue, tasks
  of it run or are held, unless ``force=True``. A queue an actor of the application
  declares comes back when a worker or sender declares it again.

Names are checked first: a name with a reserved suffix (``imports.DQ``) is refused, and
an unknown one (:class:`~dramaturg.errors.QueueNotFound`) is named with the closest known.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dramatiq
from dramatiq import Message

from .batches.tracker import BATCH_OPTION, tracker_of
from .errors import BrokerUnreachable, DramaturgError, QueueInUse, QueueNotFound, StateUnavailable, did_you_mean
from .held import durable_write
from .masking import mask_text
from .queues import canonical_queue, message_priority
from .stats import QueueStats, queue_stats, stats_reader
from .status import state_store
from .status.store import queued_fields

__all__ = [
    "DeletedQueue",
    "LeftStep",
    "QueueAdmin",
    "WaitingTask",
    "delete_queue",
    "finish_left_purges",
    "list_queues",
    "peek_queue",
    "purge_queue",
    "queue_admin",
]

logger = logging.getLogger("dramaturg.queue_admin")

#: How many characters of a task's arguments peek shows.
ARGUMENTS_WIDTH = 60
#: The most tasks one peek shows (on RabbitMQ it holds them all for a moment).
MAX_PEEK = 1000

#: Called with the bodies of the tasks a purge takes, before they are gone for good
#: (RabbitMQ: before they are acknowledged), so their records can say ``purged``. When it
#: raises, the purge gives those tasks back to the queue and stops (:func:`purge_stopped`).
OnPurged = Callable[[Sequence[bytes]], None]


def purge_stopped(
    error: Exception, purged: int, taken: int, lost: Exception | None = None, *, taken_over: bool = False
) -> BrokerUnreachable:
    """The error of a purge whose records could not be written midway: ``purged`` tasks
    were dropped and recorded before; the ``taken`` of the last step are back on the
    queue, unless giving them back failed too (``lost``: then the log names them, and on
    Redis they wait in their purge step, finished as purged by a later purge or worker), or
    another process had taken the step over (``taken_over``, on Redis: the purge was slower
    than ``LEFT_STEP_MS``), which records them as purged."""
    text = f"the purge stopped: {error}; {purged} task(s) were purged and recorded"
    if taken_over:
        return BrokerUnreachable(
            f"{text}; the {taken} taken last are purged too: another process took them over and records them"
        )
    if lost is None:
        return BrokerUnreachable(f"{text}, the {taken} taken last are back on the queue: try again once it answers")
    return BrokerUnreachable(
        f"{text}; the {taken} taken last could not be given back either ({type(lost).__name__}: {lost}):"
        " their ids and bodies are in the log at ERROR (on Redis a later purge, or a worker, records them as"
        " purged once the store answers)"
    )


@dataclass(frozen=True)
class WaitingTask:
    """A task waiting on its queue, as :func:`peek_queue` shows it. Times are ms since the epoch."""

    message_id: str
    queue: str
    actor: str
    #: The positional and keyword arguments as JSON, secrets masked, cut to ``ARGUMENTS_WIDTH``.
    arguments: str
    enqueued_at: int | None
    priority: int
    #: When a delayed task becomes due; ``None`` for one that may run now.
    due_at: int | None = None

    @classmethod
    def from_body(cls, broker: dramatiq.Broker, body: bytes) -> WaitingTask:
        """The task a Dramatiq message body describes; an undecodable one says so."""
        try:
            message = Message.decode(body)
        except Exception:  # a foreign or broken body: shown, never fatal to the listing
            return cls(
                message_id="?",
                queue="?",
                actor="? (undecodable)",
                arguments=shorten(mask_text(body.decode(errors="replace"))),
                enqueued_at=None,
                priority=0,
            )
        arguments = json.dumps(list(message.args), default=str)
        if message.kwargs:
            arguments += " " + json.dumps(dict(message.kwargs), default=str)
        eta = message.options.get("eta")
        return cls(
            message_id=message.message_id,
            queue=canonical_queue(message.queue_name),
            actor=message.actor_name,
            arguments=shorten(mask_text(arguments)),
            enqueued_at=message.message_timestamp,
            priority=message_priority(broker, message),
            due_at=int(eta) if eta is not None else None,
        )


@dataclass(frozen=True)
class DeletedQueue:
    """What :func:`delete_queue` did: tasks dropped with the queue, and the broker names removed."""

    queue: str
    #: Waiting and delayed tasks dropped (recorded as ``purged``), plus, with ``force``,
    #: the held ones.
    dropped: int
    removed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LeftStep:
    """A step of a purge that stopped midway (killed), finished by :func:`finish_left_purges`:
    its ``tasks`` were taken off ``queue`` at ``taken_at`` (ms since the epoch) and are now
    recorded as purged."""

    queue: str
    tasks: int
    taken_at: int


class QueueAdmin(ABC):
    """One broker's part of queue administration. Get it with :func:`queue_admin`."""

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker

    @abstractmethod
    def exists(self, queue: str) -> bool:
        """Whether the broker holds anything of ``queue`` (a canonical name)."""

    @abstractmethod
    def peek(self, queue: str, limit: int) -> list[bytes]:
        """The bodies of up to ``limit`` waiting tasks, next first (ready lanes, then delayed)."""

    @abstractmethod
    def purge(self, queue: str, *, delayed: bool, on_purged: OnPurged) -> int:
        """Drop the waiting tasks of ``queue`` (and its delayed ones); returns how many."""

    def finish_left(self, recorder: Callable[[str], OnPurged], *, limit: int | None = None) -> list[LeftStep]:
        """Finish what purges that died left taken and unrecorded (at most ``limit`` steps),
        writing their records with ``recorder(queue)``. None on RabbitMQ: a purge acknowledges
        only after its writes, so a dead purge's messages are redelivered, and dropped as purged
        or run (see :mod:`dramaturg.brokers.rabbitmq.admin`)."""
        return []

    @abstractmethod
    def usage(self, queue: str) -> tuple[int, int, int]:
        """``(workers, running, held)`` of ``queue``, read now (not from lagging statistics)."""

    @abstractmethod
    def parts(self, queue: str) -> list[str]:
        """The names of what the broker keeps for ``queue`` now (the queue, its delay and
        dead-letter queues, its held store, its lanes), as an operator reads them."""

    @abstractmethod
    def remove(self, queue: str) -> None:
        """Remove what the broker keeps for ``queue``, held tasks included."""


def queue_admin(broker: dramatiq.Broker | None = None) -> QueueAdmin:
    """The queue administration of ``broker`` (default: the bootstrapped one)."""
    if broker is None:
        from .app import get_broker

        broker = get_broker()
    admin = getattr(broker, "queue_admin", None)
    if not isinstance(admin, QueueAdmin):
        raise DramaturgError(
            f"{broker!r} has no queue administration (RabbitMQ, Redis and embedded have);"
            " build brokers with dramaturg.bootstrap()"
        )
    return admin


def list_queues(broker: dramatiq.Broker | None = None) -> list[QueueStats]:
    """Every known queue with its counts: :func:`dramaturg.queue_stats` for all of them."""
    return queue_stats(None, broker)


def check_queue(queue: str, broker: dramatiq.Broker | None = None) -> str:
    """``queue`` if it names a queue the broker or the application knows; else
    :class:`~dramaturg.errors.SendError` (not a queue name, a reserved suffix) or
    :class:`~dramaturg.errors.QueueNotFound` naming the closest known queue."""
    admin = queue_admin(broker)
    admin.broker.held.check_queue(queue)  # type: ignore[attr-defined]
    reader = stats_reader(admin.broker)
    if queue in reader.known_queues() or admin.exists(queue):
        return queue
    known = sorted(row.queue for row in reader.read(None))
    if queue in known:
        return queue
    hint = did_you_mean(queue, known) or (f"; known queues: {', '.join(known[:10])}" if known else "")
    raise QueueNotFound(f"no queue {queue!r} on the broker or among the actors' queues{hint}")


def peek_queue(queue: str, limit: int = 10, broker: dramatiq.Broker | None = None) -> list[WaitingTask]:
    """Up to ``limit`` waiting tasks of ``queue``, next first, without taking them (see the
    module docstring for what that costs on RabbitMQ)."""
    if not 1 <= limit <= MAX_PEEK:
        raise ValueError(f"limit must be from 1 to {MAX_PEEK}, not {limit}")
    admin = queue_admin(broker)
    check_queue(queue, admin.broker)
    return [WaitingTask.from_body(admin.broker, body) for body in admin.peek(queue, limit)]


def purge_queue(queue: str, *, delayed: bool = False, broker: dramatiq.Broker | None = None) -> int:
    """Drop the waiting tasks of ``queue`` (with ``delayed``, those in its delay queue too);
    returns how many. Running and held tasks stay. Their records say ``purged``. What an
    earlier purge that died left unrecorded is finished first (:func:`finish_left_purges`)."""
    admin = queue_admin(broker)
    check_queue(queue, admin.broker)
    finish_left_purges(admin.broker)
    return admin.purge(queue, delayed=delayed, on_purged=_recorder(admin.broker, queue))


def finish_left_purges(broker: dramatiq.Broker | None = None, *, limit: int | None = None) -> list[LeftStep]:
    """Finish what purges that died (killed between taking tasks and recording them) left
    behind, on any queue of the broker: their tasks' records say ``purged``, their batch
    members end as cancelled, their unique keys are released. Returns what was finished
    (in one WARNING line); on RabbitMQ always nothing. ``purge_queue``, ``dramaturg
    queue list`` and the workers' recovery thread call it; only steps a minute old are
    taken (a younger one may be its purge's, still writing)."""
    admin = queue_admin(broker)
    recorders: dict[str, OnPurged] = {}

    def recorder(queue: str) -> OnPurged:
        if queue not in recorders:
            recorders[queue] = _recorder(admin.broker, queue)
        return recorders[queue]

    left = admin.finish_left(recorder, limit=limit)
    if left:
        counts: dict[str, int] = {}
        for step in left:
            counts[step.queue] = counts.get(step.queue, 0) + step.tasks
        oldest_s = (time.time() * 1000 - min(step.taken_at for step in left)) / 1000
        logger.warning(
            "finished what a purge that stopped midway (%.0f s ago) left unrecorded: %s recorded as purged",
            oldest_s,
            ", ".join(f"{count} task(s) of {queue}" for queue, count in sorted(counts.items())),
        )
    return left


def delete_queue(queue: str, *, force: bool = False, broker: dramatiq.Broker | None = None) -> DeletedQueue:
    """Remove ``queue`` with its companions (see the module docstring); refuses with
    :class:`~dramaturg.errors.QueueInUse` while it is in use, unless ``force``."""
    admin = queue_admin(broker)
    check_queue(queue, admin.broker)
    workers, running, held = admin.usage(queue)
    if not force and (workers or running or held):
        reasons = [
            f"{count} {what}"
            for count, what in (
                (workers, "worker process(es) consume it"),
                (running, "task(s) running"),
                (held, "task(s) held (dramaturg held list " + queue + ")"),
            )
            if count
        ]
        raise QueueInUse(f"queue {queue!r} is in use: {', '.join(reasons)}; stop them first, or give --force")
    removed = admin.parts(queue)
    dropped = admin.purge(queue, delayed=True, on_purged=_recorder(admin.broker, queue))
    admin.remove(queue)
    return DeletedQueue(queue=queue, dropped=dropped + (held if force else 0), removed=removed)


def _recorder(broker: dramatiq.Broker, queue: str) -> OnPurged:
    """Write ``purged`` records for the bodies given, and wait until they are written
    (a purge that says it is done has said so in the store too). A purged member of a
    batch ends as cancelled in it (neither succeeded nor failed), as a cancelled waiting
    task does, and what that fires (the batch's ``on_complete``) is sent."""
    try:
        store = state_store(broker)
    except StateUnavailable:
        return lambda bodies: None
    try:
        store.client.ping()
    except Exception as error:
        # Before anything is dropped: records and batch ends written while it does not
        # answer would be kept in this process only, and lost when the command exits.
        raise BrokerUnreachable(
            f"the state store did not answer ({type(error).__name__}: {error}); nothing was purged:"
            " try again once it answers"
        ) from None

    from .flow.control import UNIQUE_OPTION, FlowControl

    control = next((m for m in broker.middleware if isinstance(m, FlowControl)), None)

    def record(bodies: Sequence[bytes]) -> None:
        now = time.time()
        records: dict[str, tuple[float, dict[str, Any]]] = {}
        queued: dict[str, tuple[float, dict[str, Any]]] = {}  # the same, as they were
        members: list[tuple[str, str]] = []
        uniques: list[tuple[str, str]] = []
        for body in bodies:
            try:
                message = Message.decode(body)
            except Exception:  # an undecodable body has no id to record
                continue
            fields = queued_fields(message, None)
            queued[message.message_id] = (now, dict(fields))
            fields.update(state="purged", finished_at=int(now * 1000), reason=f"purged from {queue}")
            records[message.message_id] = (now, fields)
            unique_key = message.options.get(UNIQUE_OPTION)
            if unique_key and control is not None:
                uniques.append((str(unique_key), message.message_id))
            batch_id = message.options.get(BATCH_OPTION)
            if batch_id:
                members.append((str(batch_id), message.message_id))
        # Written now, not buffered: a store that stops answering midway raises here, and
        # the purge gives these tasks back instead of dropping them with no record (the
        # buffer would keep the records in this process only, lost when the command exits).
        store.flush()  # what this process buffered before (a send's records), older news
        error = durable_write(lambda: store.write_now(records))
        if error is None and members:
            error = _end_members(broker, members)
            # The tasks go back: their records must not say purged (a worker drops a task
            # delivered again whose record does). Tried; the error says so if it failed.
            again = time.time()  # newer news than the purged records
            restore = {message_id: (again, fields) for message_id, (_, fields) in queued.items()}
            if error is not None and durable_write(lambda: store.write_now(restore)) is not None:
                raise BrokerUnreachable(
                    f"the state store stopped answering ({type(error).__name__}: {error}); the records of the"
                    " tasks taken last still say purged: on RabbitMQ a worker drops them when it takes them"
                ) from None
        if error is not None:
            raise BrokerUnreachable(f"the state store stopped answering ({type(error).__name__}: {error})") from None
        for unique_key, message_id in uniques:  # a purged unique task frees its key (logged if not)
            control.release_unique(broker, unique_key, message_id)  # type: ignore[union-attr]

    return record


def _end_members(broker: dramatiq.Broker, members: Sequence[tuple[str, str]]) -> Exception | None:
    """End purged members as cancelled in their batches, each write tried a few times;
    the error when one still fails (the purge then gives the tasks back)."""
    try:
        tracker = tracker_of(broker)
    except StateUnavailable as error:  # no batch state configured: say what their batches miss
        logger.warning("purged %d batch members, but their batches cannot be told: %s", len(members), error)
        return None
    writer = tracker.writer(broker)
    for batch_id, message_id in members:
        answer: list[list[str]] = []
        failure = durable_write(functools.partial(_end_one, writer, (batch_id, message_id, "c"), answer))
        if failure is not None:
            return failure
        if answer[0]:
            tracker.fire(broker, batch_id, answer[0])
    return None


def _end_one(writer: Any, end: tuple[str, str, str], answer: list[list[str]]) -> None:
    answer.append(writer.end(end))


def shorten(text: str, width: int = ARGUMENTS_WIDTH) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def as_dicts(tasks: Sequence[WaitingTask]) -> list[dict[str, Any]]:
    """The JSON of a peek."""
    from dataclasses import asdict

    return [asdict(task) for task in tasks]
