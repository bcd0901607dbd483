"""The batch members' ends of a RabbitMQ worker process: :class:`RabbitmqEndWriter`, a
thread that writes the ends the worker threads leave on the messages they acknowledge,
then hands each message back to its consumer to be acknowledged.

A member that succeeded leaves its end on the message (:data:`~dramaturg.batches.tracker.BATCH_END`);
its worker thread hands it here and goes on at once (an acknowledgement on RabbitMQ is a
frame sent without an answer, so a wait for the end would be the whole of a member's
cost). This thread writes the ends that came, of all the process's consumers, in one
call of ``batch.lua`` to the state store, and only then hands the delivery tags to their
consumers, whose own threads send the acknowledgements
(:meth:`RabbitmqConsumer.ends_written <dramaturg.brokers.rabbitmq.consumer.RabbitmqConsumer.ends_written>`):
an end is durable before its message is acknowledged. An end that fires callbacks is
handed back only once this thread has published them (:meth:`BatchTracker.fire
<dramaturg.batches.tracker.BatchTracker.fire>`).

**Rounds.** An end that finds this thread asleep (nothing came for a round) wakes it and
is written at once. While ends keep coming, a round gathers them: it starts when
:data:`ROUND_MAX` have come (fewer when a consumer's prefetch is small, see
:meth:`RabbitmqEndWriter.fit`) or :data:`ROUND_WAIT_S` after the round before. A round
costs the process about half a millisecond of CPU whatever its size, nearly all of it
thread switches (the wake-up, the state store's call and answer, the hand-back, each
taking the GIL back from 8 busy worker threads): written as they came (13 a round in a
drain of user imports) that was 18 us a member, a tenth of the task; in rounds of about
60, 8 us (the writer thread's CPU time in ``benchmarks/batches.py --broker rabbitmq
--task import``, 2026-12-03). An acknowledgement waits up to 20 ms longer. The ends
waiting for a round are half the prefetch at most (the rest is left to the deliveries
running and waiting for a thread), plus those that come while a round is written: with
dramaturg's RabbitMQ prefetch (128) they leave plenty; a prefetch close to the worker's
threads (Dramatiq's default, twice the threads) can leave threads waiting for a round's
acknowledgements now and then.

Not in the consumers' threads: they serve pika's connection (heartbeats, deliveries), and
one waiting on a state store that does not answer would let RabbitMQ close the
connection and deliver to other workers what this one still holds and starts.

**When the state store does not answer** (or a callback cannot be published), the ends
are kept and written again after a pause that doubles from :data:`FIRST_PAUSE_S` to
:data:`MAX_PAUSE_S`, with a WARNING when it starts and one when it is over. Their
messages stay unacknowledged meanwhile, never given back to the queue: each member runs
once, and the unacknowledged deliveries fill the consumer's prefetch, so RabbitMQ stops
delivering to this worker until the store answers. If the process dies meanwhile,
RabbitMQ delivers them again: they run again, and each end counts once (by message id).

**When a consumer closes** (a worker stopping, a lost connection), its ends not yet
written are dropped: RabbitMQ takes their messages back. A close on an open connection
first waits a moment (:data:`CLOSE_WAIT_S`, not while the store does not answer) for the
ends being written, so that their acknowledgements go out before the connection closes;
an end written after that (or on a connection already lost) is not acknowledged: its
member runs again, and counts once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ...batches.tracker import tracker_of

if TYPE_CHECKING:
    import dramatiq

    from .consumer import RabbitmqConsumer

__all__ = [
    "CLOSE_WAIT_S",
    "FIRST_PAUSE_S",
    "MAX_PAUSE_S",
    "ROUND_MAX",
    "ROUND_WAIT_S",
    "RabbitmqEndWriter",
    "end_writer_of",
]

logger = logging.getLogger("dramaturg.batches")

#: The pause after a write of ends that failed; it doubles with each failure in a row...
FIRST_PAUSE_S = 0.1
#: ...up to this.
MAX_PAUSE_S = 5.0
#: How long a consumer's close waits for the ends of its deliveries being written.
CLOSE_WAIT_S = 1.0
#: While ends keep coming, a round starts this long after the one before...
ROUND_WAIT_S = 0.02
#: ...or once this many have come (at most half the smallest prefetch of the consumers).
ROUND_MAX = 64

#: An end to write: (consumer, delivery tag, the end left on the message, reject it after).
_Item = tuple["RabbitmqConsumer", int, tuple[Any, ...], bool]

_made = threading.Lock()


def end_writer_of(broker: dramatiq.Broker) -> RabbitmqEndWriter:
    """The end writer of ``broker``'s consumers in this process (made on first use)."""
    writer: RabbitmqEndWriter | None = getattr(broker, "_dramaturg_end_writer", None)
    if writer is None or writer.pid not in (0, os.getpid()):
        with _made:
            writer = getattr(broker, "_dramaturg_end_writer", None)
            if writer is None or writer.pid not in (0, os.getpid()):  # a forked child makes its own
                writer = RabbitmqEndWriter(broker)
                broker._dramaturg_end_writer = writer  # type: ignore[attr-defined]
    return writer


