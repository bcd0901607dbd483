"""send_many: many tasks in chunks, each one a full message; failures say what was not sent.
On RabbitMQ, Redis and embedded."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg.bulk import BulkSendError, Call

from .conftest import pending_messages
from .test_outcomes import Runs


def test_send_many_sends_each_item_as_its_own_task(broker: dramatiq.Broker, start_worker: Callable[..., Any]) -> None:
    # Given 2,500 rows, sent in chunks of 1,000 from the French store, urgently
    seen: list[tuple[int, str, str]] = []
    lock = threading.Lock()
    all_done = threading.Event()

    @dramaturg.actor(queue_name="bulk")
    def import_user(row: dict[str, Any]) -> None:
        task = dramaturg.current_task()
        with lock:
            seen.append((row["id"], task.context["store"], task.message_id))
            if len(seen) == 2_500:
                all_done.set()

    rows = ({"id": n, "email": f"user{n}@example.com"} for n in range(2_500))  # a generator: streamed
    with dramaturg.context(store="fr"):
        result = import_user.send_many(rows, chunk_size=1_000, priority=0)

    # When a worker runs them
    assert result.sent == 2_500 and result.rate > 0
    worker = start_worker(threads=8)
    assert all_done.wait(60)
    worker.join()

    # Then each row ran once, in its own message, with the sender's context
    assert sorted(n for n, _, _ in seen) == list(range(2_500))
    assert {store for _, store, _ in seen} == {"fr"}
    assert len({message_id for _, _, message_id in seen}) == 2_500
    assert pending_messages(broker, "bulk") == 0


def test_items_can_be_argument_tuples_or_calls_and_options_apply(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="bulk")
    def notify(user_id: int, kind: str = "welcome") -> None:
        runs.record(user=user_id, kind=kind)

    notify.send_many([(1, "reset"), Call(2, kind="digest"), 3])
    result = notify.send_many([4, 5], delay=60_000)  # delayed: waiting, not run now
    assert result.sent == 2
    assert pending_messages(broker, "bulk") == 5

    start_worker()
    seen = runs.wait(3)  # (not worker.join(): that would wait out the delayed ones)
    assert sorted((run["user"], run["kind"]) for run in seen) == [(1, "reset"), (2, "digest"), (3, "welcome")]


def test_a_failing_chunk_is_reported_with_what_was_not_sent(
    broker: dramatiq.Broker, broker_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a connection that fails during the third chunk
    @dramaturg.actor(queue_name="bulk")
    def import_user(n: int) -> None: ...

    if broker_kind == "rabbitmq":
        import pika.exceptions

        from dramaturg.brokers import rabbitmq

        publish = rabbitmq._ConfirmWindow.publish
        published = [0]

        def failing_publish(self: Any, queue_name: str, message: Any, body: bytes) -> None:
            published[0] += 1
            if published[0] == 2_500:
                raise pika.exceptions.StreamLostError("connection lost")
            publish(self, queue_name, message, body)

        monkeypatch.setattr(rabbitmq._ConfirmWindow, "publish", failing_publish)
    else:
        import redis

        enqueue = broker._enqueue_script  # type: ignore[attr-defined]
        calls = [0]

        def failing_enqueue(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 3:
                raise redis.ConnectionError("connection lost")
            return enqueue(*args, **kwargs)

        monkeypatch.setattr(broker, "_enqueue_script", failing_enqueue)

    # When 5,000 are sent in chunks of 1,000
    with pytest.raises(BulkSendError) as raised:
        import_user.send_many(range(5_000), chunk_size=1_000)

    # Then the error says: two chunks sent, the third's messages not (with their ids),
    # nothing after it attempted
    error = raised.value
    assert error.sent == 2_000
    assert len(error.unsent) == 1_000 and error.next_item == 3_000
    assert [m.args for m in error.unsent] == [(n,) for n in range(2_000, 3_000)]
    assert "connection lost" in str(error) and error.unsent[0].message_id in str(error)
    monkeypatch.undo()
    if broker_kind != "rabbitmq":
        assert pending_messages(broker, "bulk") == 2_000  # the failing chunk was all or nothing


def test_bulk_ids_are_uuid4s_and_a_forked_sender_does_not_repeat_its_parents() -> None:
    import os
    import uuid

    from dramaturg.bulk import new_ids

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.write(write, " ".join(new_ids(100)).encode())
        os._exit(0)
    os.close(write)
    parent = new_ids(100)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    assert status == 0 and len(child) == 100
    assert not set(parent) & set(child)
    assert all(uuid.UUID(i).version == 4 and uuid.UUID(i).variant == uuid.RFC_4122 for i in parent + child)
    assert all(str(uuid.UUID(i)) == i for i in parent)
