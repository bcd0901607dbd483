"""Queue administration on RabbitMQ (see :mod:`dramaturg.queue_admin`), over AMQP.

For a queue ``q``, dramaturg and Dramatiq declare ``q`` (its priority bands are RabbitMQ
priorities of the one queue), ``q.DQ`` (delayed), ``q.XQ`` (dead letters) and ``q.HQ``
(the held store).

- peek: AMQP has no "read without taking". Peek takes up to N messages with
  ``basic.get`` on a channel of its own and gives them all back with one
  ``basic.nack(multiple, requeue)``. RabbitMQ puts each back in its place, but flags it
  *redelivered* (a worker that runs it later logs that it "was delivered again"), and
  workers cannot take those N messages for the few milliseconds in between. The
  management API's "get messages" (``ackmode=reject_requeue_true``) does exactly this
  too, so it is not used.
- purge: ``basic.get`` until the queue is empty (at most the count it had when the purge
  began, so a sender cannot keep it going forever), 500 at a time: the bodies are given
  to the status records first, then acknowledged. A step whose records cannot be written
  (the state store stopped answering) is given back (``basic.nack``, requeue) and the
  purge stops. A purge that dies half-way (or whose acknowledgement is lost with its
  connection) leaves the unacknowledged rest in the queue, flagged redelivered; a worker
  that takes one whose record says purged drops it without running it (see
  :class:`~dramaturg.status.recorder.StatusRecorder`). ``queue.purge`` would be one call, but cannot
  say which tasks it dropped. Unacknowledged messages (running, or delayed ones a worker
  keeps until due) are not visible to ``basic.get``: they stay.
- usage: the consumers of ``q`` and ``q.DQ`` and the messages of ``q.HQ``, by a passive
  ``queue.declare`` (now, not the management API's lagging numbers); running tasks are
  held by those consumers, so "running" is 0 when there are none.
- delete: ``queue.delete`` of the four queues.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions

from ...errors import BrokerUnreachable
from ...masking import mask_url
from ...queue_admin import OnPurged, QueueAdmin, purge_stopped
from .connection import error_text, quiet_pika, unreachable
from .held import held_queue

if TYPE_CHECKING:
    from pika.adapters.blocking_connection import BlockingChannel

    from .broker import RabbitmqBroker

__all__ = ["RabbitmqQueueAdmin"]

#: Messages a purge takes before it records and acknowledges them.
PURGE_CHUNK = 500


class RabbitmqQueueAdmin(QueueAdmin):
    """Queue administration of a dramaturg RabbitMQ broker (see the module docstring)."""

    def __init__(self, broker: RabbitmqBroker) -> None:
        super().__init__(broker)
        self.settings = broker.settings
        self.parameters = broker.parameters

    @contextmanager
    def _connection(self) -> Iterator[pika.BlockingConnection]:
        try:
            with quiet_pika():
                connection = pika.BlockingConnection(self.parameters)
        except pika.exceptions.ProbableAuthenticationError:
            raise unreachable(self.settings, "authentication failed (check the user and password)") from None
        except (pika.exceptions.AMQPError, OSError) as error:
            raise unreachable(self.settings, error_text(error)) from None
        try:
            yield connection
        except (pika.exceptions.AMQPError, OSError) as error:
            raise BrokerUnreachable(f"lost RabbitMQ at {mask_url(self.settings.url)}: {error_text(error)}") from None
        finally:
            if connection.is_open:
                connection.close()

    @staticmethod
    def _declared(connection: pika.BlockingConnection, name: str) -> tuple[int, int] | None:
        """``(messages ready, consumers)`` of ``name``, or None when there is no such queue."""
        channel = connection.channel()
        try:
            with quiet_pika():  # pika logs a WARNING for the 404 this answers with
                method = channel.queue_declare(name, passive=True).method
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code != 404:
                raise
            return None
        channel.close()
        return int(method.message_count), int(method.consumer_count)

    def exists(self, queue: str) -> bool:
        with self._connection() as connection:
            return self._declared(connection, queue) is not None

    def peek(self, queue: str, limit: int) -> list[bytes]:
        bodies: list[bytes] = []
        with self._connection() as connection:
            for name in (queue, f"{queue}.DQ"):
                if len(bodies) >= limit or self._declared(connection, name) is None:
                    continue
                channel = connection.channel()
                last_tag = None
                while len(bodies) < limit:
                    method, _, body = channel.basic_get(name, auto_ack=False)
                    if method is None:
                        break
                    last_tag = method.delivery_tag
                    bodies.append(body)
                if last_tag is not None:
                    channel.basic_nack(delivery_tag=last_tag, multiple=True, requeue=True)
                channel.close()
        return bodies

    def purge(self, queue: str, *, delayed: bool, on_purged: OnPurged) -> int:
        purged = 0
        with self._connection() as connection:
            for name in (queue, f"{queue}.DQ") if delayed else (queue,):
                declared = self._declared(connection, name)
                if declared is None:
                    continue
                channel = connection.channel()
                purged += self._drain(channel, name, declared[0], on_purged, purged)
                channel.close()
        return purged

    @staticmethod
    def _drain(channel: BlockingChannel, name: str, at_most: int, on_purged: OnPurged, before: int) -> int:
        taken = 0
        while taken < at_most:
            bodies: list[bytes] = []
            last_tag: Any = None
            while len(bodies) < min(PURGE_CHUNK, at_most - taken):
                method, _, body = channel.basic_get(name, auto_ack=False)
                if method is None:
                    break
                last_tag = method.delivery_tag
                bodies.append(body)
            if not bodies:
                break
            try:
                on_purged(bodies)
            except Exception as error:  # their records were not written: back they go
                # If the connection is gone, RabbitMQ requeues what was not acknowledged anyway.
                with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                    channel.basic_nack(delivery_tag=last_tag, multiple=True, requeue=True)
                raise purge_stopped(error, before + taken, len(bodies)) from None
            channel.basic_ack(delivery_tag=last_tag, multiple=True)
            taken += len(bodies)
        return taken

    def usage(self, queue: str) -> tuple[int, int, int]:
        with self._connection() as connection:
            counts = {name: self._declared(connection, name) or (0, 0) for name in (queue, f"{queue}.DQ")}
            held = self._declared(connection, held_queue(queue)) or (0, 0)
        workers = max(counts[queue][1], counts[f"{queue}.DQ"][1])
        return workers, 0, held[0]

    def parts(self, queue: str) -> list[str]:
        with self._connection() as connection:
            names = (queue, f"{queue}.DQ", f"{queue}.XQ", held_queue(queue))
            return [name for name in names if self._declared(connection, name) is not None]

    def remove(self, queue: str) -> None:
        with self._connection() as connection:
            channel = connection.channel()
            for name in (queue, f"{queue}.DQ", f"{queue}.XQ", held_queue(queue)):
                channel.queue_delete(name)  # none: nothing to do
            channel.close()