def close_end_writer(broker: dramatiq.Broker) -> None:
    """Stop ``broker``'s end writer, if it has one (what it still holds is not acknowledged)."""
    writer: RabbitmqEndWriter | None = getattr(broker, "_dramaturg_end_writer", None)
    if writer is not None:
        writer.close()


class _Unpublished(Exception):
    """Callbacks an end fired could not be published: written again later (see :meth:`RabbitmqEndWriter._write`)."""


class RabbitmqEndWriter:
    """Writes the ends of one process's RabbitMQ consumers (see the module)."""

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker
        #: Ends handed in by the worker threads (appended without a lock: a deque's append is atomic).
        self._incoming: deque[_Item] = deque()
        #: Ends taken from ``_incoming`` and not yet handed back (under ``_lock``).
        self._held: list[_Item] = []
        self._lock = threading.Lock()
        #: Notified after each round of writes (a close waits on it).
        self._round = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._due = False  # the thread was woken for what is in _incoming
        #: The thread found nothing in its last round: the next end wakes it, and is written at once.
        self._asleep = True
        #: Ends that start a round before ROUND_WAIT_S is up (see fit()).
        self.round_max = ROUND_MAX
        self._stop = threading.Event()
        #: Since when writes fail (monotonic), or None; a close does not wait meanwhile.
        self.failing_since: float | None = None
        self._thread: threading.Thread | None = None
        #: The process whose thread writes (0 before its first end).
        self.pid = 0

    def fit(self, prefetch: int) -> None:
        """A consumer of this ``prefetch`` hands ends here: a round starts once half the
        smallest prefetch of this writer's consumers have come (of all of them together),
        leaving the rest to the deliveries running and waiting for a thread."""
        with self._lock:  # two consumers' first ends at once
            self.round_max = max(1, min(self.round_max, prefetch // 2))

    def submit(self, consumer: RabbitmqConsumer, tag: int, end: tuple[Any, ...], *, reject: bool = False) -> None:
        """Write ``end``, then have ``consumer`` acknowledge delivery ``tag`` (or reject it)."""
        self._incoming.append((consumer, tag, end, reject))
        # One wake-up a round: for the first end after a quiet spell, or for a full round.
        if not self._due and (self._asleep or len(self._incoming) >= self.round_max):
            self._due = True
            self._ensure_thread()
            self._wake.set()

    def release(self, consumer: RabbitmqConsumer, wait_s: float) -> None:
        """``consumer`` closes: wait up to ``wait_s`` for the ends of its deliveries to be
        written and handed back (not while writes fail), then drop what is left of them."""
        deadline = time.monotonic() + wait_s
        with self._round:
            while self.failing_since is None and self._holds(consumer):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                # Written now, not after the round's wait (again after each round: an end
                # may come after the first, from a task that finished as the close began).
                self._due = True
                self._wake.set()
                self._round.wait(left)
            consumer.ends_dropped = True
            self._held = [item for item in self._held if item[0] is not consumer]

    def _holds(self, consumer: RabbitmqConsumer) -> bool:
        return any(item[0] is consumer for item in self._held) or any(
            item[0] is consumer for item in list(self._incoming)
        )

    def _ensure_thread(self) -> None:
        if self._thread is not None and self.pid == os.getpid():
            return
        with self._lock:
            if self._thread is not None and self.pid == os.getpid():
                return
            self.pid = os.getpid()  # after a fork the parent's thread is not ours
            self._thread = threading.Thread(target=self._run, name="dramaturg-batch-ends", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        pause = 0.0
        while True:
            if pause:
                self._stop.wait(pause)  # ends that come meanwhile wait for it
            elif self._asleep:
                self._wake.wait()
            else:
                self._wake.wait(ROUND_WAIT_S)  # ends that come meanwhile join the round
            if self._stop.is_set():
                return
            self._asleep = False  # ends that come during this round wait for the next
            self._wake.clear()
            self._due = False  # first: an end added after this wakes the next round
            with self._round:
                self._take()
                batch = list(self._held)
            if not batch:
                pause = 0.0
                self._asleep = True  # first: an end added after this wakes the thread...
                self._asleep = not self._incoming  # ...and one added before is taken next
                continue
            try:
                self._write(batch)
            except Exception as error:
                pause = min(max(pause * 2, FIRST_PAUSE_S), MAX_PAUSE_S)
                self._failed(error, batch)
            else:
                pause = 0.0
                self._recovered()
            with self._round:
                self._round.notify_all()

    def _take(self) -> None:
        """Move what the worker threads handed in to ``_held`` (under the lock), dropping the
        ends of consumers that closed meanwhile."""
        while True:
            try:
                item = self._incoming.popleft()
            except IndexError:
                break
            if not item[0].ends_dropped:
                self._held.append(item)

    def _write(self, batch: list[_Item]) -> None:
        """Write the ends of ``batch`` in one call; hand back those that fire nothing, then
        publish what the others fire and hand them back. Raises when the write fails, or
        when callbacks could not be published (their ends stay held: written again, they
        fire the same callbacks again while those are not out, see ``batch.lua``)."""
        tracker = tracker_of(self.broker)
        answers = tracker.state(self.broker).end([item[2][2:] for item in batch], owned=True)
        done: list[_Item] = []
        firing: list[tuple[_Item, list[str]]] = []
        for item, events in zip(batch, answers, strict=True):
            if events:
                firing.append((item, events))
            else:
                done.append(item)
        self._hand_back(done)
        unpublished: list[str] = []
        for item, events in firing:
            batch_id = item[2][2]
            try:
                tracker.fire(self.broker, batch_id, events, strict=True)
            except Exception as error:
                unpublished.append(f"{batch_id} ({type(error).__name__}: {error})")
                continue
            self._hand_back([item])
        if unpublished:
            raise _Unpublished("could not publish the callbacks of batch " + ", ".join(unpublished))

    def _hand_back(self, items: list[_Item]) -> None:
        """Their ends are written: out of ``_held``, and to their consumers to acknowledge."""
        if not items:
            return
        by_consumer: dict[int, tuple[RabbitmqConsumer, list[int], list[int]]] = {}
        for consumer, tag, _, reject in items:
            found = by_consumer.get(id(consumer))
            if found is None:
                found = by_consumer[id(consumer)] = (consumer, [], [])
            (found[2] if reject else found[1]).append(tag)
        with self._lock:
            if len(items) == len(self._held) and all(a is b for a, b in zip(items, self._held, strict=True)):
                self._held = []  # the whole round, nearly always
            else:
                out = {id(item) for item in items}
                self._held = [item for item in self._held if id(item) not in out]
        for consumer, acks, rejects in by_consumer.values():
            consumer.ends_written(acks, rejects)  # ignored once its connection is closed

    def _failed(self, error: Exception, batch: list[_Item]) -> None:
        if self.failing_since is None:  # once per outage, not every try
            self.failing_since = time.monotonic()
            logger.warning(
                "could not record the ends of %d batch members (%s: %s); they are kept and written again"
                " (an end that fired callbacks until they are published), with pauses of up to %g s, while"
                " their messages stay unacknowledged (this worker takes no more than its prefetch meanwhile)",
                len(batch),
                type(error).__name__,
                error,
                MAX_PAUSE_S,
            )

    def _recovered(self) -> None:
        since, self.failing_since = self.failing_since, None
        if since is not None:
            logger.warning(
                "batch members' ends are written again (after %.1f s); their messages are acknowledged",
                time.monotonic() - since,
            )

    def close(self) -> None:
        """Stop the thread (ends it holds are not acknowledged: their members run again)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and self.pid == os.getpid():
            thread.join(timeout=5)
