"""The held-task store on every broker: list, get, kick, purge; poison messages; nothing lost."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg.held import HeldTask

from .conftest import WAIT_S, held_task, pending_messages, poll_until, raw_publish


def test_listing_is_paged_oldest_first_and_removes_nothing(
    broker: dramatiq.Broker, import_user: dramaturg.Actor[..., None]
) -> None:
    store = dramaturg.held_tasks()
    tasks = [held_task("imports", n) for n in range(7)]
    for task in tasks:
        store.hold(task)

    first = store.list("imports", limit=3)
    second = store.list("imports", offset=3, limit=3)
    third = store.list("imports", offset=6, limit=3)

    assert [t.message_id for t in first + second + third] == [t.message_id for t in tasks]
    assert store.count("imports") == 7
    assert store.list(limit=2) == first[:2]  # every queue
    assert store.get(tasks[4].message_id) == tasks[4]
    assert store.get("no-such-id") is None
    assert store.count() == 7


def test_purge_one_several_or_all(broker: dramatiq.Broker, import_user: dramaturg.Actor[..., None]) -> None:
    store = dramaturg.held_tasks()
    tasks = [held_task("imports", n) for n in range(5)]
    for task in tasks:
        store.hold(task)

    assert store.purge("imports", [tasks[0].message_id]) == 1
    assert store.purge("imports", [tasks[1].message_id, tasks[2].message_id, "unknown"]) == 2
    assert [t.message_id for t in store.list("imports")] == [tasks[3].message_id, tasks[4].message_id]
    assert store.purge("imports") == 2
    assert store.count("imports") == 0


def test_kick_requeues_with_a_fresh_budget_and_counts_kicks(
    broker: dramatiq.Broker,
    import_user: dramaturg.Actor[..., None],
    start_worker: Callable[..., dramatiq.Worker],
) -> None:
    store = dramaturg.held_tasks()
    tasks = [held_task("imports", n) for n in range(4)]
    for task in tasks:
        store.hold(task)

    # One by id, then the rest of the queue
    assert store.kick("imports", [tasks[0].message_id]) == 1
    assert store.count("imports") == 3
    assert store.kick("imports") == 3
    assert store.count("imports") == 0
    assert pending_messages(broker, "imports") == 4

    worker = start_worker()
    ran = import_user.ran.wait(4)  # type: ignore[attr-defined]
    worker.join()
    assert sorted(ran) == [0, 1, 2, 3]


def test_kick_with_a_delay(broker: dramatiq.Broker, import_user: dramaturg.Actor[..., None]) -> None:
    store = dramaturg.held_tasks()
    store.hold(held_task("imports", 1))

    assert store.kick("imports", delay_ms=60_000) == 1

    assert pending_messages(broker, "imports") == 1  # waiting on the delay queue


def test_an_undecodable_message_is_held_and_the_worker_goes_on(
    broker: dramatiq.Broker,
    import_user: dramaturg.Actor[..., None],
    start_worker: Callable[..., dramatiq.Worker],
) -> None:
    # Given a body that is not a message, put straight onto the queue by another client
    # (in the band of the default priority: one without a priority is RabbitMQ's lowest,
    # and a good message sent after it would be delivered before it)
    raw_publish(broker, "imports", b"\x80not json at all", priority=0)
    # and a good message behind it
    import_user.send({"id": 1})

    worker = start_worker()

    # Then the good one runs (the consumer holds the bad one before it hands out the
    # next), and the bad one is held with a reason that says why
    assert import_user.ran.wait(1) == [1]  # type: ignore[attr-defined]
    worker.join()
    assert dramaturg.held_tasks().count("imports") == 1
    [held] = dramaturg.held_tasks().list("imports")
    assert held.reason.startswith("undecodable message: ")
    assert held.raw is not None and "not json at all" in held.raw
    worker.stop()
    assert pending_messages(broker, "imports") == 0


def test_arguments_that_do_not_fit_are_held_with_the_signature(
    broker: dramatiq.Broker,
    import_user: dramaturg.Actor[..., None],
    start_worker: Callable[..., dramatiq.Worker],
) -> None:
    message = dramatiq.Message(queue_name="imports", actor_name="import_user", args=(), kwargs={"rows": []}, options={})
    raw_publish(broker, "imports", message.encode())
    import_user.send({"id": 3})

    worker = start_worker()

    # the good message behind it ran; join waits until the misfit's outcome is settled too
    assert import_user.ran.wait(1) == [3]  # type: ignore[attr-defined]
    worker.join()
    held = dramaturg.held_tasks().get(message.message_id, "imports")
    assert held is not None
    assert held.reason == (
        "arguments do not fit import_user(row: 'dict[str, Any]'): missing a required argument: 'row'"
    )


@pytest.mark.parametrize("fails", ["retry publish", "held store write", "settling itself"])
def test_a_failed_durable_write_never_acks_the_message(
    fails: str,
    broker: dramatiq.Broker,
    start_worker: Callable[..., dramatiq.Worker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given the write that should make the outcome durable fails every time
    ran = threading.Event()

    @dramaturg.actor(queue_name="fragile", max_retries=1 if fails == "retry publish" else 0)
    def fragile() -> None:
        ran.set()
        raise RuntimeError("the mail server is down")

    message = fragile.send()
    if fails == "retry publish":
        # The Redis brokers publish a copy through enqueue_copy (once, however often it is tried).
        publish = "enqueue_copy" if hasattr(broker, "enqueue_copy") else "enqueue"
        original = getattr(broker, publish)

        def enqueue(msg: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
            if msg.options.get("retries"):
                raise ConnectionError("the broker refused the retry")
            return original(msg, delay=delay)

        monkeypatch.setattr(broker, publish, enqueue)
    elif fails == "settling itself":

        def settle(*args: Any) -> None:
            raise AttributeError("a bug in settling")

        monkeypatch.setattr("dramaturg.middleware.outcomes.Outcomes.settle", settle)
    else:

        def hold(task: HeldTask) -> None:
            raise ConnectionError("the held store is unreachable")

        monkeypatch.setattr(broker.held, "hold", hold)  # type: ignore[attr-defined]
    monkeypatch.setattr("dramaturg.held._WRITE_PAUSES_S", (0.0, 0.0))

    worker = start_worker()
    assert ran.wait(WAIT_S)
    worker.join()
    worker.stop()

    # Then the message was not acknowledged: it waits in the broker's dead-letter queue
    assert dead_letters(broker, "fragile") == [message.message_id]
    assert dramaturg.held_tasks().count("fragile") == 0


def test_a_transient_write_failure_is_retried(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = threading.Event()

    @dramaturg.actor(queue_name="fragile")
    def parked() -> None:
        ran.set()
        dramaturg.current_task().hold("wait for a human")

    message = parked.send()
    store = broker.held  # type: ignore[attr-defined]
    real_hold, calls = store.hold, []

    def hold_once_failing(task: HeldTask) -> None:
        calls.append(task.message_id)
        if len(calls) == 1:
            raise ConnectionError("blip")
        real_hold(task)

    monkeypatch.setattr(store, "hold", hold_once_failing)
    monkeypatch.setattr("dramaturg.held._WRITE_PAUSES_S", (0.0, 0.0))

    worker = start_worker()
    assert ran.wait(WAIT_S)
    worker.join()

    assert calls == [message.message_id, message.message_id]
    assert dramaturg.held_tasks().get(message.message_id, "fragile") is not None
    assert dead_letters(broker, "fragile") == []


# -- raw access to the brokers, as another client would have -----------------------------


def dead_letters(broker: Any, queue: str) -> list[str]:
    """Message ids in Dramatiq's dead-letter queue for ``queue``."""
    if broker.settings.type == "rabbitmq":
        import pika

        connection = pika.BlockingConnection(broker.parameters)
        try:
            channel = connection.channel()
            ids = []
            while True:
                method, _, body = channel.basic_get(f"{queue}.XQ", auto_ack=False)
                if method is None:
                    return ids
                ids.append(json.loads(body)["message_id"])
        finally:
            connection.close()
    bodies = broker.client.hvals(f"{broker.namespace}:{queue}.XQ.msgs")
    return [json.loads(body)["message_id"] for body in bodies]


