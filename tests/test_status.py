"""Task status by message id: every state a task goes through, on RabbitMQ (with a Redis
state store), Redis and embedded, through the Python call and `dramaturg status`."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis

import dramaturg
from dramaturg.bulk import new_ids
from dramaturg.config import StateSettings
from dramaturg.status import StateStore, state_store
from dramaturg.status.store import COUNTERS

from .conftest import bin_path, free_port, held_task, poll_until, run_cli, write_config

REPO = Path(__file__).resolve().parents[1]
LATER_MS = 600_000  # under RabbitMQ's consumer_timeout


@pytest.fixture
def settings(settings: dramaturg.Settings, broker_kind: str, request: pytest.FixtureRequest) -> dramaturg.Settings:
    """The behaviour suite's settings; RabbitMQ has no store of its own, so it gets the private Redis."""
    if broker_kind != "rabbitmq":
        return settings
    server = request.getfixturevalue("redis_server")
    return settings.model_copy(update={"state": StateSettings(url=f"redis://{server.host}:{server.port}/0")})


def status_when(message_id: str, state: str) -> dramaturg.TaskStatus:
    """The task's status once it is ``state`` (the store lags its tasks by a flush interval)."""
    seen: list[dramaturg.TaskStatus] = []

    def check() -> bool:
        seen[:] = [dramaturg.task_status(message_id)]
        return seen[0].state == state

    try:
        poll_until(check, f"task {message_id} {state}", timeout=15)
    except pytest.fail.Exception:
        pytest.fail(f"task {message_id} was never {state}; last seen: {seen[0] if seen else None}")
    return seen[0]


def test_every_state_of_a_task_is_told(broker: dramatiq.Broker, start_worker: Any) -> None:
    started, release = threading.Event(), threading.Event()

    @dramaturg.actor(queue_name="status")
    def ok() -> None:
        pass

    @dramaturg.actor(queue_name="status", min_backoff=LATER_MS, max_backoff=LATER_MS)
    def flaky() -> None:
        raise ValueError("the shop's API said 503")

    @dramaturg.actor(queue_name="status")
    def picky() -> None:
        dramaturg.current_task().hold("row 7 has no email")

    @dramaturg.actor(queue_name="status")
    def slow() -> None:
        started.set()
        release.wait(30)

    # Before any worker runs: queued, and delayed until when it was asked for
    sent_at = int(time.time() * 1000)  # whole ms, as the message's timestamp (and so its eta) is made
    first = ok.send()
    later = ok.send_with_options(delay=LATER_MS)
    queued = status_when(first.message_id, "queued")
    assert (queued.queue, queued.actor, queued.attempt) == ("status", "ok", 1)
    assert queued.enqueued_at == first.message_timestamp
    delayed = status_when(later.message_id, "delayed")
    assert delayed.eta is not None and sent_at + LATER_MS <= delayed.eta <= time.time() * 1000 + LATER_MS

    # With a worker: running (on which worker, since when), then succeeded (when, how long)
    start_worker(threads=2)
    running_task = slow.send()
    assert started.wait(15)
    running = status_when(running_task.message_id, "running")
    assert running.worker is not None and running.worker.split()[0].endswith(f":{os.getpid()}")
    assert running.started_at is not None and running.started_at >= running_task.message_timestamp
    release.set()
    done = status_when(running_task.message_id, "succeeded")
    assert done.finished_at is not None and done.started_at == running.started_at
    assert done.duration_ms is not None and 0 <= done.duration_ms <= done.finished_at - done.started_at + 1
    assert status_when(first.message_id, "succeeded").attempt == 1

    # A failure: retrying, attempt 2 due in an hour, with the error and where it was raised
    failing = flaky.send()
    retrying = status_when(failing.message_id, "retrying")
    assert retrying.attempt == 2
    assert retrying.eta is not None and retrying.eta >= time.time() * 1000 + LATER_MS - 30_000
    assert retrying.last_error is not None
    assert retrying.last_error.startswith("ValueError: the shop's API said 503 (at ")
    assert "test_status.py:" in retrying.last_error

    # hold(): held with its reason; the held store answers even without the state store
    parked = picky.send()
    held = status_when(parked.message_id, "held")
    assert (held.reason, held.attempt, held.last_error) == ("row 7 has no email", 1, None)

    # Never sent: unknown
    assert dramaturg.task_status(str(uuid.uuid4())).state == "unknown"

    # And the per-minute counts stats shows: 3 ran to an end (ok, slow, picky) plus the failed attempt
    counts = poll_until(
        lambda: (c := state_store().minute_counts(["status"])["status"])["processed"] == 4 and c,
        "four attempts counted",
    )
    assert counts == {"processed": 4, "failed": 1, "retried": 1, "held": 1}
    row = dramaturg.queue_stats(["status"])[0]  # what `dramaturg stats` shows
    assert (row.processed_per_min, row.failed_per_min, row.retried_per_min, row.held_per_min) == (4, 1, 1, 1)


