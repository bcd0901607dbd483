"""How a worker process writes batch news: members' ends in group commits, the rest buffered.

**Ends are durable before the message is acknowledged.** The callbacks rest on the
count of ended members: ``on_complete`` fires when it reaches the total. An end written
after the acknowledgement (buffered, as the status store buffers) would be lost with the
process if it died in between, and nothing would ever run that member again: the batch
would wait forever. Exactly-once does not need it (the compare-and-set in ``batch.lua``
gives "at most once" whatever the order); *at least once* does. So the thread that ran
the member waits for its end to be written, in the member's after-hook, before Dramatiq
acknowledges the message. What it costs the queue is kept small the way the Redis
broker's acknowledgements are (:mod:`dramaturg.brokers.redis.settling`): a group commit.
A thread whose end comes while no write is out writes it at once, alone; those that
come meanwhile wait, and the first of them then writes every end that came, in one call
of ``batch.lua``. A worker killed after the end was written but before the
acknowledgement runs the member again; its end repeats, and a member is counted by its
message id, so it counts once (and a callback that had fired but may not have been
published is published again, with the same message id: see ``batch.lua``).

If the write fails (the store does not answer) it is tried again a few times
(:func:`dramaturg.held.durable_write`); after that the end is kept and written with the
next notes flush, and an ERROR line says the batch waits for it. Only a process killed
while the store is down loses such an end.

**Everything else is buffered.** "Running", "waiting again" (a retry) and progress are
news for ``dramaturg batch show``, not counts anything waits for: each process keeps them
in a buffer that a background thread writes every ``FLUSH_INTERVAL_S`` in one call, like
the status store's records; the notes of a member whose end was written meanwhile are
dropped there (a short member costs its end alone). The members running are kept apart,
in a dict of this process's running members (:attr:`BatchWriter.running`): a member's
start sets its entry and its end takes it out again, and each flush writes "running" for
the members in it that it has not written before, so that a member that starts and ends
between two flushes costs two dict operations, nothing more. A lost note changes what a
status shows for a moment, never a count or a callback.

**On the Redis broker** (and embedded), with the batches in the broker's own Redis (no
``[state] url``), the end of a member that succeeded is not written here at all: the
tracker leaves it on the message, and the script that acknowledges the message
(``settle.lua``, in the broker's group commit of acknowledgements,
:mod:`dramaturg.brokers.redis.settling`) writes it first, in the same call. It is durable
no later than the acknowledgement and costs neither a call nor a wait of its own. An end
that fires callbacks leaves the message claimed: the consumer publishes them, then
acknowledges it alone.

**On RabbitMQ** (batches in the Redis of ``[state] url``) the end of a member that
succeeded is left on the message too. The worker thread hands it, with the delivery, to
the process's end writer thread (:mod:`dramaturg.brokers.rabbitmq.ends`) and waits for
nothing (an acknowledgement on RabbitMQ is a frame sent without an answer, so a wait for
the end was the whole of a member's cost there). That thread writes the ends that came,
of all the consumers, in one call of ``batch.lua`` (in rounds while they keep coming:
every 20 ms, or sooner once half the smallest prefetch of the consumers has come), and
then hands their deliveries to their consumers' threads to acknowledge; an end that
fires callbacks is handed back once it has published them. Not the consumers' threads:
they serve pika's connection, which a state store that does not answer would stall.
While the store does not answer, the ends are kept and written again after pauses (0.1 s
doubling to 5 s), their messages unacknowledged: never given back to the queue to run
again, and the full prefetch stops deliveries until the store answers.

Other ends (held, rejected, cancelled, and every end with the Redis broker and a state
store of its own) are written here, grouped across threads as above: they are rarer, and
what decided them (a hold, a rejection) was written by the same thread before.
``benchmarks/batches.py`` measures what is left (numbers in ``docs/batches.md``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import Any

from ..group_commit import GroupCommit
from ..held import durable_write
from .state import BatchState, End, Note

__all__ = ["BatchWriter"]

logger = logging.getLogger("dramaturg.batches")

#: How often each process writes its buffered notes.
FLUSH_INTERVAL_S = 0.1
#: Notes past which the oldest are dropped (the store does not answer).
MAX_NOTES = 100_000

#: This process's id, kept up to date across forks: ``os.getpid()`` is a system call
#: (about 0.3 us here), and :meth:`BatchWriter.note` looks at it for every member.
_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


class BatchWriter:
    """Writes one process's batch news to a :class:`~dramaturg.batches.state.BatchState` (see the module)."""

    def __init__(self, state: BatchState, *, flush_interval_s: float | None = None) -> None:
        self.state = state
        self.flush_interval_s = FLUSH_INTERVAL_S if flush_interval_s is None else flush_interval_s
        self._lock = threading.Lock()
        self._ends: GroupCommit[End, list[str]] = GroupCommit(self._write_ends)
        self._notes: deque[Note] = deque()
        #: Members whose end was written since the last flush: their notes are dropped
        #: there (a member that started and ended within a flush interval, nearly every
        #: short one, costs its end alone).
        self._ended: set[str] = set()
        #: This process's members running now: member id -> batch id (set by the tracker
        #: when one starts, taken out when it ends or runs again later; see the module).
        self.running: dict[str, str] = {}
        #: The members of :attr:`running` whose "running" the last flush wrote.
        self._noted: set[str] = set()
        #: Tasks' last progress, by message id (for task status; a later one replaces it).
        self._progress: dict[str, str] = {}
        self._unwritten: list[End] = []
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = _pid
        self._closed = False
        self._failing = False  # the last flush failed (logged once)

    # -- ends: durable, in group commits -------------------------------------------------

    def end(self, end: End) -> list[str]:
        """Write that a member ended; returns once it is written, with the events that fire.

        Raises the error of the write that carried it, as a write of its own would.
        """
        answer = self._ends.submit(end)
        self._ended.add(end[1])
        return answer

    def _write_ends(self, ends: list[End]) -> list[list[str]]:
        return self.state.end(ends)

    def end_durably(self, end: End) -> list[str]:
        """:meth:`end`, tried again a few times; when it still fails the end is kept for the
        background flush and an ERROR line says so (nothing fires from it here)."""
        try:
            return self.end(end)
        except Exception:
            pass  # tried again below, after a pause, with a line for each try
        answer: list[list[str]] = []
        error = durable_write(lambda: answer.append(self.end(end)))
        if error is None:
            return answer[0]
        logger.error(
            "could not record the end of member %s of batch %s (%s: %s); it is written when the state store"
            " answers, and the batch waits for it",
            end[1],
            end[0],
            type(error).__name__,
            error,
        )
        with self._lock:
            self._unwritten.append(end)
        self._ensure_thread()
        return []

    # -- notes: buffered -------------------------------------------------------------------

    def start(self, member_id: str, batch_id: str) -> None:
        """A member started here: "running" at the next flush, unless it has ended by then."""
        self.running[member_id] = batch_id
        if self._thread is None or self._pid != _pid:
            self._ensure_thread()

    def note(self, note: Note) -> None:
        """Keep a note for the next flush (appended without a lock: a deque's append is atomic)."""
        self._notes.append(note)
        if len(self._notes) > MAX_NOTES:
            self._notes.popleft()
        self._ensure_thread()

    def task_progress(self, message_id: str, value: str) -> None:
        """Keep a task's last progress (``"<fraction>|<text>"``) for the next flush."""
        self._progress[message_id] = value
        self._ensure_thread()

    def flush(self) -> list[tuple[End, list[str]]]:
        """Write the buffered notes and any end kept after a failure; the ends written, with what fired."""
        notes: list[Note] = []
        while True:
            try:
                notes.append(self._notes.popleft())
            except IndexError:
                break
        progress, self._progress = self._progress, {}
        ended, self._ended = self._ended, set()
        if ended:
            notes = [note for note in notes if note[1] not in ended]
        # "Running" for the members started since the last flush and running still; again
        # for one that was sent back to wait meanwhile (its "waiting again" goes first).
        running = self.running.copy()  # one C call: whole, whatever the worker threads do meanwhile
        again = {note[1] for note in notes if note[2] == "w"}
        noted = self._noted
        notes += [
            (batch_id, member_id, "r", "")
            for member_id, batch_id in running.items()
            if member_id not in noted or member_id in again
        ]
        with self._lock:
            unwritten, self._unwritten = self._unwritten, []
        written: list[tuple[End, list[str]]] = []
        try:
            if unwritten:
                written = list(zip(unwritten, self.state.end(unwritten), strict=True))
                unwritten = []
            if notes:
                self.state.note(notes)
            self._noted = set(running)  # written (a failed write tries their "running" again)
            if progress:
                self.state.task_progress(list(progress.items()))
        except Exception as error:
            with self._lock:
                self._unwritten[:0] = unwritten
            if not self._failing:  # once per outage, not every flush
                self._failing = True
                logger.warning(
                    "could not write batch news to the state store (%s: %s): members' running and progress"
                    " notes are dropped until it answers; ends not yet written are kept and written then",
                    type(error).__name__,
                    error,
                )
        else:
            if self._failing:
                self._failing = False
                logger.warning("the state store is reachable again; batch news is written")
        return written

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == _pid:
            return
        with self._lock:
            if self._closed or (self._thread is not None and self._pid == _pid):
                return
            self._pid = _pid  # after a fork the parent's thread is not ours
            self._thread = threading.Thread(target=self._run, name="dramaturg-batches", daemon=True)
            self._thread.start()

    #: Called with what a background flush wrote of the kept ends (the tracker fires their events).
    on_written: Any = None

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            written = self.flush()
            if written and self.on_written is not None:
                try:
                    self.on_written(written)
                except Exception as error:
                    # The thread goes on (it alone writes the ends kept after a failure). What
                    # those ends fired and could not publish waits in the firing index, for a
                    # worker to publish (BatchTracker.refire).
                    logger.error(
                        "could not publish what %d batch members' ends fired (%s: %s); left to be published again",
                        len(written),
                        type(error).__name__,
                        error,
                    )

    def close(self) -> None:
        """Write what is buffered and stop the background thread."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and self._pid == os.getpid():
            thread.join(timeout=5)
        written = self.flush()
        if written and self.on_written is not None:
            self.on_written(written)
