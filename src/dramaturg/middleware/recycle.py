"""Worker recycling: a worker process past its limits starts afresh.

User code leaks memory in long-running workers (a cache that only grows, a library
that keeps references). ``worker.max_tasks_per_child`` and ``worker.max_memory_mb``
(``dramaturg worker --max-tasks-per-child/--max-memory-mb``) bound that: once a worker
process has finished that many tasks, or its resident memory is over that many MiB
(checked after every 8th task, or after a task once half a second has passed), it stops taking tasks, lets its
running ones finish (up to ``worker.shutdown_timeout``, as on SIGTERM), gives back what
it had prefetched, and replaces itself with a fresh interpreter.

How it is replaced: the process ``exec``\\ s a new Python in place (same pid), which
imports the application and runs Dramatiq's worker loop again, writing to the same log
pipe. Dramatiq's main process watches its children by pid and shuts every worker down
when one exits, so a process that exited to be replaced would take the others with it;
one that execs is never seen to exit. This works the same under ``dramaturg worker``
and ``dramatiq dramaturg.worker``, and the memory is really returned (a fork would keep
the leaked pages). A stop request (SIGTERM) that arrives while a recycle is under way
turns it into a plain exit. Where the exec cannot be prepared (a worker started in
some other way than Dramatiq's CLI with the fork start method), the process just exits,
and Dramatiq's main process stops the rest: a supervisor (systemd, Kubernetes) then
restarts the whole worker. Recycling needs one of the two; ``drain()`` and in-process
workers do not recycle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing.connection
import multiprocessing.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq

__all__ = ["Recycle", "resident_mb", "run_fresh"]

logger = logging.getLogger("dramaturg.worker")

#: Environment variable carrying what a fresh interpreter needs to go on as the worker.
RECYCLE_ENV = "DRAMATURG_RECYCLED_WORKER"
#: Resident memory is read after this many tasks, or once this many seconds passed,
#: whichever comes first: a read costs about 11 us, 6% of a no-op task's CPU.
MEMORY_CHECK_TASKS = 8
MEMORY_CHECK_S = 0.5

#: Dramatiq's own SIGTERM handler in a worker process (set by dramaturg.worker), used to
#: start a graceful stop without a signal.
stop_process: Callable[[int, Any], Any] | None = None
_lock = threading.Lock()
_recycling = {"requested": False, "cancelled": False, "stopping": False}


def on_outside_stop() -> bool:
    """A stop request (SIGTERM, SIGHUP) arrived. True the first time one comes while a
    recycle is under way: the recycle becomes a plain exit, and the request needs no more
    handling (the worker is already stopping). A later one is handled as usual ("kill now")."""
    with _lock:
        _recycling["stopping"] = True
        if _recycling["requested"] and not _recycling["cancelled"]:
            _recycling["cancelled"] = True
            return True
        return False


class Recycle(dramatiq.Middleware):
    """Counts tasks and watches memory; asks for a recycle past either limit."""

    def __init__(self, max_tasks: int | None, max_memory_mb: int | None, shutdown_timeout_ms: int) -> None:
        self.max_tasks = max_tasks
        self.max_memory_mb = max_memory_mb
        self.shutdown_timeout_ms = shutdown_timeout_ms
        self.enabled = False
        self.tasks = 0
        self.last_memory_check = (0, 0.0)  # (tasks, time.monotonic()) at the last check
        self.launch: dict[str, Any] | None = None
        self.log_fd: int | None = None
        self.worker: Any = None

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        if not (self.max_tasks or self.max_memory_mb):
            return
        self.worker = worker
        self.launch = _dramatiq_worker_process()
        self.enabled = self.launch is not None and stop_process is not None
        if self.enabled:
            _recyclers[:] = [self]
        else:
            logger.debug("worker recycling is off: this worker was not started by Dramatiq's CLI")

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        if self.enabled:
            self._count()

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if self.enabled:
            self._count()

    def _count(self) -> None:
        with _lock:
            self.tasks += 1
            tasks = self.tasks
            if _recycling["requested"] or (self.max_tasks and tasks >= self.max_tasks):
                # This thread takes no other task: each thread finishes the one it runs
                # and leaves (what waits in memory is given back when the worker stops).
                self._stop_threads()
                if _recycling["requested"]:
                    return
        reason = None
        if self.max_tasks and tasks >= self.max_tasks:
            reason = f"it has run {tasks} tasks (worker.max_tasks_per_child = {self.max_tasks})"
        elif self.max_memory_mb and self._memory_check_due(tasks):
            used = resident_mb()
            if used > self.max_memory_mb:
                reason = f"it uses {used:.0f} MiB (worker.max_memory_mb = {self.max_memory_mb})"
                with _lock:
                    self._stop_threads()
        if reason is not None:
            self._request(reason)

    def _stop_threads(self) -> None:
        for thread in self.worker.workers:
            thread.stop()

    def _memory_check_due(self, tasks: int) -> bool:
        checked_tasks, checked_at = self.last_memory_check
        now = time.monotonic()
        if tasks - checked_tasks < MEMORY_CHECK_TASKS and now - checked_at < MEMORY_CHECK_S:
            return False
        self.last_memory_check = (tasks, now)
        return True

    def _request(self, reason: str) -> None:
        with _lock:
            if _recycling["requested"] or _recycling["stopping"]:
                return  # already recycling, or stopping for good
            _recycling["requested"] = True
        logger.info(
            "worker process %d recycles: %s; it finishes its running tasks (up to %d ms), then starts afresh",
            os.getpid(),
            reason,
            self.shutdown_timeout_ms,
        )
        assert stop_process is not None
        # Dramatiq's graceful stop, as if it had been signalled. (SystemExit: a stop had begun
        # meanwhile and Dramatiq took this for a second one; it stops anyway.)
        with contextlib.suppress(SystemExit):
            stop_process(signal.SIGTERM, None)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        if not _recycling["requested"] or self.launch is None:
            return
        # Keep the log pipe: Dramatiq closes its end of it before the process exits.
        stream = sys.stderr
        if hasattr(stream, "fileno"):
            self.log_fd = os.dup(stream.fileno())
            os.set_inheritable(self.log_fd, True)
        if self.launch.get("fresh"):
            return  # run_fresh execs again once the worker loop returns
        # In a process forked by multiprocessing: exec when it is about to exit, after
        # Dramatiq's worker loop closed the broker (lowest priority: the last finalizer).
        multiprocessing.util.Finalize(None, self.exec_fresh, exitpriority=-1_000)

    def exec_fresh(self) -> None:
        """Replace this process with a fresh interpreter that goes on as the same worker."""
        with _lock:
            cancelled = _recycling["cancelled"]
        launch = self.launch
        if cancelled or launch is None or self.log_fd is None:
            return
        sentinel = launch.get("sentinel_fd")
        if sentinel is None:
            sentinel = _parent_sentinel()
        if sentinel is None:
            logger.warning(
                "worker process %d cannot start afresh in place here; it exits, and Dramatiq stops the"
                " other worker processes (a supervisor must restart the worker)",
                os.getpid(),
            )
            return
        # Dramatiq's main process waits on this pipe to learn the process ended: keep it open.
        os.set_inheritable(sentinel, True)
        state = {**launch, "fresh": True, "sentinel_fd": sentinel, "log_fd": self.log_fd, "sys_path": sys.path}
        env = {**os.environ, RECYCLE_ENV: json.dumps(state, default=str)}
        bootstrap = (
            "import json, os, sys; state = json.loads(os.environ['" + RECYCLE_ENV + "']);"
            " sys.path[:] = state['sys_path']; from dramaturg.middleware.recycle import run_fresh; run_fresh(state)"
        )
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        # Stop requests wait until the new interpreter has its handlers: Dramatiq's worker
        # loop unblocks them once it has.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        os.execve(sys.executable, [sys.executable, "-c", bootstrap], env)


def run_fresh(state: dict[str, Any]) -> None:
    """The entry point of a recycled worker process (see :meth:`Recycle.exec_fresh`)."""
    import argparse

    from dramatiq import cli as dramatiq_cli
    from dramatiq.canteen import Canteen
    from dramatiq.compat import StreamablePipe

    os.environ.pop(RECYCLE_ENV, None)
    args = argparse.Namespace(**state["args"])
    pipe = StreamablePipe(multiprocessing.connection.Connection(state["log_fd"], readable=False))
    canteen = multiprocessing.Value(Canteen)
    canteen.initialized = True  # type: ignore[attr-defined]  # forks were handed to the main process at the first boot
    _fresh_launch.update(state)
    code = 0
    try:
        dramatiq_cli.worker_process(args, state["worker_id"], pipe, canteen, threading.Event())
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        code = 1
    for middleware in _recyclers:
        middleware.exec_fresh()  # returns only when no recycle was asked for
    os._exit(code)


#: Set in a recycled process: what it was launched with (see _dramatiq_worker_process).
_fresh_launch: dict[str, Any] = {}
_recyclers: list[Recycle] = []


def _dramatiq_worker_process() -> dict[str, Any] | None:
    """The arguments of Dramatiq's ``worker_process`` running this worker, if it is one."""
    if _fresh_launch:
        return {key: _fresh_launch[key] for key in ("args", "worker_id", "fresh", "sentinel_fd")}
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "worker_process" and frame.f_globals.get("__name__") == "dramatiq.cli":
            args = frame.f_locals.get("args")
            worker_id = frame.f_locals.get("worker_id")
            if args is None or worker_id is None:
                return None
            return {"args": {k: v for k, v in vars(args).items() if _plain(v)}, "worker_id": worker_id}
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _parent_sentinel() -> int | None:
    """The pipe end multiprocessing's fork launcher keeps open for the parent to watch."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "_launch" and frame.f_globals.get("__name__") == "multiprocessing.popen_fork":
            fd = frame.f_locals.get("child_w")
            return fd if isinstance(fd, int) else None
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _plain(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def resident_mb() -> float:
    """This process's resident memory in MiB (Linux: now; elsewhere: its peak)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
