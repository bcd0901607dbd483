"""Stopping a worker without losing or silently repeating work.

When a worker stops (SIGTERM or SIGINT to ``dramaturg worker``, or the end of a drain),
it stops taking tasks, lets the running ones finish for up to a grace period
(``worker.shutdown_timeout``, counted from the signal), then interrupts those still running with
:class:`~dramaturg.middleware.outcomes.StopRequested`: each is requeued untouched (not
counted as an attempt) and logged; when it runs again, that is logged too. Dramatiq then
puts back what the worker had prefetched or was holding for a delay, and closes.

Dramatiq's own ``Worker.stop`` waits for running tasks and then simply moves on,
leaving them running in threads that die with the process: on Redis their messages
stay claimed until the worker's heartbeat times out.

A worker process stops taking tasks the moment it gets its stop signal
(:func:`stop_taking_tasks`, called from the signal handler): Dramatiq's process only
looks at its stop flag once a second, and its threads went on starting tasks meanwhile,
which the grace then cut short. A thread stuck in C code past the grace and the wait
after its interrupt is given up on once: a second stop of the same worker (a drain's,
then ``Worker.stop``'s) does not wait for it again.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import dramatiq
from dramatiq.asyncio import EventLoopThread, get_event_loop_thread, set_event_loop_thread
from dramatiq.middleware import AsyncIO

from .ttr import StopRequested, monitor

__all__ = ["DaemonAsyncIO", "GracefulShutdown", "finish_running", "stop_taking_tasks", "stopping"]

#: Worker threads told to stop. Dramatiq's thread may still take one more message (one
#: that arrives while it waits for work); Outcomes puts such a message back unstarted.
#: The thread objects, not their ids: a thread stuck in C code outlives the run that
#: stopped it, and once it is gone a thread of a later run may get its id.
stopping: set[threading.Thread] = set()

#: How long :func:`finish_running` waits for the threads it interrupted (a thread blocked
#: in C code takes the interrupt only when that call returns).
INTERRUPTED_JOIN_S = 10.0

#: Threads a :func:`finish_running` waited for in full and left running (stuck in C code):
#: a later one does not wait for them again.
_given_up: weakref.WeakSet[threading.Thread] = weakref.WeakSet()

#: The workers of this process (booted, not yet shut down), and when a stop signal told
#: them to take no more tasks (``time.monotonic()``; None: not yet).
_workers: list[Any] = []
_stop_asked_at: list[float] = []


def stop_taking_tasks() -> None:
    """From now on, no thread of this process's workers starts a task.

    Called from a worker process's stop signal handler (see :mod:`dramaturg.worker`),
    before Dramatiq's main loop gets round to ``Worker.stop``: each thread finishes the
    task it runs and leaves; one that takes a message meanwhile puts it back unstarted
    (:class:`~dramaturg.middleware.outcomes.Outcomes`, through :data:`stopping`). The
    grace of :class:`GracefulShutdown` counts from here. Cheap, and safe in a signal
    handler: it only sets flags.
    """
    if not _stop_asked_at:
        _stop_asked_at.append(time.monotonic())
    for worker in list(_workers):
        threads = [thread for thread in worker.workers if thread.is_alive()]
        stopping.update(threads)
        for thread in threads:
            thread.stop()


def finish_running(worker: Any, grace_s: float, *, since: float | None = None) -> int:
    """Stop ``worker``'s threads: running tasks get ``grace_s`` (from ``since``, a
    ``time.monotonic()`` value, else from now), then are interrupted.

    Returns how many were interrupted. Idempotent: threads already stopped, or given up
    on by an earlier call (stuck in C code past their grace and the wait after their
    interrupt), are skipped. The interrupt is delivered like a passed deadline (see
    :meth:`ttr._Monitor.interrupt`), so it never lands after a handler returned.
    """
    stopping.difference_update([thread for thread in list(stopping) if not thread.is_alive()])  # earlier runs'
    threads = [thread for thread in worker.workers if thread.is_alive() and thread not in _given_up]
    stopping.update(threads)
    for thread in threads:
        thread.stop()  # finishes its current task, then leaves
    deadline = min(time.monotonic(), since if since is not None else float("inf")) + grace_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    late = [thread for thread in threads if thread.is_alive()]
    # Through the task's deadline, and only into a handler still running: a thread that
    # is past its handler (settling the outcome, acknowledging) is let finish.
    interrupted = sum(monitor().interrupt(thread.ident, StopRequested) for thread in late if thread.ident)
    deadline = time.monotonic() + INTERRUPTED_JOIN_S  # in all, not for each thread
    for thread in late:
        thread.join(max(0.0, deadline - time.monotonic()))
    _given_up.update(thread for thread in late if thread.is_alive())
    stopping.difference_update([thread for thread in threads if not thread.is_alive()])
    return interrupted


class GracefulShutdown(dramatiq.Middleware):
    """Runs :func:`finish_running` when a worker starts shutting down (its grace counted
    from the stop signal, if one came), and registers booted workers for
    :func:`stop_taking_tasks`."""

    def __init__(self, grace_ms: int) -> None:
        self.grace_ms = grace_ms

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        _workers.append(worker)

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        finish_running(worker, self.grace_ms / 1000, since=_stop_asked_at[0] if _stop_asked_at else None)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        if worker in _workers:
            _workers.remove(worker)
        if not _workers:
            _stop_asked_at.clear()


class DaemonAsyncIO(AsyncIO):
    """Dramatiq's AsyncIO middleware with a daemon event loop thread.

    Dramatiq's worker process exits with ``sys.exit`` when it gets a second SIGTERM; a
    non-daemon event loop thread then keeps the process alive forever.
    """

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        event_loop_thread = EventLoopThread(self.logger)
        event_loop_thread.daemon = True
        event_loop_thread.start(timeout=1.0)
        set_event_loop_thread(event_loop_thread)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        if get_event_loop_thread() is not None:  # a worker stopped twice stops its loop once
            super().after_worker_shutdown(broker, worker)  # type: ignore[no-untyped-call]