def test_flushing_the_queues_never_touches_held_tasks(
    broker: dramatiq.Broker, import_user: dramaturg.Actor[..., None]
) -> None:
    # Given a held task and a message waiting on the same queue
    store = dramaturg.held_tasks()
    task = held_task("imports", 1)
    store.hold(task)
    import_user.send({"id": 2})

    # When Dramatiq's flush empties the queues (as `flush_all` in a deploy script would)
    broker.flush_all()

    # Then the waiting message is gone, and the held task is not
    assert pending_messages(broker, "imports") == 0
    assert store.get(task.message_id, "imports") == task


# -- secrets ------------------------------------------------------------------------------

SECRET = "s3cr3t-Pa55"


def test_a_password_in_an_error_is_masked_in_the_held_task_and_its_store(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given a task whose error names a database URL with its password, held at once
    ran = threading.Event()

    @dramaturg.actor(queue_name="orders", hold_on=(ConnectionError,))
    def place_order() -> None:
        ran.set()
        raise ConnectionError(f"cannot reach postgresql://app:{SECRET}@db/shop")

    message = place_order.send()
    worker = start_worker()
    assert ran.wait(WAIT_S)
    worker.join()

    # Then what the held task says is masked, as in the logs
    held = dramaturg.held_tasks().get(message.message_id, "orders")
    assert held is not None
    assert held.exception_message == "cannot reach postgresql://app:***@db/shop"
    assert held.traceback is not None and "postgresql://app:***@db/shop" in held.traceback
    assert SECRET not in json.dumps(held.__dict__)
    # and the store never had it in clear
    assert SECRET not in stored_held_entries(broker, "orders")


def test_a_password_in_a_poison_message_is_masked(
    broker: dramatiq.Broker,
    import_user: dramaturg.Actor[..., None],
    start_worker: Callable[..., dramatiq.Worker],
) -> None:
    # Given an undecodable body that holds a URL with its password, from a producer that
    # sets no priority (on RabbitMQ the lowest: the good message sent after it comes first)
    raw_publish(broker, "imports", b"\x80 redis://:" + SECRET.encode() + b"@cache:6379/0", priority=None)
    import_user.send({"id": 1})

    start_worker()
    assert import_user.ran.wait(1) == [1]  # type: ignore[attr-defined]

    # (join() would not do: on RabbitMQ it counts ready messages, and the poison one may
    # still be unacknowledged in the worker, on its way to the held store)
    [held] = poll_until(lambda: dramaturg.held_tasks().list("imports"), "the poison message held", WAIT_S)
    assert held.raw is not None and "redis://:***@cache:6379/0" in held.raw
    assert SECRET not in stored_held_entries(broker, "imports")


def test_a_task_stored_in_clear_by_an_older_version_is_read_masked(
    broker: dramatiq.Broker, import_user: dramaturg.Actor[..., None]
) -> None:
    store = dramaturg.held_tasks()
    task = held_task("imports", 1)
    clear = json.loads(task.to_json()) | {"reason": f"amqp://shop:{SECRET}@mq/ refused"}
    from .test_held_faults import put_held_entry

    put_held_entry(broker, "imports", task.message_id, json.dumps(clear).encode())

    got = store.get(task.message_id, "imports")
    assert got is not None and got.reason == "amqp://shop:***@mq/ refused"


def stored_held_entries(broker: Any, queue: str) -> str:
    """Everything the held store keeps for ``queue``, as stored, read as another client would."""
    if broker.settings.type == "rabbitmq":
        import pika

        connection = pika.BlockingConnection(broker.parameters)
        try:
            channel = connection.channel()
            bodies = []
            while True:
                method, _, body = channel.basic_get(f"{queue}.HQ", auto_ack=False)
                if method is None:
                    return b"\n".join(bodies).decode(errors="replace")
                bodies.append(body)
        finally:
            connection.close()
    values = broker.client.hvals(f"{broker.namespace}:__held__:{queue}")
    return b"\n".join(values).decode(errors="replace")
