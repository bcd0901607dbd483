"""Stopping a worker without losing or silently repeating work.

When a worker stops (SIGTERM or SIGINT to ``dramaturg worker``, or the end of a drain),
it stops taking tasks, lets the running ones finish for up to a grace period
(``worker.shutdown_timeout``), then interrupts those still running with
:class:`~dramaturg.middleware.outcomes.StopRequested`: each is requeued untouched (not
counted as an attempt) and logged; when it runs again, that is logged too. Dramatiq then
puts back what the worker had prefetched or was holding for a delay, and closes.

Dramatiq's own ``Worker.stop`` waits for running tasks and then simply moves on,
leaving them running in threads that die with the process: on Redis their messages
stay claimed until the worker's heartbeat times out.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
from dramatiq.asyncio import EventLoopThread, get_event_loop_thread, set_event_loop_thread
from dramatiq.middleware import AsyncIO

from .ttr import StopRequested, monitor

__all__ = ["DaemonAsyncIO", "GracefulShutdown", "finish_running", "stopping"]

#: Worker threads told to stop. Dramatiq's thread may still take one more message (one
#: that arrives while it waits for work); Outcomes puts such a message back unstarted.
#: The thread objects, not their ids: a thread stuck in C code outlives the run that
#: stopped it, and once it is gone a thread of a later run may get its id.
stopping: set[threading.Thread] = set()

#: How long :func:`finish_running` waits for the threads it interrupted (a thread blocked
#: in C code takes the interrupt only when that call returns).
INTERRUPTED_JOIN_S = 10.0


def finish_running(worker: Any, grace_s: float) -> int:
    """Stop ``worker``'s threads: running tasks get ``grace_s``, then are interrupted.

    Returns how many were interrupted. Idempotent: threads already stopped are skipped.
    The interrupt is delivered like a passed deadline (see :meth:`ttr._Monitor.interrupt`),
    so it never lands after a handler returned.
    """
    stopping.difference_update([thread for thread in list(stopping) if not thread.is_alive()])  # earlier runs'
    threads = [thread for thread in worker.workers if thread.is_alive()]
    stopping.update(threads)
    for thread in threads:
        thread.stop()  # finishes its current task, then leaves
    deadline = time.monotonic() + grace_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    late = [thread for thread in threads if thread.is_alive()]
    # Through the task's deadline, and only into a handler still running: a thread that
    # is past its handler (settling the outcome, acknowledging) is let finish.
    interrupted = sum(monitor().interrupt(thread.ident, StopRequested) for thread in late if thread.ident)
    deadline = time.monotonic() + INTERRUPTED_JOIN_S  # in all, not for each thread
    for thread in late:
        thread.join(max(0.0, deadline - time.monotonic()))
    stopping.difference_update([thread for thread in threads if not thread.is_alive()])
    return interrupted


class GracefulShutdown(dramatiq.Middleware):
    """Runs :func:`finish_running` when a worker starts shutting down."""

    def __init__(self, grace_ms: int) -> None:
        self.grace_ms = grace_ms

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        finish_running(worker, self.grace_ms / 1000)


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
