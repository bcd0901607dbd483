"""RabbitMQ: the acknowledgements of a worker's threads reach RabbitMQ, together.

Worker threads hand their acknowledgements to the consumer's thread (pika's connection
is not thread-safe); those that pile up go in one wake-up and one write. Whatever the
grouping, each finished task must be acknowledged before the worker's channel closes:
one that is not would be delivered again, and run twice.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest

import dramaturg

from .conftest import pending_messages, poll_until

pytestmark = pytest.mark.parametrize("broker_kind", ["rabbitmq"])


def test_every_task_a_worker_finished_is_acknowledged_before_it_stops(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given 500 short tasks drained by 8 threads, and a worker stopped as soon as the last ended
    ran: Counter[int] = Counter()
    lock = threading.Lock()

    @dramaturg.actor(queue_name="acks")
    def task(n: int) -> None:
        with lock:
            ran[n] += 1

    for n in range(500):
        task.send(n)
    worker = start_worker(threads=8)
    poll_until(lambda: sum(ran.values()) >= 500, "the 500 tasks ran")
    worker.stop()

    # Then RabbitMQ holds none of them (an unacknowledged one is ready again once its channel is gone)
    assert pending_messages(broker, "acks") == 0

    # and a worker started afterwards runs none again
    again = start_worker(threads=2)
    again.join()
    assert set(ran) == set(range(500))
    assert max(ran.values()) == 1, {n: c for n, c in ran.items() if c > 1}


def test_acknowledgements_that_pile_up_are_sent_in_one_wake_up(broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given 8 deliveries taken by a consumer in this thread (its owner), which is not polling
    @dramaturg.actor(queue_name="acks")
    def task(n: int) -> None:
        pass

    for n in range(8):
        task.send(n)
    consumer = broker.consume("acks", prefetch=8, timeout=100)
    deliveries: list[Any] = []
    poll_until(
        lambda: (message := next(consumer)) is None or deliveries.append(message) or len(deliveries) == 8,
        "8 deliveries",
    )
    wake_ups: list[Any] = []
    add = consumer.connection.add_callback_threadsafe

    def counted(callback: Any) -> None:
        wake_ups.append(callback)
        add(callback)

    monkeypatch.setattr(consumer.connection, "add_callback_threadsafe", counted)

    # When 8 worker threads acknowledge them meanwhile
    threads = [threading.Thread(target=consumer.ack, args=(message,)) for message in deliveries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    # Then the consumer's thread is woken once for all 8
    assert len(wake_ups) == 1
    # and they are sent before its channel closes, though it did not poll meanwhile
    consumer.close()
    assert pending_messages(broker, "acks") == 0


def test_a_delayed_message_moved_before_the_connection_was_lost_is_not_moved_twice(
    broker: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a delayed message this thread's consumer moved to its queue when due, whose
    # acknowledgement RabbitMQ never read (written just as the connection was lost)
    @dramaturg.actor(queue_name="moves")
    def task(n: int) -> None:
        pass

    sent = task.send_with_options(args=(1,), delay=10)
    first = broker.consume("moves.DQ", prefetch=8, timeout=100)
    delivery = poll_until(lambda: next(first), "the delayed message")
    moved = delivery._message.copy(queue_name="moves")
    del moved.options["eta"]
    broker.enqueue(moved)  # as Dramatiq's consumer thread moves it
    monkeypatch.setattr(first.channel, "basic_ack", lambda *args, **kwargs: None)
    first.ack(delivery)
    first.close()  # RabbitMQ delivers it again, flagged as redelivered
    monkeypatch.setattr(threading.current_thread(), "consumer", first, raising=False)

    # When this worker's next consumer of the delay queue starts
    caplog.set_level("INFO", logger="dramaturg.rabbitmq")
    second = broker.consume("moves.DQ", prefetch=8, timeout=100)
    try:
        # Then it names the messages moved just before the loss, as ones that may run again
        assert any(sent.message_id in r.message and "run again" in r.message for r in caplog.records)

        # and it acknowledges the one it gets again instead of handing it on to be moved twice
        def skipped() -> bool:
            assert next(second) is None
            return any(sent.message_id in r.message and "not moved twice" in r.message for r in caplog.records)

        poll_until(skipped, "the delivery acknowledged")
        second.close()
        assert pending_messages(broker, "moves") == 1  # the moved copy; none left to move
    finally:
        second.close()


def test_a_delayed_message_is_not_moved_once_its_channel_is_lost(broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a due delayed message, taken by this thread's consumer of the delay queue,
    # whose channel is then lost (Dramatiq's thread goes on moving the due ones after an
    # acknowledgement failed with the connection)
    @dramaturg.actor(queue_name="moves")
    def task(n: int) -> None:
        pass

    task.send_with_options(args=(1,), delay=10)
    consumer = broker.consume("moves.DQ", prefetch=8, timeout=100)
    delivery = poll_until(lambda: next(consumer), "the delayed message")
    consumer.close()  # RabbitMQ has it back
    monkeypatch.setattr(threading.current_thread(), "consumer", consumer, raising=False)
    moved = delivery._message.copy(queue_name="moves")
    del moved.options["eta"]

    # When the thread moves it
    # Then the move is refused, and only RabbitMQ's copy on the delay queue is left
    with pytest.raises(dramatiq.errors.ConnectionClosed):
        broker.enqueue(moved)
    assert pending_messages(broker, "moves") == 1
