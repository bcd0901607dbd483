"""Checkpoints: a task keeps its place across retries, interrupts, kicks and a killed
worker, on RabbitMQ (with a Redis state store), Redis, embedded and eager."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg import app
from dramaturg.checkpoints import KEPT_AFTER_END_MS, Checkpoints, RedisCheckpointStore

from .conftest import Runs, poll_until, settings_with_state, write_config

MODES = ("rabbitmq", "redis", "embedded", "eager")
REAL_BROKERS = ["rabbitmq", "redis", "embedded"]


@pytest.fixture(params=MODES)
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dramaturg.Settings:
    """A namespace of this test's own; RabbitMQ gets the private Redis as its state store;
    retries come at once."""
    return settings_with_state(broker_kind, request, tmp_path, retries={"min_backoff": 10, "max_backoff": 10})


@pytest.fixture
def run_tasks(broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]) -> Callable[[], None]:
    """Start a worker (eager mode runs tasks in send())."""

    def start() -> None:
        if not getattr(broker, "runs_inline", False):
            start_worker()

    return start


def checkpoint_store(broker: dramatiq.Broker) -> Any:
    """Where ``broker``'s checkpoints are kept (as a run of a task on it sees them)."""
    middleware = next(m for m in broker.middleware if isinstance(m, Checkpoints))
    return middleware.for_run(broker, "").middleware.store()


def stored(broker: dramatiq.Broker, message_id: str) -> str | None:
    """The checkpoint kept for ``message_id``, as its JSON text."""
    return checkpoint_store(broker).load(message_id)  # type: ignore[no-any-return]


def expires_in_s(broker: dramatiq.Broker, message_id: str) -> float | None:
    """How long the checkpoint of ``message_id`` is kept from now (None: there is none)."""
    store = checkpoint_store(broker)
    if isinstance(store, RedisCheckpointStore):
        left_ms = store.client.pttl(store.prefix + message_id)
        return None if left_ms < 0 else left_ms / 1000
    found = store._values.get(message_id)  # type: ignore[attr-defined]
    return None if found is None else found[1] - time.monotonic()


def ended(broker: dramatiq.Broker, message_id: str) -> bool:
    """Whether the checkpoint of ``message_id`` is left to expire as that of a task that
    ended (within the hour, not the seven days of ``checkpoint_ttl``)."""
    left = expires_in_s(broker, message_id)
    return left is not None and left <= KEPT_AFTER_END_MS / 1000


def test_a_retried_task_goes_on_from_its_checkpoint_and_a_success_lets_it_expire(
    broker: dramatiq.Broker, run_tasks: Callable[[], None]
) -> None:
    runs = Runs()

    # Given a task that saves its place, then fails on its first run
    @dramaturg.actor(queue_name="checkpoints", max_retries=3)
    def import_file(total: int) -> None:
        task = dramaturg.current_task()
        state = task.checkpoint_state
        runs.record(attempt=task.attempt, resumed_from=state)
        start = 0 if state is None else state["offset"]
        for offset in range(start, total, 10):
            task.checkpoint({"offset": offset + 10, "file": "users.csv"})
            if task.attempt == 1 and offset == 30:
                raise ConnectionError("the database went away")

    # When it runs, fails, and runs again
    run_tasks()
    message = import_file.send(100)
    seen = runs.wait(2)

    # Then the second run reads where the first stopped, and its success lets the checkpoint expire
    assert seen[:2] == [
        {"attempt": 1, "resumed_from": None},
        {"attempt": 2, "resumed_from": {"offset": 40, "file": "users.csv"}},
    ]
    poll_until(lambda: ended(broker, message.message_id), "the checkpoint expires within the hour after the success")
    assert len(runs.seen) == 2


