"""Publishing many messages at once with their confirms: :class:`ConfirmWindow`.

Used by :meth:`dramaturg.brokers.rabbitmq.RabbitmqBroker.enqueue_many`, one window per thread.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from dramatiq import Message

__all__ = ["BatchOutcome", "ConfirmWindow"]


class ConfirmWindow:
    """A connection of its own whose publishes are confirmed as a batch.

    pika writes each frame with a system call of its own (three per message); while a
    window is being published its frames are gathered and written ``FRAMES_PER_WRITE``
    at a time instead (a third of the time went to ``send``). Outside a window, frames
    (heartbeats, closing) go out as pika writes them.
    """

    #: Frames gathered before they are written: ~85 messages.
    FRAMES_PER_WRITE = 256

    def __init__(self, parameters: Any, connect_timeout_ms: int) -> None:
        """Connect with pika's ``parameters``; wait up to ``connect_timeout_ms`` (at least
        30 s) for RabbitMQ to turn confirms on."""
        self.connection = pika.BlockingConnection(parameters)
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
        deadline = time.monotonic() + max(30.0, connect_timeout_ms / 1000)
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

    def end(self) -> BatchOutcome:
        """What became of the batch since :meth:`begin`; what has no confirm yet is unconfirmed."""
        outcome = BatchOutcome(
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
class BatchOutcome:
    """A confirm window's batch: how many were published, and which were confirmed,
    refused (nacked or returned), or are still unconfirmed."""

    published: int
    confirmed: list[Message[Any]]
    refused: list[Message[Any]]
    unconfirmed: list[Message[Any]]
    reasons: list[str]