def test_a_task_rejected_because_its_outcome_could_not_be_settled_failed(
    broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given three tasks that fail, and settling their outcome that fails too (a bug), so
    # that each is rejected into the dead-letter queue
    @dramaturg.actor(queue_name="fragile", max_retries=0)
    def fragile(n: int) -> None:
        raise RuntimeError("the mail server is down")

    def settle(*args: Any) -> None:
        raise AttributeError("a bug in settling")

    monkeypatch.setattr("dramaturg.middleware.outcomes.Outcomes.settle", settle)
    sent = [fragile.send(n).message_id for n in range(3)]

    # When a drain runs them
    summary = dramaturg.drain(["fragile"], until_empty=True, budget=60_000)

    # Then none is counted as processed, nor told as succeeded: each failed
    assert (summary.processed, summary.retried, summary.held, summary.left) == (0, 0, 0, 0)
    assert [status_when(message_id, "failed").state for message_id in sent] == ["failed"] * 3
    assert dramaturg.held_tasks().count("fragile") == 0


def status_cli(tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    result = run_cli([bin_path("dramaturg"), "status", *argv], cwd=tmp_path, PYTHONPATH=str(REPO))
    return result.returncode, result.stdout, result.stderr


def test_status_command(settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path) -> None:
    # Given a queued task, a delayed one and a held one, written by this process
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])

    @dramaturg.actor(queue_name="imports")
    def import_user(row: dict[str, Any]) -> None:
        pass

    queued = import_user.send({"id": 1})
    delayed = import_user.send_with_options(args=({"id": 2},), delay=LATER_MS)
    parked = held_task("imports", 3)
    dramaturg.held_tasks().hold(parked)
    state_store().flush()

    # Then `dramaturg status` in another process tells each
    code, out, err = status_cli(tmp_path, queued.message_id)
    assert code == 0, err
    headline, *details = out.splitlines()
    assert headline == f"{queued.message_id}: queued"
    assert "  actor:       import_user" in details and "  attempt:     1" in details

    code, out, _ = status_cli(tmp_path, delayed.message_id, "--json")
    status = json.loads(out)
    assert (code, status["state"], status["actor"], status["queue"]) == (0, "delayed", "import_user", "imports")
    assert status["eta"] >= delayed.message_timestamp + LATER_MS

    code, out, _ = status_cli(tmp_path, parked.message_id)
    assert (code, out.splitlines()[0]) == (0, f"{parked.message_id}: held: row 3 has no email")

    code, out, _ = status_cli(tmp_path, "no-such-task", "--json")
    assert (code, json.loads(out)) == (1, {"message_id": "no-such-task", "state": "unknown"})


def test_rabbitmq_without_a_state_store_says_what_to_set(rabbitmq_server: Any, tmp_path: Path) -> None:
    url = f"amqp://guest:secret@{rabbitmq_server.host}:{rabbitmq_server.port}/%2F"
    write_config(tmp_path, dramaturg.Settings(broker={"url": url}))
    code, out, err = status_cli(tmp_path, "some-id")
    assert (code, out) == (78, "")
    assert "task status needs a state store" in err and "[state] url" in err
    assert "secret" not in err


