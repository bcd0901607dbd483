"""Unique tasks: a duplicate send returns the task queued or running for the key (or raises),
and the key is released when the task starts or ends, whatever the end; on RabbitMQ (with a
Redis state store), Redis, embedded, and eager."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import dramaturg

from .conftest import Runs, poll_until, settings_with_state

MODES = ("rabbitmq", "redis", "embedded", "eager")
REAL_BROKERS = ["rabbitmq", "redis", "embedded"]


@pytest.fixture(params=MODES)
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dramaturg.Settings:
    return settings_with_state(broker_kind, request, tmp_path)


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_a_duplicate_send_returns_the_queued_task_and_it_runs_once(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given a unique actor, until finished, and no worker yet
    ran = Runs()

    @dramaturg.actor(queue_name="flow", unique=dramaturg.unique(key="reindex:{0}"))
    def reindex(product_id: int) -> None:
        ran.add(product_id)

    # When product 42 is sent five times, and 43 once
    first = reindex.send(42)
    duplicates = [reindex.send(42) for _ in range(4)]
    other = reindex.send(43)

    # Then the duplicates are the first task, and say so
    assert {d.message_id for d in duplicates} == {first.message_id}
    assert all(d.options["dramaturg_duplicate"] for d in duplicates)
    assert "dramaturg_duplicate" not in first.options and other.message_id != first.message_id

    # and each product runs once; then the key is free again
    start_worker()
    assert sorted(ran.wait(2)) == [42, 43]
    again = poll_until(lambda: (m := reindex.send(42)).message_id != first.message_id and m, "the key is released")
    assert sorted(ran.wait(3)) == [42, 42, 43]
    assert again.options.get("dramaturg_duplicate") is None


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_a_purged_unique_task_frees_its_key(broker: dramatiq.Broker) -> None:
    @dramaturg.actor(queue_name="flow", unique=dramaturg.unique(key="reindex:{0}"))
    def reindex(product_id: int) -> None:
        pass

    # Given a unique task waiting, and its queue purged
    first = reindex.send(42)
    assert dramaturg.purge_queue("flow") == 1

    # When the same product is sent again
    again = reindex.send(42)

    # Then it is a new task, not the purged one
    assert again.message_id != first.message_id
    assert again.options.get("dramaturg_duplicate") is None
    assert dramaturg.task_status(first.message_id).state == "purged"


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_until_started_frees_the_key_once_the_task_runs(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given a task of a unique actor (until started) that is running and blocks
    go = threading.Event()
    ran = Runs()

    @dramaturg.actor(queue_name="flow", unique=dramaturg.unique(key="reindex:{product_id}", until="started"))
    def reindex(product_id: int) -> None:
        ran.add(product_id)
        go.wait(20)

    start_worker()
    first = reindex.send(product_id=42)
    ran.wait(1)

    # When the same key is sent while it runs
    second = reindex.send(product_id=42)

    # Then it is a new task, not the running one
    assert second.message_id != first.message_id
    go.set()
    ran.wait(2)


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_the_key_is_released_when_the_task_is_held_and_a_duplicate_can_raise(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given a unique actor that raises on duplicates, whose task is held
    @dramaturg.actor(queue_name="flow", max_retries=0, unique=dramaturg.unique(key="import:{0}", on_duplicate="raise"))
    def import_file(path: str) -> None:
        dramaturg.current_task().hold("no such file")

    first = import_file.send("users.csv")
    with pytest.raises(dramaturg.DuplicateTask, match=r"unique key 'import:users.csv' is queued or running") as raised:
        import_file.send("users.csv")
    assert raised.value.existing_id == first.message_id

    # When it is held
    start_worker()
    poll_until(lambda: dramaturg.task_status(first.message_id).state == "held", "the task is held")

    # Then the key is free: a new task is sent
    assert poll_until(lambda: _sent_or_none(import_file, "users.csv"), "the key is released").message_id != (
        first.message_id
    )


def _sent_or_none(actor: Any, *args: Any) -> Any:
    try:
        return actor.send(*args)
    except dramaturg.DuplicateTask:
        return None


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_a_key_taken_by_a_task_that_never_runs_expires_with_its_ttl(broker: dramatiq.Broker) -> None:
    @dramaturg.actor(queue_name="flow", unique=dramaturg.unique(key="digest", ttl="300ms"))
    def digest() -> None: ...

    before = time.monotonic()  # the key is taken after this, however long send() takes
    first = digest.send()
    assert digest.send().message_id == first.message_id
    poll_until(lambda: digest.send().message_id != first.message_id, "the key expires")
    assert time.monotonic() - before >= 0.29  # its ttl, less Redis's rounding to the millisecond


@pytest.mark.parametrize("broker_kind", ["eager"])
def test_eager_mode_releases_the_key_after_each_run(broker: dramatiq.Broker) -> None:
    ran = Runs()

    @dramaturg.actor(queue_name="flow", unique=dramaturg.unique(key="reindex:{0}"))
    def reindex(product_id: int) -> None:
        ran.add(product_id)

    assert reindex.send(1).message_id != reindex.send(1).message_id
    assert ran.seen == [1, 1]


@pytest.mark.parametrize("broker_kind", ["eager"])
def test_bad_unique_declarations_are_refused(broker: dramatiq.Broker) -> None:
    with pytest.raises(ValueError, match="until must be 'started' or 'finished'"):
        dramaturg.unique(key="k", until="done")  # type: ignore[arg-type]
    with pytest.raises(dramaturg.ActorError, match=r"unique must be dramaturg.unique"):

        @dramaturg.actor(unique="reindex")
        def bad() -> None: ...

    @dramaturg.actor(queue_name="flow", unique=dramaturg.unique(key="cart:{cart}"))
    def checkout(order: int) -> None: ...

    with pytest.raises(dramaturg.FlowSendError, match=r"unique: key 'cart:\{cart\}' cannot be made"):
        checkout.send(1)


def test_without_a_state_store_a_unique_send_says_what_to_set(rabbitmq_server: Any) -> None:
    url = f"amqp://guest:guest@{rabbitmq_server.host}:{rabbitmq_server.port}/%2F"
    dramaturg.bootstrap(dramaturg.Settings(broker={"url": url, "namespace": "test-unique-nostore"}))

    @dramaturg.actor(queue_name="flow", unique=dramaturg.unique(key="digest"))
    def digest() -> None: ...

    with pytest.raises(dramaturg.FlowSendError, match=r"need a state store.*\[state\] url.*digest was not sent"):
        digest.send()


@pytest.mark.parametrize("broker_kind", ["redis", "rabbitmq"])
def test_send_many_stops_at_a_duplicate_and_unsent_items_give_back_their_keys(broker: dramatiq.Broker) -> None:
    # Given a unique task queued for product 42
    @dramaturg.actor(queue_name="flow", unique=dramaturg.unique(key="reindex:{0}"))
    def reindex(product_id: int) -> None: ...

    reindex.send(42)

    # When a bulk send meets it in its chunk
    with pytest.raises(dramaturg.BulkSendError, match="DuplicateTask") as raised:
        reindex.send_many([1, 2, 42, 3])

    # Then the items before it were sent or not (RabbitMQ sends one by one, Redis a chunk at
    # once): each sent one keeps its key, each unsent one gave its key back
    sent = raised.value.sent
    assert sent in (0, 2)
    for product in (1, 2):
        again = reindex.send(product)
        assert bool(again.options.get("dramaturg_duplicate")) == (sent == 2), product
    assert "dramaturg_duplicate" not in reindex.send(3).options


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_a_cancelled_unique_task_releases_its_key(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given a queued unique task, cancelled before any worker took it
    ran = Runs()

    @dramaturg.actor(queue_name="flow", unique=dramaturg.unique(key="reindex:{0}"))
    def reindex(product_id: int) -> None:
        ran.add(product_id)

    first = reindex.send(42)
    dramaturg.cancel(first.message_id)

    # When a worker takes it (and skips it as cancelled)
    start_worker()
    poll_until(lambda: dramaturg.task_status(first.message_id).state == "cancelled", "it ends cancelled")

    # Then the key is free again, and only the new task runs
    again = poll_until(lambda: (m := reindex.send(42)).message_id != first.message_id and m, "the key is released")
    assert ran.wait(1) == [42] and again.options.get("dramaturg_duplicate") is None


def test_a_send_whose_claim_lost_its_reply_leaves_the_key_free(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: Any
) -> None:
    from .conftest import delete_rabbitmq_queues
    from .faults.proxy import FaultProxy

    # Given RabbitMQ with its state store behind a proxy, and a unique actor
    proxy = FaultProxy()
    port = proxy.start((redis_server.host, redis_server.port))
    worker = None
    try:
        settings = settings_with_state("rabbitmq", request, tmp_path)
        state = settings.state.model_copy(update={"url": f"redis://127.0.0.1:{port}/0"})
        broker = dramaturg.bootstrap(settings.model_copy(update={"state": state}))
        ran = Runs()

        @dramaturg.actor(queue_name="flowclaim", unique=dramaturg.unique(key="reindex:{0}"))
        def reindex(product_id: int) -> None:
            ran.add(product_id)

        # When a send's claim of its key is made in the store and the reply is lost
        proxy.drop_next_reply(containing=b"$0\r\n\r\n")  # unique.lua's answer: claimed ("")
        with pytest.raises(dramaturg.FlowSendError, match="could not be claimed"):
            reindex.send(42)
        assert proxy.replies_dropped == 1

        # Then the key does not name the task never sent: the next send is a task of its own, and runs
        again = reindex.send(42)
        assert again.options.get("dramaturg_duplicate") is None
        worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
        worker.start()
        assert ran.wait(1) == [42]
    finally:
        if worker is not None:
            worker.stop()
        proxy.stop()
        if dramaturg.app.current_broker_or_none() is not None:
            delete_rabbitmq_queues(dramaturg.app.current_broker_or_none())
