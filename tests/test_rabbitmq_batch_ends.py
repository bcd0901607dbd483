"""Batches on RabbitMQ while the state store does not answer: the members' ends wait in the
process's end writer (their messages unacknowledged), the consumers keep serving their
connections, and nothing runs twice."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis

import dramaturg
from dramaturg.batches.state import RedisBatchState

from .conftest import Runs, delete_rabbitmq_queues, free_port, pending_messages, poll_until


class Store:
    """A redis-server of the test's own, as the state store, that can be paused or killed
    and started again on the same port with what it had (an append-only file)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *("redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory)),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        poll_until(lambda: _pings(client), "the state store answers")
        client.close()

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)  # a paused one is killed as well
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    own = Store(tmp_path)
    yield own
    own.kill()


@pytest.fixture
def track_state() -> bool:
    """Whether task status (and with it the cancel watch) is on; a test parametrizes it."""
    return False


@pytest.fixture
def outage_broker(rabbitmq_server: Any, store: Store, track_state: bool) -> Iterator[dramatiq.Broker]:
    """RabbitMQ with its batches in ``store``."""
    settings = dramaturg.Settings(
        broker={
            "url": f"amqp://guest:guest@{rabbitmq_server.host}:{rabbitmq_server.port}/%2F",
            "namespace": "test-batch-outage",
            "management_url": rabbitmq_server.management_url,
        },
        state={"url": store.url, "enabled": track_state},
    )
    broker = dramaturg.bootstrap(settings)
    yield broker
    delete_rabbitmq_queues(broker)


@pytest.fixture
def worker(outage_broker: dramatiq.Broker) -> Iterator[list[dramatiq.Worker]]:
    started: list[dramatiq.Worker] = []
    yield started
    for each in started:
        each.stop()


def start(broker: dramatiq.Broker, started: list[dramatiq.Worker]) -> None:
    each = dramatiq.Worker(broker, worker_threads=4, worker_timeout=100)
    each.start()
    started.append(each)


# Task status off: its cancel watch reads the store before a task starts, which a paused
# store holds for the read timeout (10 s), whatever the batches do.


def test_members_ending_while_the_state_store_is_paused_run_once_and_the_consumer_serves_on(
    outage_broker: dramatiq.Broker, store: Store, worker: list[dramatiq.Worker]
) -> None:
    # Given a batch of 20 members, and a state store that stops answering (paused, no
    # connection closed) before a worker starts them
    runs, plain = Runs(), Runs()

    @dramaturg.actor(queue_name="batch-outage")
    def member(n: int) -> None:
        runs.add(n)

    @dramaturg.actor(queue_name="batch-outage")
    def alone(n: int) -> None:
        plain.add(n)

    done = Runs()

    @dramaturg.actor(queue_name="batch-outage-callbacks")
    def report(summary: dict[str, Any]) -> None:
        done.add(summary)

    batch = dramaturg.batch("paused", on_complete=report.message())
    with batch:
        member.send_many(range(20))
    store.pause()
    try:
        start(outage_broker, worker)

        # When the members end while the store does not answer, and a task of no batch is
        # sent to the same queue meanwhile
        assert sorted(runs.wait(20)) == list(range(20))
        alone.send(1)

        # Then that task is delivered and runs during the outage: the consumer's thread,
        # which reads the deliveries, does not wait on the state store
        assert plain.wait(1) == [1]
    finally:
        store.resume()

    # And once the store answers, the batch counts each member once and completes once,
    # and no member ran twice
    (summary,) = done.wait(1)
    assert (summary["total"], summary["succeeded"]) == (20, 20)
    assert sorted(runs.seen) == list(range(20))
    assert len(done.seen) == 1


@pytest.mark.parametrize("track_state", [True])
def test_members_ending_while_the_state_store_is_down_are_not_given_back_and_count_once(
    outage_broker: dramatiq.Broker, store: Store, worker: list[dramatiq.Worker]
) -> None:
    # Given a batch of 20 members, and a state store that is down (connections refused)
    # before a worker starts them
    runs = Runs()

    @dramaturg.actor(queue_name="batch-outage")
    def member(n: int) -> None:
        runs.add(n)

    done = Runs()

    @dramaturg.actor(queue_name="batch-outage-callbacks")
    def report(summary: dict[str, Any]) -> None:
        done.add(summary)

    batch = dramaturg.batch("down", on_complete=report.message())
    with batch:
        member.send_many(range(20))
    store.kill()
    start(outage_broker, worker)

    # When the members end while it stays down for a few seconds
    assert sorted(runs.wait(20)) == list(range(20))
    with pytest.raises(AssertionError):
        runs.wait(21, timeout=3)  # given back to the queue, one would run again within a second

    # Then none ran again meanwhile (their messages stay unacknowledged, not given back),
    # and once the store is back the batch counts each once and completes once
    store.start()
    (summary,) = done.wait(1)
    assert (summary["total"], summary["succeeded"]) == (20, 20)
    assert sorted(runs.seen) == list(range(20))
    assert len(done.seen) == 1


def test_a_stopping_worker_acknowledges_the_members_whose_ends_it_was_writing(
    outage_broker: dramatiq.Broker, worker: list[dramatiq.Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a state store whose writes of ends take 0.2 s each
    end = RedisBatchState.end

    def slow(state: RedisBatchState, ends: Any, **kwargs: Any) -> list[list[str]]:
        time.sleep(0.2)
        return end(state, ends, **kwargs)

    monkeypatch.setattr(RedisBatchState, "end", slow)
    runs = Runs()

    @dramaturg.actor(queue_name="batch-outage")
    def member(n: int) -> None:
        runs.add(n)

    @dramaturg.actor(queue_name="batch-outage-callbacks")
    def report(summary: dict[str, Any]) -> None:
        pass

    batch = dramaturg.batch("stopping", on_complete=report.message())
    with batch:
        member.send_many(range(10))
    start(outage_broker, worker)

    # When the worker stops as soon as the members ran, their ends (the last one firing
    # on_complete) still being written
    runs.wait(10)
    worker.pop().stop()

    # Then its consumer waited for them before it closed: every member's message was
    # acknowledged (none is back on the queue to run again), and on_complete was published
    status = dramaturg.batch_status(batch.id)
    assert (status.total, status.succeeded, status.state) == (10, 10, "complete")
    assert pending_messages(outage_broker, "batch-outage") == 0
    assert pending_messages(outage_broker, "batch-outage-callbacks") == 1
    assert sorted(runs.seen) == list(range(10))


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
