"""The worker's side of cancelling: skip a cancelled task when it is taken, interrupt one that runs.

Each worker process keeps the ids of the cancel requests it has read from the feed
(:mod:`dramaturg.cancelling.requests`) and the ids of the tasks its threads are running.
A thread of its own reads the feed from where it last read, every :data:`POLL_S` while
tasks run (one round trip for every request made since, whatever the number of tasks;
nothing while the process is idle: it sleeps after :data:`IDLE_POLLS` polls without a task
running, and the next task taken wakes it), and interrupts each running task it finds there.

- **Taken**: a task whose id is among the requests read is not run: its handler is never
  called, and it ends as cancelled (:class:`~dramaturg.middleware.ttr.TaskCancelled`,
  raised from this middleware's before-hook, last of the stack but for none that runs
  code around the handler). What was read is at most :data:`STALE_S` old when a task is
  taken: after an idle spell the first task taken reads the feed first, in its own
  thread. So a request made at least that long before a worker takes the task always
  stops it before it runs, however long it waited, delayed or between retries; and
  :func:`dramaturg.cancel` returns only once that long has passed since its request was
  written (:data:`SETTLE_S`), so that a waiting task never starts once it has returned.
- **Running**: a request made later (or while it runs) interrupts it within
  :data:`POLL_S` plus a round trip, delivered as the TTR interrupt is (the deadline
  run's :class:`~dramaturg.middleware.ttr.Deadline`): it lands when the
  handler next runs Python code, ``except Exception`` cannot swallow it, and a handler
  that returns meanwhile is not hit (the task then ends as it did: the request lapses).

What it costs a task: a dict insert and delete, a set lookup and a clock read, about a
microsecond; the round trips are per process and per poll, not per task
(``docs/cancelling.md`` has the measurement).

When the store does not answer, tasks go on being taken and run (a WARNING says so, once
per outage); requests made meanwhile are honoured once it answers again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

import dramatiq

from ..errors import StateUnavailable
from ..middleware.ttr import Deadline, TaskCancelled
from ..task import run_of
from .requests import CancelRequests

__all__ = ["POLL_S", "SETTLE_S", "STALE_S", "CancelWatch", "watch_of"]

logger = logging.getLogger("dramaturg.cancelling")

#: How often a worker process reads the feed while it runs tasks (seconds).
POLL_S = 0.25
#: Polls in a row that find no task running before the reader sleeps until one is taken.
IDLE_POLLS = 4
#: The oldest a read of the feed may be when a task is taken (seconds).
STALE_S = 0.5
#: How long :func:`dramaturg.cancel` waits after writing a request before it returns: by
#: then every worker has read it before it takes a task (a read is never older than STALE_S).
SETTLE_S = STALE_S + 0.05
#: How often requests older than the ttl are forgotten (seconds).
PRUNE_S = 60.0


class _Watcher:
    """One process's requests read and tasks running, and the thread that reads the feed."""

    def __init__(self, requests: CancelRequests) -> None:
        self.requests = requests
        #: Message id -> the deadline of its run (the interrupt is raised through it, so that it
        #: can only hit that run: not the next task of the same thread, not a finished one).
        self.running: dict[str, Deadline] = {}
        #: Message id -> when it was asked for (the store's clock, ms).
        self.cancelled: dict[str, float] = {}
        #: The requests read since the reader's last poll, whose running tasks it interrupts
        #: (again: an interrupt sent by a worker thread's read can be lost, see
        #: _interrupt_running). Only those: an older entry of ``cancelled`` may no longer
        #: stand (a task kicked since, whose withdrawal this process has not read yet).
        self._unsent: set[str] = set()
        #: When the feed was last read, or tried (time.monotonic()).
        self.read_at = float("-inf")
        self._last: str | None = None  # the feed's last entry read
        self._newest: float | None = None
        self._pruned_at = time.monotonic()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        #: Whether the reader sleeps on ``_wake`` (the process was idle): only then does a
        #: task taken wake it. Polling, it finds the running tasks itself; woken for each
        #: task, it took the GIL from the worker threads once per task (a context switch
        #: and a GIL hand-over per no-op task: ~20% of a Redis worker's CPU per message).
        self._parked = True
        self._halt = threading.Event()
        self._failing = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="dramaturg-cancel-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the reading thread (its worker stopped); waits for it a moment."""
        self._stopped = True
        self._halt.set()
        self._wake.set()
        self._thread.join(POLL_S * 4)

    def wake(self) -> None:
        """A task was added to ``running``: wake the reader if it sleeps (a plain read otherwise)."""
        if self._parked:
            self._parked = False
            self._wake.set()

    @property
    def failing(self) -> bool:
        """The last read failed: the store does not answer."""
        return self._failing

    def read(self, *, if_older_than: float | None = None) -> None:
        """Read the feed from where the last read ended; interrupt running tasks it names.

        ``if_older_than``: only if the last read is older than that many seconds (checked
        again under the lock, so threads taking tasks together read once). The lock is
        taken with ``with``, never a timed acquire and a ``try``: a worker thread reads with
        its task's deadline armed, and a TTR interrupt landing between the two would leave
        the lock taken for good (every later read would wait on it).
        """
        with self._lock:
            fresh = self._read(if_older_than)
        self._interrupt(fresh)

    def _read(self, if_older_than: float | None) -> list[str]:
        """The read itself, under the lock: the ids of the requests new since the last."""
        now = time.monotonic()
        if if_older_than is not None and (now - self.read_at <= if_older_than or self._failing):
            return []  # read meanwhile by another thread, or the store does not answer (the reader tries)
        try:
            # Where the feed ends is kept only once what it found is in ``cancelled`` (the
            # last step below): a TTR interrupt landing in a worker thread's read before
            # then leaves it to be read again, not skipped.
            found, last = self.requests.feed(self._last)
        except Exception as error:
            self.read_at = now  # a store that does not answer is tried once per interval, not per task
            if not self._failing:
                self._failing = True
                logger.warning(
                    "could not read cancel requests from the state store (%s: %s); tasks run meanwhile,"
                    " and requests made now are honoured once it answers",
                    type(error).__name__,
                    error,
                )
            return []
        if self._failing:
            self._failing = False
            logger.warning("the state store answers again; cancel requests are read")
        fresh: list[str] = []
        for message_id, at, withdrawn in found:
            if withdrawn:
                self._unsent.discard(message_id)
                self.cancelled.pop(message_id, None)
                with contextlib.suppress(ValueError):
                    fresh.remove(message_id)
            elif message_id not in self.cancelled:
                self._unsent.add(message_id)  # first: interrupted before the next line, it is read again
                self.cancelled[message_id] = at
                fresh.append(message_id)
            if self._newest is None or at > self._newest:
                self._newest = at
        if now - self._pruned_at > PRUNE_S and self._newest is not None:
            self._pruned_at = now
            oldest = self._newest - self.requests.ttl_ms
            self.cancelled = {i: at for i, at in self.cancelled.items() if at >= oldest}
        # Only now, and as of when the read began: a thread that finds the read fresh
        # finds every request made before then in ``cancelled`` already.
        self._last = last
        self.read_at = now
        return fresh

    def _interrupt(self, fresh: Iterable[str]) -> None:
        for message_id in fresh:
            deadline = self.running.get(message_id)
            if deadline is not None and deadline.fire(TaskCancelled):
                logger.info("task %s is interrupted: it was cancelled", message_id)

    def _interrupt_running(self) -> None:
        """Interrupt the running tasks the requests read since the last poll name: an
        interrupt sent by a worker thread's read can be lost (a TTR interrupt landing in
        that thread meanwhile), so the reader sends them again (a deadline fires once, so
        a task is interrupted once). A task of theirs not running now is skipped when it
        is taken (it is in ``cancelled``)."""
        if not self._unsent:
            return  # nearly every poll: no lock taken
        with self._lock:
            unsent, self._unsent = self._unsent, set()
        self._interrupt([message_id for message_id in unsent if message_id in self.running])

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            idle = 0
            while not self._stopped and idle < IDLE_POLLS:
                # Also while the last read failed: until a read succeeds, threads taking a
                # task do not read (see CancelWatch.before_process_message), so this thread
                # must find out that the store answers again, idle or not.
                if self.running or self._failing:
                    idle = 0
                    try:
                        # What the read finds goes to ``_unsent`` too: interrupted once, there.
                        with self._lock:
                            self._read(None)
                        self._interrupt_running()
                    except Exception:  # never let the reader die: the next poll tries again
                        logger.exception("reading cancel requests failed")
                else:
                    idle += 1  # short tasks come and go between polls: not idle yet
                self._halt.wait(POLL_S)
            self._parked = True
            # A task added to ``running`` after the last look found the reader not yet
            # parked and did not wake it: look once more now that the flag is set.
            if self.running:
                self._parked = False
                self._wake.set()


