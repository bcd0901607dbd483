"""Time to run (TTR): how long a task may run before it is interrupted and retried.

The deadline is kept inside the worker, since no broker has a per-message lease that
can be extended: when a task starts, its deadline is now + ``ttr``; ``touch()`` moves it
to now + ``ttr`` again (or + the given ms); when it passes, a monitor thread raises
:class:`TimeToRunExceeded` in the handler's thread. It derives from Dramatiq's
``Interrupt`` (a ``BaseException``), so ``except Exception`` cannot swallow it, and the
task is retried (counting an attempt) or held with the reason "TTR exceeded" when its
retries are used up.

``ttr`` resolves as message option > actor option > ``[queues.<name>] ttr`` >
``[tasks] ttr`` (10 minutes, like Dramatiq's default time limit). This middleware takes
the place of Dramatiq's ``TimeLimit``: a hard limit that ``touch()`` could not move
would kill long tasks that report progress, so there is one limit, and it moves.

Like Dramatiq's ``TimeLimit``, the interrupt lands when the handler next runs Python
code: a blocking call in C (a long ``time.sleep``, a socket read without a timeout)
delays it until that call returns. ``async def`` handlers are interrupted the same way
(their coroutine is cancelled).

The race where the deadline passes just as the handler returns is closed: the handler's
wrapper disarms the deadline first thing after it returns, clears an interrupt that was
raised but not yet delivered, and ignores one delivered while disarming, so a task that
finished is never run again because of its TTR. An interrupt that lands in the wrapper
before the handler was called is not taken for one that came too late: the task was
interrupted, and is retried (or released, for a stop).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import dramatiq
from dramatiq.middleware import Interrupt

from ..queues import canonical_queue
from ..task import run_of, start_run

__all__ = ["INTERRUPTS", "Deadline", "StopRequested", "TaskCancelled", "TimeToRun", "TimeToRunExceeded"]

logger = logging.getLogger("dramaturg.ttr")


class TimeToRunExceeded(Interrupt):
    """Raised in a handler whose time to run has passed."""


class StopRequested(Interrupt):
    """Raised in a task still running when its worker stops and the grace period is over.

    The task is requeued untouched (not counted as an attempt) and runs again later.
    """


class TaskCancelled(Interrupt):
    """Raised in a task that was cancelled (:func:`dramaturg.cancel`) while it ran, or
    just before its handler would have run. It is delivered as the TTR interrupt is (see
    :mod:`dramaturg.cancelling.watch`); the task ends as cancelled: acknowledged, never
    retried, never counted as failed.
    """


#: The interrupts raised in a handler's thread from outside it: a handler's wrapper that
#: catches one after the handler returned knows the task had finished (see the module).
INTERRUPTS: tuple[type[Interrupt], ...] = (TimeToRunExceeded, StopRequested, TaskCancelled)


class Deadline:
    """The deadline of one running task. States: armed -> fired or disarmed.

    Its own lock orders the two parties that can change it, its task's thread (touch,
    disarm) and the monitor (fire), so threads running other tasks never wait on it.
    """

    __slots__ = ("at", "fired", "lock", "monitor", "thread_id", "ttr_ms")

    def __init__(self, monitor: _Monitor, thread_id: int, ttr_ms: int) -> None:
        self.monitor = monitor
        self.thread_id = thread_id
        self.ttr_ms = ttr_ms
        self.lock = threading.Lock()
        self.at: float | None = time.monotonic() + ttr_ms / 1000  # None once disarmed
        self.fired = False

    def touch(self, ms: int | None = None) -> bool:
        """Move the deadline to now + ``ms`` (default: the task's ttr). False if it already fired."""
        with self.lock:
            if self.fired:
                logger.warning(
                    "touch() came after the time to run (%d ms) had passed; the task is being interrupted",
                    self.ttr_ms,
                )
                return False
            if self.at is None:
                return True
            self.at = time.monotonic() + (self.ttr_ms if ms is None else ms) / 1000
            at = self.at
        self.monitor.wake_for(at)
        return True

    def time_left_ms(self) -> int:
        """Milliseconds before the deadline (0 once it passed)."""
        at = self.at
        return 0 if at is None or self.fired else max(0, int((at - time.monotonic()) * 1000))

    def fire(self, exception: type[BaseException], due_by: float | None = None) -> bool:
        """Raise ``exception`` in the task's thread if still armed (and due by ``due_by``)."""
        with self.lock:
            if self.at is None or self.fired or (due_by is not None and self.at > due_by):
                return False
            self.fired = True
            dramatiq.middleware.raise_thread_exception(self.thread_id, exception)
            return True

    def disarm(self) -> None:
        """Forget the deadline; cancel its interrupt if it was raised but has not landed yet."""
        with self.lock:
            if self.at is None:
                return
            self.at = None
            if self.fired:
                # PyThreadState_SetAsyncExc with NULL clears a pending async exception.
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id), None)
        armed = self.monitor.armed
        if armed.get(self.thread_id) is self:
            armed.pop(self.thread_id, None)