def test_the_newest_news_wins_whatever_order_the_writers_flush_in(redis_server: Any) -> None:
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    sender = StateStore(client, namespace=namespace, ttl_ms=60_000)
    worker = StateStore(client, namespace=namespace, ttl_ms=60_000)
    # The worker ran and finished the task before the sender's buffer was written
    sender.record("m1", {"state": "queued", "queue": "q"}, at=100.0)
    worker.record("m1", {"state": "running", "worker": "w:1"}, at=101.0)
    worker.record("m1", {"state": "succeeded"}, at=102.0)
    worker.flush()
    sender.flush()
    record = worker.get("m1")
    assert record is not None and (record["state"], record["worker"]) == ("succeeded", "w:1")
    # Each record expires after the ttl from its last change
    assert 0 < client.pttl(f"{namespace}:__state__:m1") <= 60_000
    sender.close()
    worker.close()


def test_changes_wait_in_the_buffer_while_the_store_is_down(redis_server: Any) -> None:
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    port = free_port()  # nothing listens on it
    down = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    store = StateStore(down, namespace=namespace, ttl_ms=60_000, flush_interval_s=3600)
    store.record("m1", {"state": "running"}, at=1.0)
    store.count("q", "processed")
    store.flush()  # fails: kept, and logged once
    store.record("m1", {"state": "succeeded"}, at=2.0)

    # When the store answers again, everything buffered is written
    store.client = redis.Redis(host=redis_server.host, port=redis_server.port)
    store.flush()
    record = store.get("m1")
    assert record is not None and record["state"] == "succeeded"
    assert store.minute_counts(["q"])["q"] == dict.fromkeys(COUNTERS, 0) | {"processed": 1}
    store.close()


