"""Held tasks in RabbitMQ: :class:`RabbitmqHeldStore`, a durable ``<queue>.HQ`` per queue."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions
from dramatiq import Message
from dramatiq.brokers.rabbitmq import RabbitmqBroker as _DramatiqRabbitmqBroker
from dramatiq.common import current_millis, dq_name

from ...errors import BrokerUnreachable, SendError
from ...held import HeldStore, HeldTask, KickError
from ...queues import canonical_queue
from .connection import error_text, unreachable

if TYPE_CHECKING:
    from ...config import BrokerSettings

__all__ = ["MAX_QUEUE_BYTES", "RabbitmqHeldStore", "held_queue"]


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

    ``broker`` is any Dramatiq RabbitmqBroker (its ``parameters`` are used); ``settings``
    are its settings (the URL an error names).
    """

    def __init__(self, broker: _DramatiqRabbitmqBroker, settings: BrokerSettings) -> None:
        super().__init__(broker)
        self.broker: _DramatiqRabbitmqBroker = broker
        self.settings = settings
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
        return unreachable(self.settings, f"{error_text(error)} (while {what})")

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
            raise KickError(f"RabbitMQ has no queue to requeue them to ({error_text(error)})") from None
        except pika.exceptions.AMQPError as error:
            why = (
                f"not requeued by this kick: its channel to RabbitMQ was lost ({error_text(error)}), so RabbitMQ"
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
