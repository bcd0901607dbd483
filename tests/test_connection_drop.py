"""RabbitMQ: a worker whose connection drops runs again only the tasks that were running.

When a consumer's connection is gone, RabbitMQ gives every delivery it had not
acknowledged back to the queue and delivers it again. The deliveries that were
prefetched but not started must then not be started on the old one (they would run
twice); the ones running at the drop run again, each logged as delivered again.
RabbitMQ only: on Redis a message stays claimed by its worker across a reconnect.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest

import dramaturg
from tests.apps.simulated import busy

from .conftest import pending_messages, poll_until

pytestmark = pytest.mark.parametrize("broker_kind", ["rabbitmq"])

TASKS = 300
TASK_S = 0.03
#: How long after taking a task off the work queue a thread may start it (a busy machine).
TAKEN_S = 0.05
#: How long after a task ends RabbitMQ may still be waiting for its acknowledgement.
ACKED_S = 0.05


def management(server: Any, method: str, path: str) -> Any:
    """Call the private node's management API; the parsed JSON answer (None when empty)."""
    parts = urllib.parse.urlsplit(server.management_url)
    request = urllib.request.Request(f"http://{parts.hostname}:{parts.port}/api/{path}", method=method)
    request.add_header("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")  # guest:guest, the private node's
    request.add_header("X-Reason", "test: connection dropped")
    with urllib.request.urlopen(request, timeout=10) as answer:
        body = answer.read()
    return json.loads(body) if body else None


def consumer_connection(server: Any, queue: str) -> str:
    """The name of the connection consuming ``queue`` (as the management API knows it)."""

    def find() -> str | None:
        for consumer in management(server, "GET", "consumers"):
            details = consumer.get("channel_details")  # [] until the node has filled them in
            if consumer["queue"]["name"] == queue and isinstance(details, dict) and details.get("connection_name"):
                return str(details["connection_name"])
        return None

    return str(poll_until(find, f"a consumer on {queue!r} in the management API"))


def drop_connection(server: Any, name: str) -> None:
    """Close connection ``name`` from the server's side, as a network fault or an operator would."""
    management(server, "DELETE", f"connections/{urllib.parse.quote(name, safe='')}")


class Ledger:
    """Each run of each message: when it started and ended (``time.time()``, as log records)."""

    def __init__(self) -> None:
        self.runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.changed = threading.Condition()

    def record(self, message_id: str, started: float, ended: float) -> None:
        with self.changed:
            self.runs[message_id].append((started, ended))
            self.changed.notify_all()

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
        with self.changed:
            assert self.changed.wait_for(check, timeout), f"{what}: not within {timeout} s"

    def ended(self) -> int:
        return sum(len(runs) for runs in self.runs.values())


