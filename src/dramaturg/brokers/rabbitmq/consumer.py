"""The RabbitMQ consumer: :class:`RabbitmqConsumer`, which holds poison messages instead
of dead-lettering them and never settles a delivery on a channel it did not come on."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from queue import Empty
from typing import Any

import pika
import pika.exceptions
from dramatiq.brokers.rabbitmq import _RabbitmqConsumer, _RabbitmqMessage
from dramatiq.common import q_name
from dramatiq.errors import ConnectionClosed

from ... import envelope, suspension, unknown_actors
from ...batches.tracker import BATCH_END
from ...durations import format_ms
from ...held import HeldTask, hold_poison
from ...masking import mask_url
from ...queues import canonical_queue
from ..proxy import with_fields
from .connection import error_text
from .ends import CLOSE_WAIT_S as ENDS_CLOSE_WAIT_S
from .ends import RabbitmqEndWriter, end_writer_of

__all__ = ["CLOSE_WAIT_S", "RabbitmqConsumer"]

logger = logging.getLogger("dramaturg.rabbitmq")

#: How long a close from another thread waits for a consumer's thread beyond its poll
#: timeout (it may be moving due delayed messages to their queue).
CLOSE_WAIT_S = 3.0
#: Delayed messages moved by a consumer in this long before its connection was lost may
#: come back (their acknowledgement written, but not read by RabbitMQ): they are named.
MOVED_BEFORE_LOSS_S = 2.0


class _Moves:
    """The delayed messages this process moved to their queue lately (the last
    ``size``), to recognise one RabbitMQ delivers again after its move was acknowledged
    on a connection that was lost before RabbitMQ read the acknowledgement."""

    def __init__(self, size: int = 10_000) -> None:
        self._order: deque[str] = deque()
        self._ids: set[str] = set()
        self.size = size

    def add(self, message_id: str) -> None:
        if message_id in self._ids:
            return
        self._order.append(message_id)
        self._ids.add(message_id)
        if len(self._order) > self.size:
            self._ids.discard(self._order.popleft())

    def __contains__(self, message_id: str) -> bool:
        return message_id in self._ids


#: Per process: each worker process moves its own (a forked child starts with its parent's, harmless).
_moved = _Moves()


class RabbitmqConsumer(_RabbitmqConsumer):
    """Dramatiq's RabbitMQ consumer, holding poison messages instead of dead-lettering them.

    Dramatiq rejects a body it cannot decode into the dead-letter queue, where it
    expires after a week without a word of why, and trusts the fields of one it can.
    Here each body is read by :func:`dramaturg.envelope.decode`: one that does not
    decode, has a field of the wrong type or names another queue is held with its
    reason, and then acknowledged. A message for an actor this worker does not know is
    given back for a while, then held (:mod:`dramaturg.unknown_actors`). If neither can
    be written, the message is rejected as before (not lost). ``__next__`` mirrors
    Dramatiq 2.x's, with those checks added.

    While its queue is suspended (:mod:`dramaturg.suspension`) the consumer is cancelled
    on its channel: RabbitMQ takes back the deliveries it had sent but this worker had
    not started (they go to other consumers, flagged as redelivered), while the ones
    being processed stay unacknowledged on the open channel and are acknowledged as
    they finish. Closing the channel instead would hand those back too, and they would
    run twice. When the suspension ends it consumes again.

    A message remembers the consumer it came from. When RabbitMQ closed that consumer's
    channel (``consumer_timeout``, a lost connection), the delivery went back to the
    queue, and Dramatiq would acknowledge or reject it on the next consumer's channel,
    where the same delivery number names another message; here it is left alone and
    logged (see :mod:`dramaturg.middleware.consumer_timeout`).

    Once its channel is gone the consumer is marked :attr:`gone`, and what it delivered
    but the worker had not started is never started: the worker's work queue
    (:class:`~dramaturg.middleware.priority.MessagePriorityQueue`) drops it, and the
    next consumer drops the delayed messages Dramatiq still holds from this one.
    RabbitMQ delivers all of them again; only the tasks running at the drop run twice.

    A batch member's end left on a message (:data:`BATCH_END`) is written before the
    message is acknowledged, by the process's end writer thread (:mod:`.ends`), never by
    this consumer's thread: a state store that does not answer would stop its heartbeats
    and deliveries. The writer hands the delivery back (:meth:`ends_written`) once the end
    is written.

    Its connection is used by its own thread only (pika's connections are not
    thread-safe). Dramatiq's ``Worker.stop`` closes consumers from its own thread, after
    waiting ``shutdown_timeout`` at most for them to leave; a consumer still polling then
    (its poll lasts the worker timeout, a second by default) would have its connection
    closed under it: the stop hung for good, or pika's state broke. Here such a close is
    handed to the consumer's thread (woken at once), and waited for, for a bounded time:
    the connection closes, and RabbitMQ takes back what it had delivered but was not
    acknowledged.
    """

    def __init__(self, broker: Any, queue_name: str, prefetch: int, timeout: int) -> None:
        #: True once this consumer's channel is closed or lost: its deliveries are void
        #: (RabbitMQ has taken them back). Read by worker threads for every message.
        self.gone = False
        self._forget_stale_delayed(queue_name)
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        self.timeout_s = timeout / 1000
        #: The most deliveries RabbitMQ keeps out to this consumer unacknowledged (its channel's QoS).
        self.prefetch = prefetch
        self.cancelled = False
        #: The thread that uses the connection (Dramatiq's consumer thread).
        self._owner = threading.current_thread()
        self._closing = threading.Lock()
        self._closed = False
        #: Another thread asked for a close; the owner does it at its next step.
        self._leave = False
        self._in_next = False  # the owner is in __next__ (where a wake-up can reach it)
        #: Delivery tags for the owner to acknowledge: finished by the worker threads, or
        #: handed back by the end writer once their batch members' ends are written.
        self._acks: deque[int] = deque()
        #: Delivery tags for the owner to reject, handed back by the end writer.
        self._rejects: deque[int] = deque()
        #: Writes the batch members' ends left on the messages acknowledged (see
        #: :mod:`.ends`); set on first use.
        self._end_writer: RabbitmqEndWriter | None = None
        #: Set by the end writer when this consumer closes: its ends not yet written are dropped.
        self.ends_dropped = False
        self._acks_due = False  # a call of _send_acks is on its way to the owner
        #: (monotonic time, message id) of the delayed messages this consumer moved lately.
        self._recent_moves: deque[tuple[float, str]] = deque(maxlen=1_000)
        self._name_moves_of_lost(getattr(self._owner, "consumer", None))

    def __next__(self) -> Any:
        if not self._leave:
            self._in_next = True
            try:
                return self._next_delivery()
            except _Leaving:
                pass  # woken by close() from another thread
            finally:
                self._in_next = False
        # Closed here, in the connection's own thread; Dramatiq's consumer thread then
        # leaves (or, if it was not told to stop, starts a new consumer).
        self._close_here()
        raise StopIteration

    def _next_delivery(self) -> Any:
        while True:
            if not self.queue_name.endswith(".DQ"):  # delay queues only move messages on
                wait = suspension.remaining_s(canonical_queue(self.queue_name))
                if (wait > 0 or self.cancelled) and not self._follow_suspension(wait):
                    return None
            try:
                method, properties, body = next(self.iterator)
                if method is None:
                    return None
            except (AssertionError, pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as e:
                if getattr(e, "reply_code", None) == 404:
                    self.broker.queues_pending.add(q_name(self.queue_name))
                self._lost(e)
                raise ConnectionClosed(e) from None

            queue = canonical_queue(self.queue_name)
            try:
                message = envelope.decode(body, self.queue_name)
            except envelope.Poison as poison:
                delivery_id = properties.message_id if properties else None
                self._settle_poison(HeldTask.from_poison(poison, queue, delivery_id), method)
                continue
            # A delayed one is met when it comes back to its queue (Dramatiq does not look its actor up before).
            if message.actor_name not in self.broker.actors and message.options.get("eta") is None:
                if unknown_actors.settle(self.broker, message, queue):  # given back, or held
                    self.channel.basic_ack(method.delivery_tag)
                else:
                    self._nack(method.delivery_tag)  # type: ignore[no-untyped-call]
                continue

            if method.redelivered and message.message_id in _moved and self.queue_name.endswith(".DQ"):
                # Moved by this process already; its acknowledgement was lost with the connection.
                logger.info(
                    "%s (message %s) was delivered again to be moved to its queue, where this worker had"
                    " moved it already: acknowledged, not moved twice",
                    message.actor_name,
                    message.message_id,
                )
                self.channel.basic_ack(method.delivery_tag)
                continue

            self.known_tags.add(method.delivery_tag)
            return _Delivery(self, method.redelivered, method.delivery_tag, message)

    def ack(self, message: Any) -> None:
        if not self._came_from_here(message, "finished"):
            return
        tag = message._tag
        end = message.__dict__.pop(BATCH_END, None)
        if end is not None:
            # A batch member that succeeded: its end is written first, by the end writer's
            # thread, which then hands the tag back to be acknowledged (see _send_end).
            self._send_end(tag, end, reject=False)
            return
        if threading.current_thread() is self._owner:
            # The consumer's own thread acknowledges a delayed message it has just moved to
            # its queue. Dramatiq's ack would wait for the next poll, after the rest of the
            # due messages are moved: a connection lost meanwhile would deliver this one
            # again, to be moved (and run) a second time. Sent now, before the next move.
            try:
                self.known_tags.discard(tag)
                self.channel.basic_ack(tag)
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as e:
                self._lost(e)
                raise ConnectionClosed(e) from None
            if self.queue_name.endswith(".DQ"):
                _moved.add(message.message_id)
                self._recent_moves.append((time.monotonic(), message.message_id))
            return
        try:
            self.known_tags.remove(tag)
        except KeyError:
            logger.warning("failed to acknowledge message %s: not among this channel's deliveries", message.message_id)
            return
        # Handed to the consumer's thread (pika's connection is not thread-safe), as Dramatiq
        # does, but together: one wake-up for the acknowledgements that pile up meanwhile,
        # and one write of their frames, where pika writes and polls after each.
        self._acks.append(tag)
        self._acks_to_owner()

    def _send_end(self, tag: int, end: tuple[Any, ...], *, reject: bool) -> None:
        """Hand a batch member's end to the end writer, which writes it, then hands ``tag``
        back to be acknowledged (or rejected) in this consumer's thread (see :mod:`.ends`).

        Not written in the consumer's thread, which serves pika's connection: a state store
        that does not answer would hold its heartbeats and deliveries. Not in the worker
        thread either, which would wait for it (the whole of a member's cost on RabbitMQ).
        While the store does not answer the message stays unacknowledged (never given back
        to the queue: each member runs once, and the full prefetch stops deliveries).
        """
        try:
            self.known_tags.remove(tag)
        except KeyError:
            logger.warning("failed to settle delivery %d: not among this channel's deliveries", tag)
            return
        writer = self._end_writer
        if writer is None:
            writer = self._end_writer = end_writer_of(self.broker)
            writer.fit(self.prefetch)
        writer.submit(self, tag, end, reject=reject)

    def ends_written(self, acks: list[int], rejects: list[int]) -> None:
        """From the end writer's thread: the ends of these deliveries are written; acknowledge
        ``acks`` and reject ``rejects``, in this consumer's thread. Ignored once the
        connection is closed: RabbitMQ has them back (they run again, and count once)."""
        self._acks.extend(acks)
        self._rejects.extend(rejects)
        with contextlib.suppress(ConnectionClosed):
            self._acks_to_owner()

    def _acks_to_owner(self) -> None:
        """Wake the consumer's thread once to send what is queued in ``_acks`` and ``_rejects``."""
        if not self._acks_due:
            self._acks_due = True
            try:
                self.connection.add_callback_threadsafe(self._send_acks)
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as e:
                raise ConnectionClosed(e) from None

    def _send_acks(self) -> None:
        """In the consumer's thread: acknowledge every delivery the worker threads finished
        (and those whose batch members' ends the end writer has written), in one write of
        their frames."""
        self._acks_due = False  # first: a tag added after this is sent by the next call
        tags = []
        while True:
            try:
                tags.append(self._acks.popleft())
            except IndexError:
                break
        rejects = []
        while True:
            try:
                rejects.append(self._rejects.popleft())
            except IndexError:
                break
        # Not self.gone: a close sets it before it runs the callbacks still queued, this one
        # among them, whose acknowledgements must go out first (as Dramatiq's close does).
        if not (tags or rejects) or not self.channel.is_open:
            return  # the channel is closed or lost: RabbitMQ has taken them back
        frames = [(tag, False) for tag in tags] + [(tag, True) for tag in rejects]
        buffered = self.channel._impl  # pika's channel under the blocking one: writes a frame, no flush
        for tag, reject in frames[:-1]:
            if reject:
                buffered.basic_nack(tag, requeue=False)
            else:
                buffered.basic_ack(tag)
        tag, reject = frames[-1]  # through the blocking channel: writes them all
        if reject:
            self.channel.basic_nack(tag, requeue=False)
        else:
            self.channel.basic_ack(tag)

    def nack(self, message: Any) -> None:
        if self._came_from_here(message, "was rejected"):
            end = message.__dict__.pop(BATCH_END, None)
            if end is not None:
                # Not so far (an end is left only on a message that succeeded): should a
                # later middleware fail it, the end is written before the message is
                # rejected for good, as before an acknowledgement.
                self._send_end(message._tag, end, reject=True)
                return
            super().nack(message)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Close the channel and the connection, in the consumer's own thread.

        From another thread while the consumer's thread is alive, the close is handed to
        it (see the class docstring) and waited for up to the poll timeout plus
        :data:`CLOSE_WAIT_S`; past that, a thread of its own waits for the consumer's
        thread to end and closes then (the process exiting closes it too).
        """
        self.gone = True  # from here on, nothing it delivered is started or settled
        owner = self._owner
        if threading.current_thread() is owner or not owner.is_alive():
            self._close_here()
            return
        self._leave = True
        with contextlib.suppress(pika.exceptions.AMQPError):  # closed already: nothing to wake
            self.connection.add_callback_threadsafe(self._wake)
        deadline = time.monotonic() + self.timeout_s + CLOSE_WAIT_S
        while not self._closed and owner.is_alive() and time.monotonic() < deadline:
            owner.join(0.01)  # the owner closes in __next__, or leaves without coming back
        if self._closed:
            return
        if not owner.is_alive():
            self._close_here()  # it left without another step: nothing uses the connection now
            return
        logger.warning(
            "the consumer of queue %r did not stop within %.1f s; its connection closes once it does (or when"
            " this process exits), and RabbitMQ then takes back the %d messages it had delivered",
            self.queue_name,
            self.timeout_s + CLOSE_WAIT_S,
            len(self.known_tags),
        )
        threading.Thread(target=self._close_after, args=(owner,), name="close-consumer", daemon=True).start()

    def _wake(self) -> None:
        """Run by pika in the owner's thread, between its reads: leave the poll at once."""
        if self._in_next and not self._closed:
            raise _Leaving

    def _close_after(self, owner: threading.Thread) -> None:
        owner.join()
        self._close_here()

    def _close_here(self) -> None:
        """Dramatiq's close (acknowledgements queued first, then channel and connection), once."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self.gone = True
            if self._end_writer is not None:
                # Ends being written: handed back first, so that Dramatiq's close, which
                # runs the callbacks queued before it closes, sends their acknowledgements.
                # On a lost connection they are dropped at once (RabbitMQ has them back).
                self._end_writer.release(self, ENDS_CLOSE_WAIT_S if self.channel.is_open else 0)
            super().close()  # type: ignore[no-untyped-call]

    def _came_from_here(self, message: Any, what: str) -> bool:
        source = getattr(message, "_dramaturg_consumer", self)
        if source is self and not self.gone:
            return True
        logger.warning(
            "%s (message %s) %s after RabbitMQ closed the channel it came on: RabbitMQ has given it back to"
            " the queue, so it runs again (its delivery is not settled on the new channel)",
            message.actor_name,
            message.message_id,
            what,
        )
        return False

    def _lost(self, error: BaseException) -> None:
        """The channel is closed or the connection lost: void every delivery, and say so."""
        if self.gone:
            return
        self.gone = True
        if _is_consumer_timeout(error):
            self._log_consumer_timeout()
            return
        logger.warning(
            "lost the channel of queue %r (%s): the %d messages this worker had taken from it and not"
            " acknowledged go back to the queue; those not started are not run here, and those running"
            " will run again when RabbitMQ delivers them again (each is logged as delivered again)",
            self.queue_name,
            mask_url(error_text(error)),
            len(self.known_tags),
        )

    def _name_moves_of_lost(self, previous: Any) -> None:
        """Name the delayed messages the consumer this one replaces moved just before it was
        lost: their acknowledgements may not have reached RabbitMQ, which then delivers them
        again. This process recognises those it gets and does not move them twice (see
        :class:`_Moves`); another worker may get one and move it again: it runs twice."""
        if not isinstance(previous, RabbitmqConsumer) or not previous._recent_moves:
            return
        last = previous._recent_moves[-1][0]
        ids = [message_id for at, message_id in previous._recent_moves if at >= last - MOVED_BEFORE_LOSS_S]
        previous._recent_moves.clear()
        shown = ", ".join(ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
        logger.warning(
            "queue %r: the connection was lost within %g s of moving %d delayed messages to their queue;"
            " RabbitMQ delivers again any whose acknowledgement it did not read: this worker does not move"
            " those twice, another worker would, and each may then run again: %s",
            self.queue_name,
            MOVED_BEFORE_LOSS_S,
            len(ids),
            shown,
        )

    def _forget_stale_delayed(self, queue_name: str) -> None:
        """Drop the delayed messages this consumer's thread still holds from a consumer that is gone.

        Dramatiq's consumer thread keeps its delay queue when it replaces its consumer
        after an unexpected error or a pause (after a connection error it empties it
        itself). The old channel is closed, so RabbitMQ delivers those messages again:
        moving them to their queue when due as well would queue each task twice. Runs
        once per consumer, in the consumer thread.
        """
        thread = threading.current_thread()
        delayed = getattr(thread, "delay_queue", None)
        if getattr(thread, "queue_name", None) != queue_name or delayed is None:
            return
        kept, dropped = [], 0
        while True:
            try:
                item = delayed.get_nowait()
            except Empty:
                break
            delayed.task_done()
            source = item.message.__dict__.get("_dramaturg_consumer")
            if source is not None and source.gone:
                dropped += 1
            else:
                kept.append(item)
        for item in kept:
            delayed.put(item)
        if dropped:
            logger.info(
                "queue %r: %d delayed messages taken on a closed channel are dropped here; RabbitMQ delivers"
                " them again",
                queue_name,
                dropped,
            )

    def _log_consumer_timeout(self) -> None:
        logger.error(
            "RabbitMQ closed the channel of queue %r: a delivery was not acknowledged within the server's"
            " consumer_timeout (broker.consumer_timeout = %s); the %d messages this worker had taken from it go"
            " back to the queue, and those already started will run again (each is logged as delivered again)."
            " Raise consumer_timeout on the server, lower the ttr of long tasks, or lower broker.prefetch",
            self.queue_name,
            format_ms(self.broker.settings.consumer_timeout),
            len(self.known_tags),
        )

    def _follow_suspension(self, wait: float) -> bool:
        """Cancel while suspended (idling up to ``wait``), consume again after; True once consuming."""
        try:
            if wait > 0:
                if not self.cancelled:
                    self.channel.cancel()  # rejects the unstarted deliveries back to the queue, one by one
                    self.cancelled = True
                # Serve heartbeats and the acknowledgements of running tasks while idle.
                self.connection.process_data_events(time_limit=min(wait, self.timeout_s))
                return False
            self.iterator = self.channel.consume(self.queue_name, inactivity_timeout=self.timeout_s)
            self.cancelled = False
            return True
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as e:
            self._lost(e)
            raise ConnectionClosed(e) from None

    def _settle_poison(self, task: HeldTask, method: Any) -> None:
        if hold_poison(self.broker, task):
            self.channel.basic_ack(method.delivery_tag)
        else:
            self._nack(method.delivery_tag)  # type: ignore[no-untyped-call]


class _Delivery(_RabbitmqMessage):
    """A message as a RabbitMQ consumer delivered it, knowing the consumer it came from."""

    def __init__(self, consumer: RabbitmqConsumer, redelivered: bool, tag: int, message: Any) -> None:
        super().__init__(redelivered, tag, message)  # type: ignore[no-untyped-call]
        self._dramaturg_consumer = consumer
        with_fields(self)

    def taken_back(self) -> bool:
        """True once the channel it came on is closed: RabbitMQ has it again (see :func:`dramaturg.task.taken_back`)."""
        return self._dramaturg_consumer.gone


class _Leaving(Exception):
    """Raised in a consumer's thread, out of pika's poll, to leave it at once (see
    :meth:`RabbitmqConsumer.close`). pika dispatches the callback that raises it after
    its I/O step, in the caller's context, so its own state stays whole."""


def _is_consumer_timeout(error: BaseException) -> bool:
    """A channel closed by RabbitMQ because a delivery outlived its consumer_timeout."""
    text = str(getattr(error, "reply_text", ""))
    return getattr(error, "reply_code", None) == 406 and "acknowledgement" in text and "timed out" in text