def test_a_held_task_keeps_its_checkpoint_and_a_kick_goes_on_from_it(
    broker: dramatiq.Broker, run_tasks: Callable[[], None]
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="checkpoints", max_retries=0)
    def import_file(total: int) -> None:
        task = dramaturg.current_task()
        offset = (task.checkpoint_state or {"offset": 0})["offset"]
        runs.record(kicks=task.kicks, resumed_from=offset)
        task.checkpoint({"offset": offset + 50})
        if task.kicks == 0:
            task.hold("row 50 has no email")

    # Given a task held after it saved its place
    run_tasks()
    if getattr(broker, "runs_inline", False):
        with pytest.raises(dramaturg.TaskHeld):
            message = import_file.send(100)
        message = dramaturg.held_tasks().list("checkpoints")[0]
    else:
        message = import_file.send(100)
    runs.wait(1)
    store = dramaturg.held_tasks()
    poll_until(lambda: store.get(message.message_id, "checkpoints"), "the task is held")
    assert stored(broker, message.message_id) == '{"offset":50}'

    # When it is kicked
    assert store.kick("checkpoints", [message.message_id]) == 1

    # Then the kicked run starts from the checkpoint the held run saved
    assert runs.wait(2)[1] == {"kicks": 1, "resumed_from": 50}
    poll_until(lambda: ended(broker, message.message_id), "the checkpoint expires within the hour after the success")


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_a_task_interrupted_at_its_ttr_goes_on_from_its_checkpoint(
    broker: dramatiq.Broker, run_tasks: Callable[[], None]
) -> None:
    from tests.apps.simulated import busy

    runs = Runs()

    # Given a task that saves its place and then overruns its 300 ms time to run once
    @dramaturg.actor(queue_name="checkpoints", ttr=300, max_retries=2)
    def slow_import() -> None:
        task = dramaturg.current_task()
        state = task.checkpoint_state
        runs.record(attempt=task.attempt, resumed_from=state)
        task.checkpoint({"offset": 500})
        if state is None:
            busy(30)  # interrupted at 300 ms

    # When it is interrupted and retried
    run_tasks()
    slow_import.send()

    # Then the retry starts from the checkpoint
    assert runs.wait(2) == [{"attempt": 1, "resumed_from": None}, {"attempt": 2, "resumed_from": {"offset": 500}}]


def test_a_checkpoint_that_is_not_small_json_is_refused_with_a_clear_error(
    broker: dramatiq.Broker, run_tasks: Callable[[], None]
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="checkpoints", max_retries=0)
    def bad_checkpoints() -> None:
        task = dramaturg.current_task()
        for state in ({"when": object()}, {"rows": "x" * 70_000}, float("nan")):
            try:
                task.checkpoint(state)
            except ValueError as error:
                runs.add(str(error))
        runs.add(task.checkpoint_state)

    run_tasks()
    bad_checkpoints.send()
    errors = runs.wait(4)
    assert errors[0].startswith("checkpoint: the state must be JSON") and "object" in errors[0]
    assert "70,011 bytes as JSON, over the 65,536-byte limit" in errors[1]
    assert errors[2].startswith("checkpoint: the state must be JSON")
    assert errors[3] is None  # nothing was saved


def test_rabbitmq_without_a_state_store_refuses_a_checkpoint_naming_the_setting(rabbitmq_server: Any) -> None:
    url = f"amqp://guest:guest@{rabbitmq_server.host}:{rabbitmq_server.port}/%2F"
    broker = dramaturg.bootstrap(
        dramaturg.Settings(broker={"url": url, "namespace": f"test-{uuid.uuid4().hex[:8]}"}, worker={"threads": 1})
    )
    runs = Runs()

    @dramaturg.actor(queue_name="checkpoints", max_retries=0)
    def keeps_place() -> None:
        try:
            dramaturg.current_task().checkpoint({"offset": 1})
        except dramaturg.StateUnavailable as error:
            runs.add(str(error))

    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        keeps_place.send()
        seen = runs.wait(1)
    finally:
        worker.stop()
    assert seen == [
        "checkpoints need a state store, and the rabbitmq broker has none of its own:"
        ' set [state] url = "redis://..." (or DRAMATURG_STATE_URL)'
    ]