def test_a_dropped_connection_runs_again_only_the_tasks_that_were_running(
    rabbitmq_server: Any,
    broker: dramatiq.Broker,
    start_worker: Callable[..., dramatiq.Worker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given 300 tasks of 30 ms on a queue, and a worker that prefetched them
    ledger = Ledger()
    known = threading.Event()  # the tasks wait until the test knows the worker's connection

    @dramaturg.actor(queue_name="dropq")
    def step(n: int) -> None:
        assert known.wait(30)
        started = time.time()
        busy(TASK_S)
        ledger.record(dramaturg.current_task().message_id, started, time.time())

    sent = {step.send(n).message_id for n in range(TASKS)}
    with caplog.at_level(logging.INFO):
        worker = start_worker(threads=4)
        connection = consumer_connection(rabbitmq_server, "dropq")
        known.set()

        # When its connection is dropped a third of the way through
        ledger.wait("a third of the tasks ended", lambda: ledger.ended() >= TASKS // 3)
        dropped_at = time.time()
        drop_connection(rabbitmq_server, connection)
        dropped_by = time.time()

        # and it reconnects and goes on until every task has ended
        ledger.wait("every task ended at least once", lambda: set(ledger.runs) == sent)
        worker.join()
        worker.stop()

    # Then nothing is lost: every task sent succeeded, nothing is held or left on the queue
    assert set(ledger.runs) == sent
    assert dramaturg.held_tasks().count("dropq") == 0
    assert pending_messages(broker, "dropq") == 0
    # and the only tasks that ran twice were in flight when the connection dropped:
    # running, or just ended with their acknowledgement still on its way (or taken off
    # the work queue just before the worker saw the drop). The ones it had prefetched
    # but not started were not started on the lost channel.
    lines = [(record.created, record.getMessage()) for record in caplog.records]
    noticed = [at for at, line in lines if line.startswith("lost the channel of queue 'dropq'")]
    seen_at = noticed[0] if noticed else dropped_by
    twice = {message_id: runs for message_id, runs in ledger.runs.items() if len(runs) > 1}
    assert all(len(runs) == 2 for runs in twice.values()), twice
    started_later = {message_id: runs for message_id, runs in twice.items() if runs[0][0] > seen_at + TAKEN_S}
    assert not started_later, f"{len(twice)} ran twice, {len(started_later)} first started after the drop was seen"
    ended_before = {
        message_id: round(dropped_at - runs[0][1], 4)
        for message_id, runs in twice.items()
        if runs[0][1] < dropped_at - ACKED_S
    }
    assert not ended_before, ended_before
    assert len(twice) <= 8, twice  # the 4 running, and a few just ended
    # and it saw the drop at once and said so
    assert noticed, "the lost channel was not logged"
    assert noticed[0] - dropped_by < 2.0, noticed[0] - dropped_by
    # and each second run was logged as a delivery again
    for message_id in twice:
        assert any(f"(message {message_id}) was delivered again" in line for _, line in lines), message_id


def send_delayed(count: int, delay_ms: int) -> tuple[list[str], set[str]]:
    """Send ``count`` tasks to ``dropq`` with a delay: the message ids each run saw (as they
    ran), and the ids sent."""
    ran: list[str] = []
    lock = threading.Lock()

    @dramaturg.actor(queue_name="dropq")
    def later(n: int) -> None:
        with lock:
            ran.append(dramaturg.current_task().message_id)

    return ran, {later.send_with_options(args=(n,), delay=delay_ms).message_id for n in range(count)}


def test_delayed_messages_taken_on_a_closed_channel_are_moved_to_their_queue_once(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker], caplog: pytest.LogCaptureFixture
) -> None:
    # Given 20 tasks sent with a delay, held by a worker until they are due
    ran, sent = send_delayed(20, delay_ms=1_500)
    worker = start_worker(threads=2)
    delayed = worker.consumers["dropq.DQ"]
    poll_until(lambda: delayed.delay_queue.qsize() == 20, "the worker holding the 20 delayed messages", 10)

    # When its consumers close their channels while it holds them (a pause; an
    # unexpected error in a consumer does the same), and start again
    with caplog.at_level(logging.INFO):
        worker.pause()
        worker.resume()
        poll_until(lambda: set(ran) == sent, "every delayed task ran", 30)
        worker.join()
        worker.stop()

    # Then each ran once: RabbitMQ delivered them again, and the copies still held
    # from the closed channel were not moved to the queue as well
    assert sorted(ran) == sorted(sent)
    assert pending_messages(broker, "dropq") == 0
    assert any("delayed messages taken on a closed channel are dropped" in r.getMessage() for r in caplog.records)


def test_a_delayed_message_moved_to_its_queue_is_acknowledged_before_the_next_is_moved(
    rabbitmq_server: Any,
    broker: dramatiq.Broker,
    start_worker: Callable[..., dramatiq.Worker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given 3 delayed tasks, due together, held by a worker
    ran, sent = send_delayed(3, delay_ms=500)

    # When the broker goes away while the worker moves them to their queue: the first
    # is moved, then the consumer's connection drops and the second cannot be published
    moves: list[str] = []
    enqueue = broker.enqueue
    connection: list[str] = []
    known = threading.Event()  # the moves wait until the test knows the consumer's connection

    def moving(message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        if threading.current_thread() is worker.consumers.get("dropq.DQ") and not message.queue_name.endswith(".DQ"):
            assert known.wait(30)
            moves.append(message.message_id)
            if len(moves) == 2:
                drop_connection(rabbitmq_server, connection[0])
                raise dramatiq.errors.ConnectionClosed(ConnectionError("test: the broker went away"))
        return enqueue(message, delay=delay)

    monkeypatch.setattr(broker, "enqueue", moving)
    worker = start_worker(threads=2)
    connection.append(consumer_connection(rabbitmq_server, "dropq.DQ"))
    known.set()
    poll_until(lambda: set(ran) == sent, "every delayed task ran", 30)
    worker.join()
    worker.stop()

    # Then each ran once: the one moved before the drop had been acknowledged at once
    # (not left for the consumer's next poll, which the drop took away), so RabbitMQ
    # did not deliver it again to be moved a second time
    assert len(moves) >= 4, moves  # the first, the failed second, then the two delivered again
    assert sorted(ran) == sorted(sent)
    assert pending_messages(broker, "dropq") == 0
