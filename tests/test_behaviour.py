"""The behaviour suite: the same application code on RabbitMQ, Redis and embedded.

Every test here runs once per real broker (see ``broker_kind`` in conftest.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import dramatiq

import dramaturg

from .conftest import pending_messages

WAIT_S = 20


def test_a_sent_message_is_processed_and_acked(broker: dramatiq.Broker, start_worker: Callable[..., object]) -> None:
    # Given an actor declared as application code declares it
    received: list[tuple[int, str]] = []
    done = threading.Event()

    @dramaturg.actor(queue_name="behaviour")
    def record(number: int, word: str) -> None:
        received.append((number, word))
        done.set()

    # When a message is sent and a worker runs
    message = record.send(7, word="seven")
    worker = start_worker()

    # Then the handler ran with the sent arguments, once
    assert done.wait(WAIT_S), "the worker never ran the handler"
    worker.join()
    worker.stop()
    assert received == [(7, "seven")]
    # and the broker holds nothing more for the queue: the message was acked
    assert pending_messages(broker, "behaviour") == 0
    assert message.queue_name == "behaviour"


def test_many_messages_are_each_processed_once(broker: dramatiq.Broker, start_worker: Callable[..., object]) -> None:
    # Given 200 messages sent before any worker runs
    seen: list[int] = []
    lock = threading.Lock()
    done = threading.Event()
    total = 200

    @dramaturg.actor(queue_name="burst")
    def count(number: int) -> None:
        with lock:
            seen.append(number)
            if len(seen) == total:
                done.set()

    for number in range(total):
        count.send(number)

    # When a worker with several threads drains them
    worker = start_worker(threads=8)

    # Then each ran exactly once and nothing is left on the broker
    assert done.wait(WAIT_S), f"only {len(seen)} of {total} were processed"
    worker.join()
    worker.stop()
    assert sorted(seen) == list(range(total))
    assert pending_messages(broker, "burst") == 0


def test_an_async_actor_runs_on_the_worker(broker: dramatiq.Broker, start_worker: Callable[..., object]) -> None:
    # Given an async def handler
    done = threading.Event()
    results: list[str] = []

    @dramaturg.actor(queue_name="async_q")
    async def greet(name: str) -> None:
        results.append(f"hello {name}")
        done.set()

    # When it is sent and a worker runs
    greet.send("ada")
    start_worker()

    # Then it ran on the worker's event loop
    assert done.wait(WAIT_S)
    assert results == ["hello ada"]


def test_a_delayed_message_waits_for_its_delay(broker: dramatiq.Broker, start_worker: Callable[..., object]) -> None:
    # Given a worker already running and an actor that notes when it ran
    ran_at: list[int] = []
    done = threading.Event()

    @dramaturg.actor(queue_name="later")
    def note() -> None:
        ran_at.append(dramatiq.common.current_millis())
        done.set()

    start_worker()

    # When a message is sent with a 1.5 s delay
    sent_at = dramatiq.common.current_millis()
    note.send_with_options(delay=1_500)

    # Then it runs, and not before the delay passed
    assert done.wait(WAIT_S)
    assert ran_at[0] - sent_at >= 1_500


def test_actors_declared_before_bootstrap_are_bound_to_its_broker(settings: dramaturg.Settings) -> None:
    # Given an actor declared before any broker exists
    @dramaturg.actor(queue_name="early")
    def early() -> None: ...

    # When the application bootstraps
    broker = dramaturg.bootstrap(settings)

    # Then the actor belongs to that broker, which is also Dramatiq's global broker
    assert early.broker is broker
    assert broker.get_actor("early") is early
    assert dramatiq.get_broker() is broker
    assert "early" in broker.get_declared_queues()