# -- a worker killed in the middle of a long task ---------------------------------------


@dataclass(frozen=True)
class Line:
    event: str
    offset: int
    pid: int


def lines(path: Path) -> list[Line]:
    if not path.exists():
        return []
    return [Line(e, int(o), int(p)) for e, o, p in (line.split() for line in path.read_text().splitlines())]


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_a_worker_killed_mid_task_has_the_next_run_start_at_the_last_checkpoint(
    settings: dramaturg.Settings, broker: dramatiq.Broker, spawn: Callable[..., Any], tmp_path: Path
) -> None:
    from tests.apps import checkpoint_tasks

    from .test_recovery import start_workers

    # Given two worker processes (separate groups) and a 10,000-row import that
    # checkpoints every 100 rows
    app.register(checkpoint_tasks.import_rows)
    write_config(tmp_path, settings, modules=["tests.apps.checkpoint_tasks"])
    log = tmp_path / "checkpoints.log"
    start_workers(spawn, 2, CHECKPOINT_LOG=str(log))
    message = checkpoint_tasks.import_rows.send(10_000)

    # When the worker running it is killed (SIGKILL) once it is past row 3,000
    killed = poll_until(
        lambda: next((line for line in lines(log) if line.event == "saved" and line.offset >= 3_000), None),
        "the import passes row 3,000",
    )
    os.kill(killed.pid, signal.SIGKILL)

    # Then the next run, on the other worker, starts at the last checkpoint, not at row 0
    poll_until(lambda: any(line.event == "end" for line in lines(log)), "the import ends", timeout=60)
    seen = lines(log)
    before_kill = [line.offset for line in seen if line.event == "saved" and line.pid == killed.pid]
    starts = [line for line in seen if line.event == "start"]
    assert [start.offset for start in starts[:1]] == [0] and len(starts) == 2, seen
    # The killed run may have saved one more checkpoint than it logged before it died.
    assert max(before_kill) <= starts[1].offset <= max(before_kill) + checkpoint_tasks.EVERY
    assert starts[1].pid != killed.pid
    assert [line.offset for line in seen if line.event == "end"] == [10_000]
    poll_until(lambda: ended(broker, message.message_id), "the checkpoint expires within the hour after the success")


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_a_task_delivered_again_after_its_success_goes_on_from_its_last_checkpoint(
    settings: dramaturg.Settings, broker: dramatiq.Broker, spawn: Callable[..., Any], tmp_path: Path
) -> None:
    from tests.apps import checkpoint_tasks

    from .test_recovery import start_workers

    # Given a worker process that dies the moment its import has succeeded, before the
    # broker hears so (its acknowledgement lost)
    app.register(checkpoint_tasks.import_rows)
    write_config(tmp_path, settings, modules=["tests.apps.checkpoint_tasks"])
    log = tmp_path / "checkpoints.log"
    (first,) = start_workers(spawn, 1, CHECKPOINT_LOG=str(log), CHECKPOINT_DIE_AFTER_END="1")
    message = checkpoint_tasks.import_rows.send(1_000)
    poll_until(lambda: any(line.event == "end" for line in lines(log)), "the first run ends")
    first.popen.wait(30)

    # When the task is delivered again, to another worker
    start_workers(spawn, 1, CHECKPOINT_LOG=str(log))
    poll_until(
        lambda: len([line for line in lines(log) if line.event == "end"]) == 2, "the second run ends", timeout=60
    )

    # Then that run goes on from the last checkpoint (the end), not from row 0
    starts = [line.offset for line in lines(log) if line.event == "start"]
    assert starts == [0, 1_000]
    # and the checkpoint is still kept for a while, to expire on its own
    poll_until(lambda: ended(broker, message.message_id), "the checkpoint expires within the hour after the success")
    assert stored(broker, message.message_id) == '{"offset":1000}'
