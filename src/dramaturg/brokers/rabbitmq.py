"""RabbitMQ through pika: Dramatiq's broker with publisher confirms on by default.

With confirms, ``send()`` returns only once RabbitMQ has taken responsibility for the
message (a publish to a missing queue or a full disk raises instead of vanishing).
They cost a round trip per message; bulk sending (a later feature) pipelines them.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from queue import Empty
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions
from dramatiq import Message, Middleware
from dramatiq.brokers.rabbitmq import RabbitmqBroker as _DramatiqRabbitmqBroker
from dramatiq.brokers.rabbitmq import _RabbitmqConsumer, _RabbitmqMessage
from dramatiq.common import current_millis, dq_name, q_name
from dramatiq.errors import ConnectionClosed

from .. import envelope, suspension, unknown_actors
from ..config import BrokerSettings
from ..errors import BrokerUnreachable, ConfigError, SendError
from ..held import HeldStore, HeldTask, KickError
from ..masking import mask_url
from ..middleware.consumer_timeout import fmt_ms
from ..middleware.outcomes import hold_poison
from ..queues import BANDS, canonical_queue

if TYPE_CHECKING:
    from .rabbitmq_stats import RabbitmqStatsReader

__all__ = ["RabbitmqBroker", "RabbitmqConsumer", "RabbitmqHeldStore", "create_broker", "ping"]

logger = logging.getLogger("dramaturg.rabbitmq")

#: How long a close from another thread waits for a consumer's thread beyond its poll
#: timeout (it may be moving due delayed messages to their queue).
CLOSE_WAIT_S = 3.0


class RabbitmqBroker(_DramatiqRabbitmqBroker):
    """Dramatiq's RabbitMQ broker, built from :class:`BrokerSettings`.

    Connections are opened lazily, one per thread, as in Dramatiq.
    """

    def __init__(self, settings: BrokerSettings, *, middleware: list[Middleware]) -> None:
        parameters = connection_parameters(settings)  # a clear error for a bad URL, before pika's
        super().__init__(
            middleware=middleware,
            confirm_delivery=settings.confirm_delivery,
            max_priority=len(BANDS) - 1 if settings.priorities else None,
        )
        self.parameters = parameters
        self.settings = settings
        self.held = RabbitmqHeldStore(self)
        self._warned: set[str] = set()  # actors already warned about a delay past consumer_timeout
        self._windows = threading.local()  # bulk sends: a confirm window per thread
        self._windows_lock = threading.Lock()
        self._all_windows: list[_ConfirmWindow] = []

    def pending(self, queue_name: str) -> int:
        """Messages of a queue waiting, ready or delayed. RabbitMQ does not count the ones a
        consumer holds unacknowledged here; they come back when their consumer goes."""
        connection = pika.BlockingConnection(self.parameters)
        try:
            channel = connection.channel()
            total = 0
            for name in (queue_name, f"{queue_name}.DQ"):
                try:
                    total += channel.queue_declare(name, passive=True).method.message_count
                except pika.exceptions.ChannelClosedByBroker as error:
                    if error.reply_code != 404:
                        raise
                    channel = connection.channel()
            return total
        finally:
            connection.close()

    @functools.cached_property
    def stats(self) -> RabbitmqStatsReader:
        """Queue statistics (see :mod:`dramaturg.stats`)."""
        from .rabbitmq_stats import RabbitmqStatsReader

        return RabbitmqStatsReader(self)

    @property
    def consumer_class(self) -> type[RabbitmqConsumer]:
        return RabbitmqConsumer

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        if delay is not None and delay > self.settings.consumer_timeout and message.actor_name not in self._warned:
            self._warned.add(message.actor_name)
            logger.warning(
                "%s: a delay of %s exceeds RabbitMQ's consumer_timeout (%s, broker.consumer_timeout): a worker"
                " holds a delayed message unacknowledged until it is due, so RabbitMQ will close its channel"
                " (the message is not lost, but the channel's other messages are redelivered); send it later"
                " instead, or raise consumer_timeout on the server",
                message.actor_name,
                fmt_ms(delay),
                fmt_ms(self.settings.consumer_timeout),
            )
        result: Message[Any] = super().enqueue(message, delay=delay)
        return result

    def enqueue_many(self, messages: Sequence[Message[Any]], *, delay: int | None = None) -> list[Message[Any]]:
        """Publish ``messages`` as one window, then wait for all their confirms.

        pika's blocking channel waits for each confirm before the next publish (one round
        trip per message); this publishes through its underlying asynchronous channel and
        collects the confirms afterwards, so a window costs about one round trip. Never
        without confirms: a message is counted sent only once RabbitMQ acknowledged it.
        On a failure, :class:`~dramaturg.bulk.BulkSendError` tells the confirmed ones as
        sent, the nacked, returned (unroutable) and never published ones as not sent, and
        the ones published but never confirmed (the connection was lost, or no confirm
        came in time) as unknown: RabbitMQ may well have them. Whatever was published
        before a failure is still waited for, so that it is counted where it belongs.
        Used by :func:`dramaturg.bulk.send_many`.
        """
        from ..bulk import BulkSendError, EnqueueHooks, message_encoder

        hooks = EnqueueHooks(self)
        encode = message_encoder()
        eta = current_millis() + delay if delay is not None else None
        failure: Exception | None = None
        try:
            window = self._confirm_window()
        except (pika.exceptions.AMQPError, OSError) as error:
            raise BulkSendError(f"{type(error).__name__}: {error}", 0, list(messages)) from error
        window.begin()
        try:
            for canonical in dict.fromkeys(message.queue_name for message in messages):
                self.declare_queue(canonical, ensure=True)
            window.gather()
            try:
                for message in messages:
                    if eta is not None:
                        message = Message(
                            queue_name=dq_name(message.queue_name),
                            actor_name=message.actor_name,
                            args=message.args,
                            kwargs=message.kwargs,
                            options={**message.options, "eta": eta},
                            message_id=message.message_id,
                            message_timestamp=message.message_timestamp,
                        )
                    hooks.emit_before(message, delay)
                    window.publish(message.queue_name, message, encode(message))
            finally:
                window.write_gathered(stop=True)  # also what was published before a failure
        except Exception as error:  # a lost connection, a refusing middleware, a message that does not encode
            failure = error
        timeout_s = max(30.0, self.settings.connect_timeout / 1000)
        try:
            window.wait(timeout_s)  # what was published is counted where it belongs, even after a failure
        except Exception as error:  # the connection was lost while waiting
            failure = failure or error
        outcome = window.end()
        if failure is None and not outcome.refused and not outcome.unconfirmed:
            hooks.emit_after(outcome.confirmed, delay)
            return outcome.confirmed
        window.close()
        if outcome.confirmed:
            hooks.emit_after(outcome.confirmed, delay)
        reasons = [f"{type(failure).__name__}: {failure}"] if failure is not None else []
        reasons += outcome.reasons
        if outcome.unconfirmed and failure is None:
            reasons.append(f"no confirm within {timeout_s:.0f} s")
        unsent = outcome.refused + list(messages[outcome.published :])
        reason = "; ".join(dict.fromkeys(reasons))
        raise BulkSendError(reason, len(outcome.confirmed), unsent, outcome.unconfirmed) from failure

    def _confirm_window(self) -> _ConfirmWindow:
        """This thread's confirm window, opened on first use and kept while it is open."""
        window: _ConfirmWindow | None = getattr(self._windows, "window", None)
        if window is None or not window.connection.is_open:
            window = self._windows.window = _ConfirmWindow(self)
            with self._windows_lock:
                self._all_windows.append(window)
        return window

    def close(self) -> None:
        with self._windows_lock:
            windows, self._all_windows = self._all_windows, []
        for window in windows:
            window.close()
        self.held.close()
        super().close()

    def __repr__(self) -> str:
        return f"<RabbitmqBroker {mask_url(self.settings.url)}>"


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
        self.cancelled = False
        #: The thread that uses the connection (Dramatiq's consumer thread).
        self._owner = threading.current_thread()
        self._closing = threading.Lock()
        self._closed = False
        #: Another thread asked for a close; the owner does it at its next step.
        self._leave = False
        self._in_next = False  # the owner is in __next__ (where a wake-up can reach it)

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

            self.known_tags.add(method.delivery_tag)
            return _Delivery(self, method.redelivered, method.delivery_tag, message)

    def ack(self, message: Any) -> None:
        if not self._came_from_here(message, "finished"):
            return
        if threading.current_thread() is not self._owner:
            super().ack(message)  # type: ignore[no-untyped-call]  # handed to the owner's next poll
            return
        # The consumer's own thread acknowledges a delayed message it has just moved to
        # its queue. Dramatiq's ack would wait for the next poll, after the rest of the
        # due messages are moved: a connection lost meanwhile would deliver this one
        # again, to be moved (and run) a second time. Sent now, before the next move.
        try:
            self.known_tags.discard(message._tag)
            self.channel.basic_ack(message._tag)
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as e:
            self._lost(e)
            raise ConnectionClosed(e) from None

    def nack(self, message: Any) -> None:
        if self._came_from_here(message, "was rejected"):
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
            mask_url(_reason(error)),
            len(self.known_tags),
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
            fmt_ms(self.broker.settings.consumer_timeout),
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

    def taken_back(self) -> bool:
        """True once the channel it came on is closed: RabbitMQ has it again (see :func:`dramaturg.task.taken_back`)."""
        return self._dramaturg_consumer.gone