class _Monitor(threading.Thread):
    """Sleeps until the earliest armed deadline (at most :data:`POLL_S`), then interrupts
    the threads whose deadline passed.

    A worker thread runs one task at a time, so the armed deadlines are a dict by thread,
    written without a shared lock; the monitor scans it (a few entries) when it wakes. It
    is woken early only for a deadline earlier than the one it sleeps until: waking it, or
    sharing one lock, for every task (thousands a second) cost more CPU than the rest of
    the middleware together (benchmarks/throughput.py).
    """

    def __init__(self) -> None:
        super().__init__(name="dramaturg-ttr", daemon=True)
        self.armed: dict[int, Deadline] = {}
        self._wakeup = threading.Condition()
        self._wake_at = float("inf")  # when it looks next (inf while it looks: any arm wakes it)

    def arm(self, ttr_ms: int) -> Deadline:
        deadline = Deadline(self, threading.get_ident(), ttr_ms)
        self.armed[deadline.thread_id] = deadline
        assert deadline.at is not None
        self.wake_for(deadline.at)
        return deadline

    def wake_for(self, at: float) -> None:
        if at < self._wake_at:
            with self._wakeup:
                self._wakeup.notify()

    def interrupt(self, thread_id: int, exception: type[BaseException]) -> bool:
        """Raise ``exception`` in the task running in ``thread_id``, only while its deadline
        is armed (its handler still running); False when it has none armed.

        Delivered like a passed deadline, so a handler that returns meanwhile is not hit:
        disarming cancels an exception that has not landed yet.
        """
        deadline = self.armed.get(thread_id)
        return deadline is not None and deadline.fire(exception)

    def run(self) -> None:
        with self._wakeup:
            while True:
                self._wake_at = float("inf")  # a deadline armed while it looks wakes it again
                now = time.monotonic()
                earliest = now + POLL_S
                for deadline in list(self.armed.values()):
                    at = deadline.at
                    if at is None or deadline.fired:
                        continue
                    if at <= now:
                        deadline.fire(TimeToRunExceeded, due_by=now)
                    elif at < earliest:
                        earliest = at
                self._wake_at = earliest
                self._wakeup.wait(earliest - now)


_warned: set[tuple[str, str]] = set()


def _warn_once(actor_name: str, option: str, text: str, *args: object) -> None:
    """Log a warning about an ignored message option once per actor and option in this process."""
    if (actor_name, option) not in _warned:
        _warned.add((actor_name, option))
        logger.warning(text, *args)


#: The longest the monitor sleeps without looking (it also wakes for any earlier deadline).
POLL_S = 1.0
_monitor: _Monitor | None = None
_monitor_lock = threading.Lock()


def monitor() -> _Monitor:
    """The process's deadline monitor (started on first use, and again after a fork)."""
    global _monitor
    current = _monitor
    if current is not None and current.is_alive():
        return current
    with _monitor_lock:
        if _monitor is None or not _monitor.is_alive():
            _monitor = _Monitor()
            _monitor.start()
        return _monitor


class TimeToRun(dramatiq.Middleware):
    """Arms a deadline for each task and interrupts the task when it passes."""

    def __init__(self, *, default_ms: int = 600_000, queues: Mapping[str, int | None] | None = None) -> None:
        self.default_ms = default_ms
        self.queues = {name: ttr for name, ttr in (queues or {}).items() if ttr is not None}

    @property
    def actor_options(self) -> set[str]:
        return {"ttr"}

    def ttr_ms(self, broker: dramatiq.Broker, message: Any) -> int:
        """message > actor > queue > default.

        A message's ``ttr`` that is not a number (consumers hold such messages before they
        run: see :mod:`dramaturg.envelope`) is passed over with a warning, never taken as
        "no time limit".
        """
        ttr = message.options.get("ttr")
        if ttr is not None:
            try:
                return int(ttr)
            except (TypeError, ValueError, OverflowError):
                logger.warning(
                    "%s (message %s): its ttr option %r is not a number of ms; the actor's or the queue's is used",
                    message.actor_name,
                    message.message_id,
                    ttr,
                )
                ttr = None
        if ttr is None:
            actor = broker.actors.get(message.actor_name)
            ttr = actor.options.get("ttr") if actor is not None else None
        if ttr is None:
            ttr = self.queues.get(canonical_queue(message.queue_name), self.default_ms)
        return int(ttr)

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        if "time_limit" in message.options:  # Dramatiq's TimeLimit option, which this middleware replaces
            _warn_once(
                message.actor_name,
                "time_limit",
                "%s: the message option time_limit=%r is ignored: dramaturg's time limit is the ttr"
                " (it moves with touch()); send it with ttr= instead",
                message.actor_name,
                message.options["time_limit"],
            )

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        # The run's, where the task handle (touch(), time_left()) and the handler's wrapper find it.
        start_run(message).deadline = monitor().arm(self.ttr_ms(broker, message))

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        run = run_of(message)
        if run is not None and run.deadline is not None:
            run.deadline.disarm()

    after_skip_message = after_process_message
