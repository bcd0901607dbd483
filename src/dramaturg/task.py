"""The running task, as its handler sees it: ``dramaturg.current_task()``.

::

    @dramaturg.actor(queue_name="imports", max_retries=5)
    def import_user(row: dict) -> None:
        task = dramaturg.current_task()
        if not row.get("email"):
            task.hold("row has no email")     # parked for examination; the handler stops here
        if mail_server_busy():
            task.retry(delay=30_000)          # again in 30 s, attempt + 1
        task.success()                        # optional: returning normally is success too

The outcomes are exceptions the handler raises and the framework catches outside it.
They derive from :class:`BaseException`, not :class:`Exception`, so a handler's own
``except Exception:`` cannot swallow them::

    TaskOutcome (BaseException)
     +-- Success     the task is done; code after success() does not run
     +-- Retry       run again after ``delay_ms`` (counts toward max_retries)
     +-- Hold        park it with a reason until someone kicks it
     +-- SuspendQueue  put it back untouched; this worker leaves its queue alone for a while

Beside the handle, the middleware keep one record of each run, a :class:`Run`: when it
started, its time-to-run deadline, and what became of it (a :class:`RunOutcome`, with
the reason and the error). The first hook of a worker that needs it makes it
(:func:`start_run`); the others, and the broker's consumer when it acknowledges the
message, read it (:func:`run_of`, :func:`outcome_of`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn

from .durations import Duration, parse_ms
from .errors import NotInTask, StateUnavailable
from .queues import canonical_queue

if TYPE_CHECKING:
    from dramatiq import Message

    from .checkpoints import RunCheckpoint
    from .middleware.ttr import Deadline

__all__ = [
    "Hold",
    "NotInTask",
    "Retry",
    "Run",
    "RunOutcome",
    "Success",
    "SuspendQueue",
    "Task",
    "TaskOutcome",
    "current_run",
    "current_task",
    "current_task_or_none",
    "outcome_of",
    "run_of",
    "start_run",
]


class TaskOutcome(BaseException):
    """Raised inside a handler to end it with an outcome; caught by the framework."""


class Success(TaskOutcome):
    """The task succeeded; ``value`` is its result."""

    def __init__(self, value: Any = None) -> None:
        super().__init__("success")
        self.value = value


class Retry(TaskOutcome):
    """Run the task again after ``delay`` (ms, a timedelta, or ``"30s"``, ``"5m"``: see
    :mod:`dramaturg.durations`), kept as ``delay_ms``; None: the actor's backoff."""

    def __init__(self, delay: Duration | None = None, reason: str = "retry requested") -> None:
        self.delay_ms = None if delay is None else parse_ms(delay, what="retry")
        super().__init__(reason)
        self.reason = reason


