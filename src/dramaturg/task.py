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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from datetime import timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn

from .config import parse_duration_ms
from .errors import NotInTask
from .queues import canonical_queue

if TYPE_CHECKING:
    from dramatiq import Message

    from .middleware.ttr import Deadline

__all__ = ["Hold", "NotInTask", "Retry", "Success", "SuspendQueue", "Task", "TaskOutcome", "current_task"]


class TaskOutcome(BaseException):
    """Raised inside a handler to end it with an outcome; caught by the framework."""


class Success(TaskOutcome):
    """The task succeeded; ``value`` is its result."""

    def __init__(self, value: Any = None) -> None:
        super().__init__("success")
        self.value = value


class Retry(TaskOutcome):
    """Run the task again after ``delay_ms`` (None: the actor's backoff)."""

    def __init__(self, delay: int | timedelta | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay_ms = to_ms(delay) if delay is not None else None
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
    ``"5m"``) is over; its other queues go on. See :mod:`dramaturg.suspension`.
    """

    def __init__(self, delay: int | timedelta | str, reason: str = "queue suspended") -> None:
        try:
            self.delay_ms = parse_duration_ms(delay)
        except ValueError as error:
            raise ValueError(f"SuspendQueue: {error}") from None
        if self.delay_ms <= 0:
            raise ValueError(f"SuspendQueue: the delay must be more than 0, got {delay!r}")
        super().__init__(reason)
        self.reason = reason


def to_ms(value: int | float | timedelta) -> int:
    """Milliseconds from an int/float (ms) or a timedelta."""
    if isinstance(value, timedelta):
        return int(value.total_seconds() * 1000)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"expected milliseconds >= 0 or a timedelta, got {value!r}")
    return int(value)


class Task:
    """The handle of the task being run. Get it with :func:`current_task`.

    ``attempt`` is 1 on the first run and grows with every retry; a kicked task starts
    again at 1 (``kicks`` counts how often it was kicked).
    """

    __slots__ = ("_deadline", "_message", "started_at")

    def __init__(self, message: Message[Any]) -> None:
        self._message = message
        self._deadline: Deadline | None = None
        self.started_at = time.monotonic()

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

    def retry(self, delay: int | timedelta | None = None, reason: str = "retry requested") -> NoReturn:
        """Run the task again after ``delay`` (ms or timedelta; None: the actor's backoff).

        Counts toward ``max_retries``; when they are used up the task is held with the
        reason "retries exhausted".
        """
        raise Retry(delay, reason)

    def hold(self, reason: str) -> NoReturn:
        """Park the task for examination with ``reason``; it is not run again until kicked."""
        raise Hold(reason)

    def touch(self, ms: int | timedelta | None = None) -> bool:
        """Say the task is still working: its deadline moves to now + its ttr (or + ``ms``).

        Returns False, and logs a warning, when the deadline had already passed (the task
        is being interrupted); True otherwise.
        """
        for observer in touch_observers:
            observer(self)
        if self._deadline is None:
            return True
        return self._deadline.touch(None if ms is None else to_ms(ms))

    def time_left(self) -> int | None:
        """Milliseconds before the task's time to run is up (None when it has no deadline)."""
        return None if self._deadline is None else self._deadline.time_left_ms()

    def __repr__(self) -> str:
        return f"<Task {self.actor_name} {self.message_id} attempt {self.attempt}>"


_current: ContextVar[Task | None] = ContextVar("dramaturg_current_task", default=None)
#: Called with the task on each ``touch()``, in the handler's thread (the metrics count them).
touch_observers: list[Callable[[Task], None]] = []


def current_task() -> Task:
    """The task whose handler is running in this thread (or coroutine).

    Raises :class:`NotInTask` when called anywhere else (at import, in a web request).
    """
    task = _current.get()
    if task is None:
        raise NotInTask("current_task() was called outside a task handler; call it inside an actor's function")
    return task