def test_tasks_sent_in_bulk_are_told_too(
    broker: dramatiq.Broker, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis finds them in the broker by id (no record is written per task); RabbitMQ writes one per chunk
    @dramaturg.actor(queue_name="status-bulk")
    def import_row(row: int) -> None:
        pass

    generated: list[str] = []

    def recording_new_ids(count: int) -> list[str]:
        ids = new_ids(count)
        generated.extend(ids)
        return ids

    monkeypatch.setattr(dramaturg.bulk, "new_ids", recording_new_ids)
    now = time.time() * 1000
    import_row.send_many(range(1_500), chunk_size=1_000)
    first, last = generated[0], generated[1_499]
    import_row.send_many([1_500], delay=LATER_MS)
    later = generated[1_500]

    for message_id in (first, last):
        status = status_when(message_id, "queued")
        assert (status.actor, status.queue, status.attempt) == ("import_row", "status-bulk", 1)
        assert status.enqueued_at is not None and status.enqueued_at >= now - 1
    delayed = status_when(later, "delayed")
    assert delayed.eta is not None and delayed.eta >= now + LATER_MS

    start_worker(threads=2)
    assert status_when(last, "succeeded").duration_ms is not None


def test_a_workers_records_hold_every_field_whatever_the_text_in_them(redis_server: Any) -> None:
    """The writer makes a worker's records as text (not through dicts and ``json``):
    each reads back as the fields themselves, quotes and non-ASCII text included."""
    from dramatiq import Message

    from dramaturg.task import RunOutcome

    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    store = StateStore(client, namespace=f"test-{uuid.uuid4().hex[:8]}", ttl_ms=60_000, flush_interval_s=3600)
    worker = 'host:1 Thread-"1"'

    def message(**options: Any) -> Message[Any]:
        return Message(queue_name="imports.DQ", actor_name="import_user", args=(), kwargs={}, options=options)

    running, done, held, rejected, retried = (message() for _ in range(5))
    earlier_error = 'ValueError: "bad" row \u2013 ü'
    again = message(retries=2, dramaturg_last_error=earlier_error)
    store.task_event(("start", running.message_id, 10.0, running, worker))
    for m, outcome, error, reason in (
        (done, RunOutcome.SUCCEEDED, None, None),
        (held, RunOutcome.HELD, None, 'no "email" \u2013 ü'),
        (rejected, RunOutcome.REJECTED, "KeyError: 'email'\nat line 3", None),
        (retried, RunOutcome.RETRIED, "OSError: busy", None),
        (again, RunOutcome.SUCCEEDED, None, None),
    ):
        store.task_event(("start", m.message_id, 10.0, m, worker))
        store.task_event(("end", m.message_id, 10.25, m, worker, 10.0, outcome, error, reason, None))
    store.flush()

    common = {"queue": "imports", "actor": "import_user", "worker": worker, "started_at": 10_000}
    ended = {**common, "finished_at": 10_250, "duration_ms": 250}

    def fields(m: Message[Any]) -> dict[str, Any] | None:
        record = store.get(m.message_id)
        return None if record is None else {k: v for k, v in record.items() if k not in {"at", "enqueued_at"}}

    assert fields(running) == {**common, "state": "running", "attempt": 1}
    assert fields(done) == {**ended, "state": "succeeded", "attempt": 1}
    assert fields(held) == {**ended, "state": "held", "attempt": 1, "reason": 'no "email" \u2013 ü'}
    assert fields(rejected) == {**ended, "state": "failed", "attempt": 1, "last_error": "KeyError: 'email'\nat line 3"}
    assert fields(retried) is None  # its retry's enqueue tells it
    assert fields(again) == {**ended, "state": "succeeded", "attempt": 3, "last_error": earlier_error}
    record = store.get(done.message_id)
    assert record is not None and (record["at"], record["enqueued_at"]) == (10.25, done.message_timestamp)
    assert store.minute_counts(["imports"])["imports"] == dict.fromkeys(COUNTERS, 0)  # counted at 10 s, long ago
    store.close()


def test_a_run_and_a_senders_change_of_the_same_task_in_one_flush_are_merged(redis_server: Any) -> None:
    from dramatiq import Message

    from dramaturg.task import RunOutcome

    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    down = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    store = StateStore(down, namespace=namespace, ttl_ms=60_000, flush_interval_s=3600)
    m = Message(queue_name="q", actor_name="a", args=(), kwargs={}, options={})
    other = Message(queue_name="q", actor_name="a", args=(), kwargs={}, options={})
    # The sender's news of m (a kick, say) came first; its run ended after it
    store.record(m.message_id, {"state": "queued", "queue": "q", "note": "kicked"}, at=100.0)
    store.task_event(("end", m.message_id, 101.0, m, "w:1", 100.5, RunOutcome.SUCCEEDED, None, None, None))
    store.task_event(("end", other.message_id, 101.0, other, "w:1", 100.5, RunOutcome.SUCCEEDED, None, None, None))
    store.flush()  # the store is down: both are kept
    store.client = client
    store.flush()
    record = store.get(m.message_id)
    assert record is not None and (record["state"], record["note"], record["worker"]) == ("succeeded", "kicked", "w:1")
    record = store.get(other.message_id)
    assert record is not None and (record["state"], record["duration_ms"], record["at"]) == ("succeeded", 500, 101.0)
    store.close()


def test_a_task_a_worker_started_before_its_send_returned_is_running_not_queued(redis_server: Any) -> None:
    """A sender's "queued" is dated when its send began: a worker may start the task (and
    flush "running") before the send returns and the sender's own flush comes."""
    from dramatiq import Message
    from dramatiq.broker import MessageProxy

    from dramaturg.status.recorder import StatusRecorder

    def tick() -> None:  # let the clock move on by a few microseconds (records are dated to the us)
        start = time.time()
        while time.time() - start < 2e-5:
            pass

    url = f"redis://{redis_server.host}:{redis_server.port}/0"
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    sender, worker = StatusRecorder(url, 60_000, namespace), StatusRecorder(url, 60_000, namespace)
    broker: Any = object()  # a store at [state] url needs nothing of the broker
    message = Message(queue_name="q", actor_name="a", args=(), kwargs={}, options={})

    # Given a send under way (RabbitMQ: the publish is out, its confirm not yet back)
    sender.before_enqueue(broker, message, None)
    tick()
    # When a worker starts the task meanwhile, and its record is written first
    worker.before_process_message(broker, MessageProxy(message))
    worker.store(broker).flush()
    tick()
    sender.after_enqueue(broker, message, None)
    sender.store(broker).flush()

    # Then the task is running: the sender's older news does not replace the worker's
    record = worker.store(broker).get(message.message_id)
    assert record is not None and record["state"] == "running"
    sender.close()
    worker.close()