class Hold(TaskOutcome):
    """Park the task durably with ``reason``; it runs again only when kicked."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SuspendQueue(TaskOutcome):
    """Every task of this queue would fail for now: stop taking them for ``delay``.

    The task is put back untouched (not counted as an attempt), and this worker process
    takes nothing from the task's queue until ``delay`` (ms, a timedelta, or ``"30s"``,
    ``"5m"``: see :mod:`dramaturg.durations`) is over; its other queues go on. See
    :mod:`dramaturg.suspension`.
    """

    def __init__(self, delay: Duration, reason: str = "queue suspended") -> None:
        self.delay_ms = parse_ms(delay, what="SuspendQueue")
        if self.delay_ms <= 0:
            raise ValueError(f"SuspendQueue: the delay must be more than 0, got {delay!r}")
        super().__init__(reason)
        self.reason = reason


class RunOutcome(StrEnum):
    """What became of one run of a task: the one set of names for it in the code.

    Each place that shows it says it in its own words, from these: the metrics label
    them so (``dramaturg_tasks_total{outcome=...}``); task status says "succeeded",
    "retrying", "held", and "failed" for a rejected one; :func:`outcome_of` says "done"
    for a run that succeeded.
    """

    SUCCEEDED = "succeeded"  #: the handler returned (or called ``success()``); acknowledged
    RETRIED = "retried"  #: a copy runs again after a delay; acknowledged once it was published
    HELD = "held"  #: stored in the held store; acknowledged once it was stored
    RELEASED = "released"  #: put back untouched (its worker stopped, or its queue was suspended)
    REJECTED = "rejected"  #: into the dead-letter queue: its outcome could not be written
    UNSETTLED = "unsettled"  #: neither acknowledged nor rejected: the broker was unreachable; it runs again
    CANCELLED = "cancelled"  #: cancelled (skipped, or interrupted) on request; acknowledged, never retried


class Run:
    """What the middleware know of one run of a task, from a worker's first hook for its
    message to its last.

    Made once per message a worker processes, by :func:`start_run` in the first
    ``before_process_message`` hook that needs it, and read through :func:`run_of`. It
    travels with the message (one attribute on Dramatiq's message proxy), since the last
    to read it, the consumer acknowledging the message, may run in another thread.
    """

    __slots__ = (
        "attempt",
        "checkpoint",
        "context_outside",
        "context_undo",
        "deadline",
        "error",
        "outcome",
        "purged",
        "reason",
        "started",
    )

    def __init__(self) -> None:
        #: What became of it; None while nothing was decided: its handler returned (a
        #: success), or it was skipped before :class:`~dramaturg.middleware.Outcomes` saw it.
        self.outcome: RunOutcome | None = None
        #: Why it was held (with :attr:`RunOutcome.HELD`).
        self.reason: str | None = None
        #: The error its handler raised, ``Type: message (at file:line)``; None when it
        #: raised none, or only asked for an outcome (``retry()``, ``hold()``).
        self.error: str | None = None
        #: When it started (``time.monotonic()`` seconds): the one start time of the run.
        self.started = time.monotonic()
        #: Its time-to-run deadline, armed by :class:`~dramaturg.middleware.TimeToRun`.
        self.deadline: Deadline | None = None
        #: The attempt that ended, set once Outcomes counted its failure in the message's
        #: ``retries`` option (for Dramatiq's ``on_failure`` callbacks); None: that option says it.
        self.attempt: int | None = None
        #: Its record says a queue purge dropped it, yet it was delivered again (on RabbitMQ,
        #: a purge that lost its connection before acknowledging it): it is dropped, not run,
        #: and its record stays ``purged`` (see :class:`~dramaturg.status.recorder.StatusRecorder`).
        self.purged = False
        # The context middleware's (dramaturg.task_context): the context of the thread
        # before the run (an eager run is in its sender's thread), and what undoes the restorers'.
        self.context_outside: Mapping[str, Any] | None = None
        self.context_undo: Sequence[Callable[[], object]] = ()
        #: This run's view of its task's checkpoint, made on the handler's first use of it
        #: (:meth:`Task.checkpoint`), read by the Checkpoints middleware when the run ends.
        self.checkpoint: RunCheckpoint | None = None

    def __repr__(self) -> str:
        outcome = "undecided" if self.outcome is None else self.outcome.value
        return f"<Run {outcome}{f': {self.reason}' if self.reason else ''}>"


#: The attribute of the message (Dramatiq's proxy) that holds its run.
_RUN = "_dramaturg_run"


def start_run(message: Any) -> Run:
    """The :class:`Run` of ``message``, made by the first hook that asks for it.

    The one place a run is made; hooks that run before it or whose middleware may be
    absent (Metrics, the context and status middleware, Outcomes) call this, the others
    :func:`run_of`. About 0.3 us for the first call, a dict lookup after.
    """
    state = message.__dict__  # not getattr: a proxy's __getattr__ costs ~1 us for a missing name
    run: Run | None = state.get(_RUN)
    if run is None:
        run = state[_RUN] = Run()
    return run


def run_of(message: Any) -> Run | None:
    """The :class:`Run` of ``message``; None when no hook started one (it was skipped
    before any did, or it was never processed here)."""
    state = getattr(message, "__dict__", None)
    return None if state is None else state.get(_RUN)


def outcome_of(message: Any) -> str:
    """What became of a processed message: done, retried, held, released, rejected, or
    unsettled (its outcome could not be written while the broker was unreachable: it runs
    again). The values of :class:`RunOutcome`, "done" for a run that succeeded or for
    which none was decided."""
    run = run_of(message)
    outcome = None if run is None else run.outcome
    return "done" if outcome is None or outcome is RunOutcome.SUCCEEDED else outcome.value


def taken_back(message: Any) -> bool:
    """Whether the broker has taken ``message``'s delivery back to its queue already, and
    delivers it again by itself: RabbitMQ does when the channel it came on closes (a worker
    stopping, a connection lost). Putting a copy back as well would queue the task twice."""
    check = getattr(message, "taken_back", None)
    return bool(check()) if callable(check) else False


class Task:
    """The handle of the task being run. Get it with :func:`current_task`.

    ``attempt`` is 1 on the first run and grows with every retry; a kicked task starts
    again at 1 (``kicks`` counts how often it was kicked).
    """

    __slots__ = ("_message", "_run")

    def __init__(self, message: Message[Any], run: Run | None = None) -> None:
        self._message = message
        self._run = Run() if run is None else run

    @property
    def started_at(self) -> float:
        """When the run started, in ``time.monotonic()`` seconds."""
        return self._run.started

    @property
    def message_id(self) -> str:
        return str(self._message.message_id)

    @property
    def actor_name(self) -> str:
        return str(self._message.actor_name)

    @property
    def queue_name(self) -> str:
        """The queue the task belongs to (its delay queue's canonical name)."""
        return canonical_queue(self._message.queue_name)

    @property
    def attempt(self) -> int:
        return int(self._message.options.get("retries", 0)) + 1

    @property
    def kicks(self) -> int:
        return int(self._message.options.get("dramaturg_kicks", 0))

    @property
    def context(self) -> Mapping[str, Any]:
        """The context the task was sent in (read-only; see :mod:`dramaturg.task_context`)."""
        return MappingProxyType(dict(self._message.options.get("dramaturg_context") or {}))

    @property
    def message(self) -> Message[Any]:
        """The underlying Dramatiq message (read it, do not change it)."""
        return self._message

    def success(self, value: Any = None) -> NoReturn:
        """End the task successfully now; code after this call does not run."""
        raise Success(value)

    def retry(self, delay: Duration | None = None, reason: str = "retry requested") -> NoReturn:
        """Run the task again after ``delay`` (ms, a timedelta, or ``"30s"``, ``"5m"``;
        None: the actor's backoff).

        Counts toward ``max_retries``; when they are used up the task is held with the
        reason "retries exhausted".
        """
        raise Retry(delay, reason)

    def hold(self, reason: str) -> NoReturn:
        """Park the task for examination with ``reason``; it is not run again until kicked."""
        raise Hold(reason)

    def touch(self, ms: Duration | None = None) -> bool:
        """Say the task is still working: its deadline moves to now + its ttr (or + ``ms``:
        ms, a timedelta, or ``"30s"``, ``"5m"``).

        Returns False, and logs a warning, when the deadline had already passed (the task
        is being interrupted); True otherwise.
        """
        extension = None if ms is None else parse_ms(ms, what="touch")
        for observer in tuple(touch_observers):  # a broker closing meanwhile removes its own
            observer(self)
        deadline = self._run.deadline
        if deadline is None:
            return True
        return deadline.touch(extension)

    def progress(self, fraction: float, text: str = "") -> None:
        """Say how far the task has come: ``fraction`` from 0.0 to 1.0 and a few words
        (``task.progress(0.4, "row 4,000 of 10,000")``).

        It shows in the task's status while it runs (``dramaturg status ID``), and for a
        member of a batch in the batch's status (``dramaturg batch show``), where its
        fraction counts toward the batch's percent until it ends. It is written in the
        background, at most one flush interval (100 ms) later; without a state store it
        is kept nowhere. Raises ValueError for a fraction outside 0..1.
        """
        value = float(fraction)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"progress: the fraction must be between 0 and 1, got {fraction!r}")
        for observer in tuple(progress_observers):  # as in touch()
            observer(self, value, text)

    def checkpoint(self, state: Any) -> None:
        """Save ``state`` (a small JSON value: ``{"offset": 4000}``) as the place this task
        goes on from if it runs again: after a crash, an interrupt, a retry or a kick, the
        next run reads it as :attr:`checkpoint_state`.

        Written to the state store before it returns (see :mod:`dramaturg.checkpoints`).
        Raises ValueError for a value that is not JSON or is over 64 KiB as JSON, and
        :class:`~dramaturg.StateUnavailable` where there is no state store (RabbitMQ
        without ``[state] url``).
        """
        self._checkpoint().save(state)

    @property
    def checkpoint_state(self) -> Any:
        """The last :meth:`checkpoint` of this task, by any of its runs; None when none was
        saved (a first run). Read from the state store on first use in a run."""
        return self._checkpoint().state

    def _checkpoint(self) -> RunCheckpoint:
        run = self._run
        view = run.checkpoint
        if view is None:
            import dramatiq

            from .checkpoints import Checkpoints

            broker = dramatiq.get_broker()
            keeper = next((m for m in broker.middleware if isinstance(m, Checkpoints)), None)
            if keeper is None:
                raise StateUnavailable(
                    "checkpoints need dramaturg's Checkpoints middleware on the broker: make the broker"
                    " with dramaturg.bootstrap() (or add dramaturg.checkpoints.Checkpoints to it)"
                )
            view = run.checkpoint = keeper.for_run(broker, self.message_id)
        return view

    def time_left(self) -> int | None:
        """Milliseconds before the task's time to run is up (None when it has no deadline)."""
        deadline = self._run.deadline
        return None if deadline is None else deadline.time_left_ms()

    def __repr__(self) -> str:
        return f"<Task {self.actor_name} {self.message_id} attempt {self.attempt}>"


_current: ContextVar[Task | None] = ContextVar("dramaturg_current_task", default=None)
#: Called with the task on each ``touch()``, in the handler's thread (the metrics count them).
touch_observers: list[Callable[[Task], None]] = []
#: Called with the task, the fraction and the text on each ``progress()``, in the handler's
#: thread (the batches record them).
progress_observers: list[Callable[[Task, float, str], None]] = []


def current_task() -> Task:
    """The task whose handler is running in this thread (or coroutine).

    Raises :class:`NotInTask` when called anywhere else (at import, in a web request).
    """
    task = _current.get()
    if task is None:
        raise NotInTask("current_task() was called outside a task handler; call it inside an actor's function")
    return task


def current_task_or_none() -> Task | None:
    """The task whose handler is running in this thread (or coroutine), or None anywhere
    else: for code that runs both inside and outside handlers (a log formatter, a helper)."""
    return _current.get()


def current_run() -> Run | None:
    """The :class:`Run` of the task whose handler is running in this thread, or None."""
    task = _current.get()
    return None if task is None else task._run


def set_current_task(task: Task | None) -> None:
    """Make ``task`` the one :func:`current_task` returns in this thread (None: no task).

    For the middleware that runs handlers (:class:`~dramaturg.middleware.Outcomes` sets
    it before the handler runs and clears it after); a handler has no use for it.
    """
    _current.set(task)
