"""The RabbitMQ broker: :class:`RabbitmqBroker`, Dramatiq's with publisher confirms on by default.

With confirms, ``send()`` returns only once RabbitMQ has taken responsibility for the
message (a publish to a missing queue or a full disk raises instead of vanishing).
They cost a round trip per message; bulk sending pipelines them (:mod:`.confirms`).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions
from dramatiq import Message, Middleware
from dramatiq.brokers.rabbitmq import RabbitmqBroker as _DramatiqRabbitmqBroker
from dramatiq.common import current_millis, dq_name
from dramatiq.errors import ConnectionClosed

from ...durations import format_ms
from ...masking import mask_url
from ...queues import BANDS
from ..hooks import HookDispatch
from .confirms import ConfirmWindow
from .connection import connection_parameters
from .consumer import RabbitmqConsumer
from .ends import close_end_writer
from .held import RabbitmqHeldStore
from .stats import RabbitmqStatsReader

if TYPE_CHECKING:
    from ...config import BrokerSettings
    from .admin import RabbitmqQueueAdmin

__all__ = ["RabbitmqBroker", "create_broker"]

logger = logging.getLogger("dramaturg.rabbitmq")


class RabbitmqBroker(HookDispatch, _DramatiqRabbitmqBroker):
    """Dramatiq's RabbitMQ broker, built from :class:`BrokerSettings`.

    Connections are opened lazily, one per thread, as in Dramatiq.
    """

    #: Its consumers have the ends of batch members written before the acknowledgements
    #: they send, many in one call, by a thread of the process (see :mod:`.ends`).
    acks_write_batch_ends = True

    def __init__(self, settings: BrokerSettings, *, middleware: list[Middleware]) -> None:
        parameters = connection_parameters(settings)  # a clear error for a bad URL, before pika's
        super().__init__(
            middleware=middleware,
            confirm_delivery=settings.confirm_delivery,
            max_priority=len(BANDS) - 1 if settings.priorities else None,
        )
        self.parameters = parameters
        self.settings = settings
        self.held = RabbitmqHeldStore(self, settings)
        self._warned: set[str] = set()  # actors already warned about a delay past consumer_timeout
        self._windows = threading.local()  # bulk sends: a confirm window per thread
        self._windows_lock = threading.Lock()
        self._all_windows: list[ConfirmWindow] = []

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
        return RabbitmqStatsReader(self, self.settings)

    @functools.cached_property
    def queue_admin(self) -> RabbitmqQueueAdmin:
        """Queue administration (see :mod:`dramaturg.queue_admin`)."""
        from .admin import RabbitmqQueueAdmin

        return RabbitmqQueueAdmin(self)

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
                format_ms(delay),
                format_ms(self.settings.consumer_timeout),
            )
        consumer = getattr(threading.current_thread(), "consumer", None)
        if isinstance(consumer, RabbitmqConsumer) and consumer.gone and consumer.queue_name.endswith(".DQ"):
            # Dramatiq's consumer thread moves a due delayed message to its queue, and goes on
            # moving the others after an acknowledgement failed with the connection. Their
            # channel is gone: RabbitMQ delivers them again, to be moved (and run) once more.
            raise ConnectionClosed(
                f"the channel of {consumer.queue_name!r} is lost: delayed message {message.message_id} is not"
                " moved; RabbitMQ delivers it again"
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
        from ...bulk import BulkSendError, EnqueueHooks, message_encoder

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

    def _confirm_window(self) -> ConfirmWindow:
        """This thread's confirm window, opened on first use and kept while it is open."""
        window: ConfirmWindow | None = getattr(self._windows, "window", None)
        if window is None or not window.connection.is_open:
            window = self._windows.window = ConfirmWindow(self.parameters, self.settings.connect_timeout)
            with self._windows_lock:
                self._all_windows.append(window)
        return window

    def close(self) -> None:
        with self._windows_lock:
            windows, self._all_windows = self._all_windows, []
        for window in windows:
            window.close()
        self.held.close()
        close_end_writer(self)
        super().close()

    def __repr__(self) -> str:
        return f"<RabbitmqBroker {mask_url(self.settings.url)}>"


def create_broker(settings: BrokerSettings, middleware: list[Middleware]) -> RabbitmqBroker:
    return RabbitmqBroker(settings, middleware=middleware)
