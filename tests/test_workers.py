"""The worker registry: each worker process's record (host, pid, queues, threads, tasks
running now) in the state store, on Redis, embedded and RabbitMQ with a Redis state
store; what ``dramaturg.workers()`` and ``dramaturg workers`` say."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import dramatiq
import pytest

import dramaturg
from dramaturg.workers import registry_of

from .conftest import WAIT_S, Process, bin_path, poll_until, run_cli, settings_with_state, write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["rabbitmq", "redis", "embedded"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dramaturg.Settings:
    """A namespace of this test's own; RabbitMQ gets the private Redis as its state store."""
    return settings_with_state(broker_kind, request, tmp_path)


def test_a_running_worker_is_listed_with_its_pid_queues_and_running_tasks_until_it_stops(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given a worker of three threads on the imports queue, writing its record every 200 ms,
    # and a task that runs until the test lets it finish
    registry_of(broker).interval_ms = 200
    started, release = threading.Event(), threading.Event()

    @dramaturg.actor(queue_name="imports")
    def slow_import() -> None:
        started.set()
        release.wait(WAIT_S)

    worker = start_worker(threads=3, queues={"imports"})

    # When the workers are listed
    (listed,) = poll_until(dramaturg.workers, "the worker to be listed", timeout=WAIT_S)

    # Then it is there: this host, this process, its queue and threads, nothing running
    assert (listed.host, listed.pid, listed.queues, listed.threads, listed.running) == (
        socket.gethostname(),
        os.getpid(),
        ("imports",),
        3,
        0,
    )
    assert listed.seen_at >= listed.started_at > 0

    # When a task runs, the next record counts it
    slow_import.send()
    assert started.wait(WAIT_S)
    poll_until(lambda: [w.running for w in dramaturg.workers()] == [1], "the running task to be counted", WAIT_S)
    release.set()

    # When the worker stops cleanly, it is gone at once (no waiting for the TTL)
    worker.stop()
    assert dramaturg.workers() == []


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_a_worker_that_stops_writing_drops_off_the_list_after_its_ttl(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given a listed worker whose record is written every 100 ms (TTL 300 ms)
    registry = registry_of(broker)
    registry.interval_ms = 100
    start_worker(threads=1)
    poll_until(dramaturg.workers, "the worker to be listed", timeout=WAIT_S)

    # When its writer stops without removing the record (as when the process is killed)
    (thread,) = registry._threads.values()
    thread.stopped.set()
    thread.join(WAIT_S)

    # Then the list drops it once the record expired, and prunes its id from the index
    poll_until(lambda: dramaturg.workers() == [], "the silent worker to drop off", timeout=WAIT_S)
    assert registry.client(broker).smembers(f"{broker.namespace}:__worker_ids__") == set()  # type: ignore[attr-defined]


def test_without_a_state_store_the_list_says_what_to_set(request: pytest.FixtureRequest) -> None:
    # Given RabbitMQ without [state] url
    server = request.getfixturevalue("rabbitmq_server")
    dramaturg.bootstrap(dramaturg.Settings(broker={"url": f"amqp://guest:guest@{server.host}:{server.port}/%2F"}))

    # When the workers are listed, then the error names the setting
    with pytest.raises(dramaturg.StateUnavailable, match=r"set \[state\] url"):
        dramaturg.workers()


@pytest.mark.parametrize("broker_kind", ["rabbitmq", "redis"])
def test_the_workers_command_lists_a_worker_process_until_it_stops(
    settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path, spawn: Callable[..., Process]
) -> None:
    # Given a worker process started through the CLI for the shop's actors
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])
    worker = spawn([bin_path("dramaturg"), "worker", "--processes", "1", "--threads", "3"], PYTHONPATH=str(REPO))
    worker.wait_for_line("Worker process is ready for action.")

    def listed() -> list[dict[str, object]]:
        done = run_cli([bin_path("dramaturg"), "workers", "--json"], cwd=tmp_path, PYTHONPATH=str(REPO))
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout))

    # When the workers are listed, as JSON and as a table
    (record,) = poll_until(listed, "the worker process to be listed", timeout=WAIT_S)
    text = run_cli([bin_path("dramaturg"), "workers"], cwd=tmp_path, PYTHONPATH=str(REPO))

    # Then it is a live process of this host other than this one, on the shop's queue, with 3 threads
    assert record["host"] == socket.gethostname()
    pid = record["pid"]
    assert isinstance(pid, int) and pid != os.getpid()
    os.kill(pid, 0)  # it exists
    assert "imports" in record["queues"] and record["threads"] == 3 and record["running"] == 0  # type: ignore[operator]
    header, row = text.stdout.splitlines()
    assert header.split() == ["host", "pid", "queues", "running", "started", "last", "seen"]
    assert row.split()[:2] == [socket.gethostname(), str(pid)] and " 0/3 " in row

    # When the worker is stopped (SIGTERM), it is no longer listed
    assert worker.stop() == 0, worker.output
    assert listed() == []


def test_the_workers_command_without_a_state_store_is_one_line_and_exit_78(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server = request.getfixturevalue("rabbitmq_server")
    (tmp_path / "dramaturg.toml").write_text(f'[broker]\nurl = "amqp://guest:guest@{server.host}:{server.port}/%2F"\n')
    done = run_cli([bin_path("dramaturg"), "workers"], cwd=tmp_path)
    assert done.returncode == 78
    assert done.stderr.strip().splitlines() == [
        "dramaturg: configuration error: the worker list needs a state store, and the rabbitmq broker has none"
        ' of its own: set [state] url = "redis://..." (or DRAMATURG_STATE_URL)'
    ]