class CancelWatch(dramatiq.Middleware):
    """Skips the cancelled tasks a worker takes and interrupts the cancelled ones it runs
    (see the module). Placed after :class:`~dramaturg.middleware.TimeToRun`, whose
    deadline carries the interrupt; installed where there is a state store."""

    def __init__(self, url: str | None, ttl_ms: int, namespace: str = "dramaturg") -> None:
        self.url = url
        self.ttl_ms = ttl_ms
        self.namespace = namespace
        self._requests: CancelRequests | None = None
        self._watcher: _Watcher | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._workers = 0  # the workers of this process booted and not yet stopped

    def requests(self, broker: dramatiq.Broker) -> CancelRequests:
        """The cancel requests of ``broker``, in its state store (raises :class:`~dramaturg.StateUnavailable`)."""
        if self._requests is None:
            from ..status import state_store

            store = state_store(broker)
            with self._lock:
                if self._requests is None:
                    self._requests = CancelRequests(store.client, namespace=self.namespace, ttl_ms=self.ttl_ms)
        return self._requests

    def watcher(self, broker: dramatiq.Broker) -> _Watcher:
        watcher = self._watcher
        if watcher is None or self._pid != os.getpid():  # a forked child has no thread of its parent's
            requests = self.requests(broker)
            with self._lock:
                if self._watcher is None or self._pid != os.getpid():
                    self._pid = os.getpid()
                    self._watcher = _Watcher(requests)
                watcher = self._watcher
        return watcher

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        watcher = self.watcher(broker)
        message_id = getattr(message, "_message", message).message_id  # not through the proxy's __getattr__
        run = run_of(message)
        if run is not None and run.purged:  # a purge dropped it, then lost its acknowledgement
            raise TaskCancelled("purged before it ran")
        deadline = None if run is None else run.deadline
        if deadline is not None:
            watcher.running[message_id] = deadline  # before the check: the reader checks the other way round
            watcher.wake()
        if time.monotonic() - watcher.read_at > STALE_S and not watcher.failing:
            # Not while the store does not answer (the reader thread polls until it does):
            # a store that stops answering holds a read for the client's read timeout, and
            # would hold every thread that takes a task with it, again and again.
            watcher.read(if_older_than=STALE_S)
        if message_id in watcher.cancelled and self._still_requested(watcher, message_id):
            if deadline is not None:
                deadline.disarm()  # the reader may have interrupted it too: once is enough
            raise TaskCancelled("cancelled before it ran")

    def _still_requested(self, watcher: _Watcher, message_id: str) -> bool:
        """Whether the request read for ``message_id`` still stands: a kick withdraws it
        (a held task kicked runs again) and the feed may not say so yet. One look-up, made
        only for a task about to be skipped; when the store does not answer, it stands."""
        try:
            if watcher.requests.get(message_id) is not None:
                return True
        except Exception as error:
            logger.warning(
                "could not look up the cancel request for %s (%s: %s); it is skipped as cancelled",
                message_id,
                type(error).__name__,
                error,
            )
            return True
        with watcher._lock:  # the reader's prune builds ``cancelled`` anew from its items
            watcher.cancelled.pop(message_id, None)
        return False

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        watcher = self._watcher
        run = run_of(message)
        if watcher is not None and run is not None and run.deadline is not None:
            message_id = getattr(message, "_message", message).message_id
            if watcher.running.get(message_id) is run.deadline:
                watcher.running.pop(message_id, None)

    after_skip_message = after_process_message

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        with self._lock:
            self._workers += 1

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        # The reader is the process's: it ends with the last of its workers.
        with self._lock:
            self._workers -= 1
            if self._workers > 0:
                return
            watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()


def watch_of(broker: dramatiq.Broker) -> CancelWatch:
    """The :class:`CancelWatch` of ``broker``; :class:`~dramaturg.StateUnavailable` when it has
    none (no state store: RabbitMQ without ``[state] url``)."""
    for middleware in broker.middleware:
        if isinstance(middleware, CancelWatch):
            return middleware
    from ..status.store import no_store_reason

    raise StateUnavailable(no_store_reason(broker).replace("task status needs", "cancelling needs", 1))
