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
finished is never run again because of its TTR.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import dramatiq
from dramatiq.middleware import Interrupt

from ..queues import canonical_queue

__all__ = ["Deadline", "StopRequested", "TimeToRun", "TimeToRunExceeded"]

logger = logging.getLogger("dramaturg.ttr")


class TimeToRunExceeded(Interrupt):
    """Raised in a handler whose time to run has passed."""


class StopRequested(Interrupt):
    """Raised in a task still running when its worker stops and the grace period is over.

    The task is requeued untouched (not counted as an attempt) and runs again later.
    """


class Deadline:
    """The deadline of one running task. States: armed -> fired or disarmed."""

    __slots__ = ("at", "fired", "monitor", "thread_id", "ttr_ms")

    def __init__(self, monitor: _Monitor, thread_id: int, ttr_ms: int) -> None:
        self.monitor = monitor
        self.thread_id = thread_id
        self.ttr_ms = ttr_ms
        self.at: float | None = time.monotonic() + ttr_ms / 1000  # None once disarmed
        self.fired = False

    def touch(self, ms: int | None = None) -> bool:
        """Move the deadline to now + ``ms`` (default: the task's ttr). False if it already fired."""
        with self.monitor.lock:
            if self.fired:
                logger.warning(
                    "touch() came after the time to run (%d ms) had passed; the task is being interrupted",
                    self.ttr_ms,
                )
                return False
            if self.at is None:
                return True
            self.at = time.monotonic() + (self.ttr_ms if ms is None else ms) / 1000
            self.monitor.stale += 1  # its earlier heap entry
            self.monitor.schedule(self)
            return True

    def time_left_ms(self) -> int:
        """Milliseconds before the deadline (0 once it passed)."""
        at = self.at
        return 0 if at is None or self.fired else max(0, int((at - time.monotonic()) * 1000))

    def disarm(self) -> None:
        """Forget the deadline; cancel its interrupt if it was raised but has not landed yet."""
        with self.monitor.lock:
            if self.at is None:
                return
            self.at = None
            self.monitor.forget_one()
            if self.fired:
                # PyThreadState_SetAsyncExc with NULL clears a pending async exception.
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id), None)


class _Monitor(threading.Thread):
    """Sleeps until the earliest deadline, then interrupts the threads whose deadline passed.

    It is woken only when a deadline earlier than every other arrives: waking it for each
    task (thousands a second) cost more CPU than the rest of the middleware together.
    Disarmed and touched deadlines leave stale heap entries, dropped lazily: when the
    earliest one comes up, or in one sweep once they are half the heap.
    """

    def __init__(self) -> None:
        super().__init__(name="dramaturg-ttr", daemon=True)
        self.lock = threading.Lock()
        self._wakeup = threading.Condition(self.lock)
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self.stale = 0  # heap entries whose deadline was disarmed or moved

    def schedule(self, deadline: Deadline) -> None:
        """Called with the lock held."""
        assert deadline.at is not None
        earliest = self._heap[0][0] if self._heap else None
        heapq.heappush(self._heap, (deadline.at, next(self._order), deadline))
        if earliest is None or deadline.at < earliest:
            self._wakeup.notify()  # it sleeps until `earliest`: too late for this one

    def interrupt(self, thread_id: int, exception: type[BaseException]) -> bool:
        """Raise ``exception`` in the task running in ``thread_id``, only while its deadline
        is armed (its handler still running); False when it has none armed.

        Delivered like a passed deadline, so a handler that returns meanwhile is not hit:
        disarming cancels an exception that has not landed yet.
        """
        with self.lock:
            for at, _, deadline in self._heap:
                if deadline.thread_id == thread_id and deadline.at == at and not deadline.fired:
                    deadline.fired = True
                    dramatiq.middleware.raise_thread_exception(thread_id, exception)
                    return True
        return False

    def forget_one(self) -> None:
        """A deadline was disarmed (lock held): sweep the heap once half of it is stale."""
        self.stale += 1
        if self.stale > 1_000 and self.stale * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if entry[2].at == entry[0]]
            heapq.heapify(self._heap)
            self.stale = 0

    def arm(self, ttr_ms: int) -> Deadline:
        deadline = Deadline(self, threading.get_ident(), ttr_ms)
        with self.lock:
            self.schedule(deadline)
        return deadline

    def run(self) -> None:
        with self.lock:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][2].at != self._heap[0][0]):
                    at, _, deadline = heapq.heappop(self._heap)
                    if deadline.at == at and not deadline.fired:
                        deadline.fired = True
                        dramatiq.middleware.raise_thread_exception(deadline.thread_id, TimeToRunExceeded)
                    elif self.stale:
                        self.stale -= 1  # touched or disarmed since
                self._wakeup.wait(timeout=(self._heap[0][0] - now) if self._heap else None)


_monitor: _Monitor | None = None
_monitor_lock = threading.Lock()


def monitor() -> _Monitor:
    """The process's deadline monitor (started on first use, and again after a fork)."""
    global _monitor
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
        """message > actor > queue > default."""
        ttr = message.options.get("ttr")
        if ttr is None:
            actor = broker.actors.get(message.actor_name)
            ttr = actor.options.get("ttr") if actor is not None else None
        if ttr is None:
            ttr = self.queues.get(canonical_queue(message.queue_name), self.default_ms)
        return int(ttr)

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        from ..task import _current  # the task handle Outcomes set just before

        task = _current.get()
        deadline = monitor().arm(self.ttr_ms(broker, message))
        if task is not None:
            task._deadline = deadline
        message._dramaturg_deadline = deadline

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        deadline = getattr(message, "_dramaturg_deadline", None)
        if deadline is not None:
            deadline.disarm()

    after_skip_message = after_process_message