class _Leaving(Exception):
    """Raised in a consumer's thread, out of pika's poll, to leave it at once (see
    :meth:`RabbitmqConsumer.close`). pika dispatches the callback that raises it after
    its I/O step, in the caller's context, so its own state stays whole."""


class _ConfirmWindow:
    """A connection of its own whose publishes are confirmed as a batch.

    pika writes each frame with a system call of its own (three per message); while a
    window is being published its frames are gathered and written ``FRAMES_PER_WRITE``
    at a time instead (a third of the time went to ``send``). Outside a window, frames
    (heartbeats, closing) go out as pika writes them.
    """

    #: Frames gathered before they are written: ~85 messages.
    FRAMES_PER_WRITE = 256

    def __init__(self, broker: RabbitmqBroker) -> None:
        self.connection = pika.BlockingConnection(broker.parameters)
        self.channel = self.connection.channel()
        self.impl = self.channel._impl  # pika's asynchronous channel under the blocking one
        self._gathered: list[bytes] | None = None
        impl_connection = self.impl.connection
        self._emit = getattr(impl_connection, "_adapter_emit_data", None)
        if self._emit is not None and hasattr(impl_connection, "_output_marshaled_frames"):
            original = impl_connection._output_marshaled_frames

            def output(frames: Sequence[bytes]) -> None:
                if self._gathered is None:
                    original(frames)
                else:
                    self._gathered.extend(frames)
                    if len(self._gathered) >= self.FRAMES_PER_WRITE:
                        self.write_gathered()

            impl_connection._output_marshaled_frames = output
        self.pending: dict[int, Message[Any]] = {}  # published, neither confirmed nor refused yet
        self.next_tag = 1
        self.begin()
        ready: list[bool] = []
        self.impl.add_on_return_callback(self._returned)
        self.impl.confirm_delivery(ack_nack_callback=self._confirmed, callback=lambda _frame: ready.append(True))
        deadline = time.monotonic() + max(30.0, broker.settings.connect_timeout / 1000)
        while not ready:  # a short time limit: pika waits all of it even once the answer is in
            if time.monotonic() > deadline:
                self.close()
                raise pika.exceptions.AMQPChannelError("RabbitMQ did not turn publisher confirms on")
            self.connection.process_data_events(time_limit=0.01)

    def gather(self) -> None:
        """Gather frames from now until :meth:`write_gathered` (when pika's internals allow)."""
        if self._emit is not None:
            self._gathered = []

    def write_gathered(self, *, stop: bool = False) -> None:
        gathered = self._gathered
        if gathered:
            self._gathered = []
            data = b"".join(gathered)
            connection = self.impl.connection
            connection.bytes_sent += len(data)
            connection.frames_sent += len(gathered)
            assert self._emit is not None
            self._emit(data)
        if stop:
            self._gathered = None

    def begin(self) -> None:
        """Start counting a batch: what :meth:`end` reports is about what is published from now."""
        self.published = 0
        self.confirmed: list[Message[Any]] = []
        self.refused: list[Message[Any]] = []
        self.reasons: list[str] = []

    def publish(self, queue_name: str, message: Message[Any], body: bytes) -> None:
        properties = pika.BasicProperties(
            delivery_mode=2, priority=message.options.get("broker_priority"), message_id=message.message_id
        )
        self.impl.basic_publish("", queue_name, body, properties, mandatory=True)
        self.pending[self.next_tag] = message
        self.next_tag += 1
        self.published += 1
        if len(self.pending) % 256 == 0:
            self.write_gathered()
            self.connection.process_data_events(time_limit=0)  # take in confirms as they come

    def wait(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the confirms of everything published (raises if the
        connection is lost meanwhile: what is still pending then is unknown)."""
        self.write_gathered(stop=True)
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.002)  # pika waits all of it: keep it short

    def end(self) -> _BatchOutcome:
        """What became of the batch since :meth:`begin`; what has no confirm yet is unconfirmed."""
        outcome = _BatchOutcome(
            self.published, self.confirmed, self.refused, list(self.pending.values()), list(dict.fromkeys(self.reasons))
        )
        self.pending.clear()
        self.begin()
        return outcome

    def close(self) -> None:
        self._gathered = None
        with contextlib.suppress(Exception):
            if self.connection.is_open:
                self.connection.close()

    def _confirmed(self, frame: Any) -> None:
        method = frame.method
        if method.multiple:  # every pending tag up to this one: the oldest, since tags grow
            tags = list(itertools.takewhile(lambda tag: tag <= method.delivery_tag, self.pending))
        else:
            tags = [method.delivery_tag]
        nacked = isinstance(method, pika.spec.Basic.Nack)
        for tag in tags:
            message = self.pending.pop(tag, None)
            if message is None:  # returned before its ack: counted as refused already
                continue
            if nacked:
                self.refused.append(message)
                self.reasons.append("RabbitMQ refused it (nack)")
            else:
                self.confirmed.append(message)

    def _returned(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        for tag, message in list(self.pending.items()):
            if message.message_id == properties.message_id:
                self.refused.append(message)
                self.reasons.append(f"unroutable: {method.reply_text}")
                del self.pending[tag]  # its confirm (an ack) follows; it was not delivered
                break


@dataclass(frozen=True)
class _BatchOutcome:
    """A confirm window's batch: how many were published, and which were confirmed,
    refused (nacked or returned), or are still unconfirmed."""

    published: int
    confirmed: list[Message[Any]]
    refused: list[Message[Any]]
    unconfirmed: list[Message[Any]]
    reasons: list[str]


def _is_consumer_timeout(error: BaseException) -> bool:
    """A channel closed by RabbitMQ because a delivery outlived its consumer_timeout."""
    text = str(getattr(error, "reply_text", ""))
    return getattr(error, "reply_code", None) == 406 and "acknowledgement" in text and "timed out" in text


def connection_parameters(settings: BrokerSettings) -> Any:
    """pika's parameters for ``broker.url``, with the configured timeouts and heartbeat.

    A URL holding several, separated by ``;``, gives a list: pika tries them in turn.
    """
    assert settings.url is not None
    urls = [url for url in settings.url.split(";") if url.strip()]
    parsed = []
    for url in urls:
        try:
            parameters = pika.URLParameters(url.strip())
        except Exception as error:  # pika raises ValueError, TypeError or its own errors
            # Never the URL: one that did not parse cannot be masked reliably.
            raise ConfigError(f"broker.url: not a valid AMQP URL: {mask_url(str(error))}", key="broker.url") from None
        parameters.socket_timeout = settings.connect_timeout / 1000
        parameters.blocked_connection_timeout = 30
        if settings.heartbeat is not None:  # 0 turns heartbeats off; round up, never down to 0
            parameters.heartbeat = -(-settings.heartbeat // 1000)
        parsed.append(parameters)
    return parsed[0] if len(parsed) == 1 else parsed


def create_broker(settings: BrokerSettings, middleware: list[Middleware]) -> RabbitmqBroker:
    return RabbitmqBroker(settings, middleware=middleware)


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_level = logging.NOTSET


@contextmanager
def quiet_pika() -> Iterator[None]:
    """Keep pika from logging while a command connects: a refused password or a closed
    port makes it log six ERROR lines and a traceback before it raises, and the command
    then says the same in one line of its own. Only around a command's own attempts
    (``ping``, the statistics); a worker's reconnections keep pika's lines."""
    global _quiet_depth, _quiet_level
    pika_logger = logging.getLogger("pika")
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_level = pika_logger.level
            pika_logger.setLevel(logging.CRITICAL + 1)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                pika_logger.setLevel(_quiet_level)


def ping(settings: BrokerSettings) -> float:
    parameters = connection_parameters(settings)
    for each in parameters if isinstance(parameters, list) else [parameters]:
        each.connection_attempts = 1
    start = time.perf_counter()
    try:
        with quiet_pika():
            connection = pika.BlockingConnection(parameters)
    except pika.exceptions.ProbableAuthenticationError:
        raise _unreachable(settings, "authentication failed (check the user and password)") from None
    except pika.exceptions.ProbableAccessDeniedError:
        raise _unreachable(settings, "access denied to the virtual host") from None
    except (pika.exceptions.AMQPError, OSError) as error:
        raise _unreachable(settings, _reason(error)) from None
    try:
        channel = connection.channel()
        channel.close()
        return (time.perf_counter() - start) * 1000
    finally:
        connection.close()


def _reason(error: BaseException) -> str:
    # AMQPConnectionError wraps the socket error in args, and pika's connector errors keep
    # it in .exception; show the innermost useful text ("[Errno 111] Connection refused").
    inner: Any = error
    while True:
        if getattr(inner, "args", None) and isinstance(inner.args[0], BaseException):
            inner = inner.args[0]
        elif isinstance(getattr(inner, "exception", None), BaseException):
            inner = inner.exception
        else:
            break
    text = str(inner) or type(inner).__name__
    return text if text != "()" else type(error).__name__


def _unreachable(settings: BrokerSettings, reason: str) -> BrokerUnreachable:
    return BrokerUnreachable(f"cannot reach RabbitMQ at {mask_url(settings.url)}: {reason}")


# -- held tasks -------------------------------------------------------------------------


def held_queue(queue: str) -> str:
    """The durable queue holding ``queue``'s held tasks (no consumer ever reads it)."""
    return f"{queue}.HQ"


#: The longest queue name RabbitMQ takes is 255 bytes; dramaturg adds ``.DQ``, ``.XQ``, ``.HQ``.
MAX_QUEUE_BYTES = 255 - 3


class _MissingHeldQueue(logging.Filter):
    """Drops pika's warning for a passive check of a held queue that does not exist: that
    only means "no held tasks there", and it would come before every `held` command's
    answer. Every other channel closing is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "Received remote Channel.Close (%s): %r on %s" or not record.args:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        return not (len(args) == 3 and args[0] == 404 and ".HQ'" in str(args[1]))


_missing_held_queue = _MissingHeldQueue()


class _Take:
    """The channel one :meth:`RabbitmqHeldStore.taking` holds its deliveries on: they are
    the lease (RabbitMQ gives them back when the channel or its connection closes)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.transactional = False
        self.returned: list[str] = []

    def begin(self) -> None:
        """Make the channel transactional (once): a kick's publishes and acknowledgements
        then happen together at the commit, or not at all."""
        if not self.transactional:
            self.channel.tx_select()
            self.channel.add_on_return_callback(lambda _c, method, _p, _b: self.returned.append(method.routing_key))
            self.transactional = True


class RabbitmqHeldStore(HeldStore):
    """Held tasks as persistent messages in a durable ``<queue>.HQ`` per queue, no TTL.

    Writes use publisher confirms whatever ``broker.confirm_delivery`` says. Reading
    takes messages with ``basic_get`` without acknowledging them and then closes the
    channel, so RabbitMQ puts every one back in its place: listing removes nothing, and
    a kicker that dies before it acknowledges leaves its tasks held. A kick publishes
    each task and acknowledges its held copy in one transaction on the channel that
    holds it: a kicker that stalls until RabbitMQ drops its connection (missed
    heartbeats) gets its tasks given back and can no longer commit, so another kick
    requeues them and it does not. Holding the same task twice (a worker killed between
    holding and acknowledging) keeps two copies; kick and purge act on every copy of an id.

    Only the queues the broker knows (those of declared actors) can be listed without
    naming them: AMQP cannot enumerate queues. Reading never declares a held queue: a
    name with none (a typo) has no held tasks.
    """

    def __init__(self, broker: RabbitmqBroker) -> None:
        super().__init__(broker)
        self.broker: RabbitmqBroker = broker
        self.parameters = broker.parameters
        self._lock = threading.RLock()
        self._connection: pika.BlockingConnection | None = None
        self._publisher: Any = None
        self._declared: set[str] = set()
        logging.getLogger("pika.channel").addFilter(_missing_held_queue)  # idempotent

    # One connection per store, used under a lock: holds are rare, and pika's
    # connections must not be shared between threads without one.
    def _channel(self, *, confirmed: bool) -> Any:
        if self._connection is None or not self._connection.is_open:
            self._connection = pika.BlockingConnection(self.parameters)
            self._publisher = None
            self._declared.clear()
        if not confirmed:
            return self._connection.channel()
        if self._publisher is None or not self._publisher.is_open:
            self._publisher = self._connection.channel()
            self._publisher.confirm_delivery()
        return self._publisher

    def _reset(self) -> None:
        connection, self._connection, self._publisher = self._connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):
                connection.close()

    def _retrying(self, operation: Any) -> Any:
        """Run ``operation()`` under the lock, once more on a fresh connection if it broke."""
        with self._lock:
            try:
                return operation()
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError):
                self._reset()
                return operation()

    def _reading(self, operation: Any, what: str) -> Any:
        """:meth:`_retrying` for a read: a connection that fails again is a
        :class:`~dramaturg.errors.BrokerUnreachable` saying ``what`` was being done."""
        try:
            return self._retrying(operation)
        except pika.exceptions.AMQPConnectionError as error:
            raise self._unreachable(what, error) from None

    def _unreachable(self, what: str, error: BaseException) -> BrokerUnreachable:
        return _unreachable(self.broker.settings, f"{_reason(error)} (while {what})")

    def check_queue(self, queue: str) -> str:
        super().check_queue(queue)
        if len(queue.encode()) > MAX_QUEUE_BYTES:
            raise SendError(f"{queue[:40]}... is not a queue name: RabbitMQ takes at most {MAX_QUEUE_BYTES} bytes")
        if queue.startswith("amq."):
            raise SendError(f"{queue!r} is not a queue name: RabbitMQ reserves names starting with 'amq.'")
        return queue

    def hold(self, task: HeldTask) -> None:
        def publish() -> None:
            channel = self._channel(confirmed=True)
            name = held_queue(task.queue_name)
            if name not in self._declared:
                channel.queue_declare(name, durable=True)
                self._declared.add(name)
            channel.basic_publish(
                exchange="",
                routing_key=name,
                body=task.to_json().encode(),
                properties=pika.BasicProperties(
                    delivery_mode=2, content_type="application/json", message_id=task.message_id
                ),
                mandatory=True,
            )

        self._retrying(publish)

    def _read(self, channel: Any, queue: str) -> Iterator[tuple[int, HeldTask]]:
        """Every held task of ``queue``, unacknowledged on ``channel`` (closing it puts them back).

        An entry this version cannot read comes as :meth:`HeldTask.unreadable`, by the id
        it was published with (or one derived from its body, the same on every read).
        """
        while True:
            method, properties, body = channel.basic_get(held_queue(queue), auto_ack=False)
            if method is None:
                return
            try:
                task = HeldTask.from_json(body)
            except ValueError as error:
                message_id = getattr(properties, "message_id", None) or "body-" + hashlib.sha1(body).hexdigest()[:16]
                task = HeldTask.unreadable(str(message_id), queue, body, str(error))
            yield method.delivery_tag, task

    def _size(self, queue: str) -> int:
        """How many tasks ``queue``'s held queue has ready; 0 when it does not exist.

        A passive check on a channel of its own (a missing queue closes it with a 404),
        so that reading never creates a held queue for a name typed by mistake.
        """
        channel = self._channel(confirmed=False)
        try:
            return int(channel.queue_declare(held_queue(queue), passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code == 404:
                return 0
            raise
        finally:
            if channel.is_open:
                channel.close()

    def list(self, queue: str | None = None, *, offset: int = 0, limit: int = 50) -> list[HeldTask]:
        names = [self.check_queue(queue)] if queue is not None else self.queues()

        def read() -> list[HeldTask]:
            found: list[HeldTask] = []
            skip = offset
            for name in names:
                if len(found) >= limit or not self._size(name):
                    continue
                channel = self._channel(confirmed=False)
                try:
                    for _, task in self._read(channel, name):
                        if skip:
                            skip -= 1
                        elif len(found) < limit:
                            found.append(task)
                        else:
                            break
                finally:
                    channel.close()
            return found

        result: list[HeldTask] = self._reading(read, "listing held tasks")
        return result

    def count(self, queue: str | None = None) -> int:
        names = [self.check_queue(queue)] if queue is not None else self.queues()

        def read() -> int:
            return sum(self._size(name) for name in names)

        result: int = self._reading(read, "counting held tasks")
        return result

    def get(self, message_id: str, queue: str | None = None) -> HeldTask | None:
        names = [self.check_queue(queue)] if queue is not None else self.queues()

        def read() -> HeldTask | None:
            for name in names:
                if not self._size(name):
                    continue
                channel = self._channel(confirmed=False)
                try:
                    for _, task in self._read(channel, name):
                        if task.message_id == message_id:
                            return task
                finally:
                    channel.close()
            return None

        result: HeldTask | None = self._reading(read, "reading held tasks")
        return result

    @contextmanager
    def taking(self, queue: str, message_ids: Sequence[str] | None) -> Iterator[Iterator[tuple[HeldTask, Any]]]:
        self.check_queue(queue)
        what = f"taking the held tasks of {queue}: none was requeued, RabbitMQ keeps them held"
        with self._lock:
            if (message_ids is not None and not message_ids) or not self._reading(lambda: self._size(queue), what):
                yield iter(())
                return
            try:
                take = _Take(self._channel(confirmed=False))
            except pika.exceptions.AMQPConnectionError as error:
                raise self._unreachable(what, error) from None
            wanted = set(message_ids) if message_ids is not None else None
            try:
                try:
                    taken = [
                        (task, (take, tag))
                        for tag, task in self._read(take.channel, queue)
                        if wanted is None or task.message_id in wanted
                    ]
                except pika.exceptions.AMQPConnectionError as error:
                    # Lost while taking (a kicker paused until RabbitMQ dropped it): RabbitMQ
                    # gave back what it had taken, and nothing was requeued yet.
                    raise self._unreachable(what, error) from None
                yield iter(taken)
            finally:
                if take.channel.is_open:
                    with contextlib.suppress(pika.exceptions.AMQPError):
                        take.channel.close()  # every task not acknowledged goes back, in its place

    def requeue(
        self, queue: str, batch: Sequence[tuple[Message[Any], Any]], delay_ms: int | None
    ) -> builtins.list[tuple[str, str]]:
        """Publish the batch and acknowledge its held copies in one transaction on the
        channel that took them: if RabbitMQ dropped that channel (this kicker stalled past
        its heartbeats), it gave the tasks back and nothing of the batch happens."""
        if not batch:
            return []
        take: _Take = batch[0][1][0]
        try:
            self.broker.declare_queue(queue, ensure=True)
            take.begin()
            take.returned.clear()
            prepared = []
            for message, (_, tag) in batch:
                if delay_ms is not None:
                    message = message.copy(queue_name=dq_name(queue), options={"eta": current_millis() + delay_ms})
                self.broker.emit_before("enqueue", message, delay_ms)
                take.channel.basic_publish(
                    exchange="",
                    routing_key=message.queue_name,
                    body=message.encode(),
                    properties=pika.BasicProperties(delivery_mode=2, priority=message.options.get("broker_priority")),
                    mandatory=True,
                )
                take.channel.basic_ack(tag)
                prepared.append(message)
            # A synchronous round trip before committing: RabbitMQ returns a message it
            # cannot route (its queue was deleted) before it answers this.
            for name in {message.queue_name for message in prepared}:
                take.channel.queue_declare(name, passive=True)
            take.channel.connection.process_data_events(time_limit=0)
            if take.returned:
                take.channel.tx_rollback()
                raise KickError(f"RabbitMQ could not route the tasks to {take.returned[0]!r} (deleted?)")
            take.channel.tx_commit()
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code != 404:
                raise
            raise KickError(f"RabbitMQ has no queue to requeue them to ({_reason(error)})") from None
        except pika.exceptions.AMQPError as error:
            why = (
                f"not requeued by this kick: its channel to RabbitMQ was lost ({_reason(error)}), so RabbitMQ"
                f" gave the task back to {held_queue(queue)} (or requeued it, had the commit arrived)"
            )
            return [(message.message_id, why) for message, _ in batch]
        for message in prepared:
            self.broker.emit_after("enqueue", message, delay_ms)
        return []

    def forget(self, queue: str, receipt: Any) -> None:
        take, tag = receipt
        take.channel.basic_ack(tag)

    def purge(self, queue: str, message_ids: Sequence[str] | None = None) -> int:
        self.check_queue(queue)
        if message_ids is None:

            def purge_all() -> int:
                if not self._size(queue):
                    return 0
                channel = self._channel(confirmed=False)
                try:
                    return int(channel.queue_purge(held_queue(queue)).method.message_count)
                finally:
                    channel.close()

            result: int = self._reading(purge_all, f"purging the held tasks of {queue}")
            return result
        purged = 0
        with self.taking(queue, message_ids) as taken:
            for _, receipt in taken:
                try:
                    self.forget(queue, receipt)
                except pika.exceptions.AMQPConnectionError as error:
                    what = f"purging the held tasks of {queue}: up to {purged} were purged, the rest stay held"
                    raise self._unreachable(what, error) from None
                purged += 1
        return purged

    def queues(self) -> builtins.list[str]:
        return sorted({canonical_queue(name) for name in self.broker.get_declared_queues()})

    def close(self) -> None:
        with self._lock:
            self._reset()
