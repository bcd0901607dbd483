"""Prometheus metrics: a worker group's counts by queue, actor and outcome, summed over its
processes and served on loopback, on RabbitMQ, Redis and embedded."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dramatiq
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

import dramaturg
from dramaturg.middleware.metrics import Metrics

from .conftest import Process, bin_path, free_port, pending_messages, poll_until, run_cli, write_config

REPO = Path(__file__).resolve().parents[1]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples | None:
    """Every sample served at the metrics endpoint, by name and labels (None: not up yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def select(samples: Samples, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples called ``name`` whose labels include ``labels``, by all their labels."""
    return {
        key: value for (sample, key), value in samples.items() if sample == name and set(labels.items()) <= set(key)
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(select(samples, name, **labels).values())


def test_a_worker_group_counts_each_outcome_per_actor_and_serves_the_sums_on_loopback(
    settings: dramaturg.Settings,
    broker: dramatiq.Broker,
    tmp_path: Path,
    spawn: Callable[..., Process],
    observed_project: Any,
) -> None:
    # Given tasks that succeed, fail once and then succeed, hold, exceed their TTR and
    # touch, and two that meet: each waits until the other has started
    observed_tasks = observed_project
    for n in range(2):
        observed_tasks.meet.send(n)
    for n in range(5):
        observed_tasks.ok.send(n)
    for n in range(3):
        observed_tasks.flaky.send(n)
    for n in range(2):
        observed_tasks.parked.send(n)
    observed_tasks.stuck.send(0)
    for n in range(2):
        observed_tasks.toucher.send(n)
    settled = 2 + 5 + 3 * 2 + 2 + 1 + 2  # flaky runs twice

    # When two worker processes of one thread each, holding one message at a time (so
    # that the two meeting tasks run in different processes), run them with metrics on
    port = free_port()
    log = tmp_path / "observe.log"
    worker = spawn(
        [bin_path("dramaturg"), "worker", "-p", "2", "-t", "1", "--metrics-port", str(port)],
        PYTHONPATH=str(REPO),
        OBSERVE_LOG=str(log),
        DRAMATURG_BROKER_PREFETCH="1",
    )
    # Each run's outcome and duration are two updates: a scrape between them (another
    # process's, a moment later) sees one without the other, so both are waited for.
    samples = poll_until(
        lambda: (
            (s := scrape(port)) is not None
            and value(s, "dramaturg_tasks_total") >= settled
            and value(s, "dramaturg_task_duration_seconds_count") >= settled
            and s
        ),
        f"{settled} settled tasks and their durations counted at :{port}/metrics",
        timeout=90,
    )

    # Then both processes did work, and the one endpoint sums what each counted
    pids = [line.split()[1] for line in log.read_text().splitlines()]
    assert len(set(pids)) == 2, (pids, worker.output)
    outcomes = {
        (dict(labels)["actor"], dict(labels)["outcome"]): count
        for labels, count in select(samples, "dramaturg_tasks_total", queue="observed").items()
    }
    assert outcomes == {
        ("meet", "succeeded"): 2,
        ("ok", "succeeded"): 5,
        ("flaky", "retried"): 3,
        ("flaky", "succeeded"): 3,
        ("parked", "held"): 2,
        ("stuck", "held"): 1,
        ("toucher", "succeeded"): 2,
    }, worker.output
    failures = {
        (dict(labels)["actor"], dict(labels)["exception"]): count
        for labels, count in select(samples, "dramaturg_task_failures_total").items()
    }
    assert failures == {("flaky", "ValueError"): 3, ("stuck", "TimeToRunExceeded"): 1}, worker.output
    assert select(samples, "dramaturg_ttr_exceeded_total") == {(("actor", "stuck"), ("queue", "observed")): 1}
    assert select(samples, "dramaturg_touches_total") == {(("actor", "toucher"), ("queue", "observed")): 6}
    # one duration per run, the interrupted one at least as long as its TTR
    runs = {actor: value(samples, "dramaturg_task_duration_seconds_count", actor=actor) for actor, _ in outcomes}
    assert runs == {"meet": 2, "ok": 5, "flaky": 6, "parked": 2, "stuck": 1, "toucher": 2}
    assert value(samples, "dramaturg_task_duration_seconds_sum", actor="stuck") >= 0.3
    assert value(samples, "dramaturg_task_duration_seconds_bucket", actor="stuck", le="0.25") == 0

    # and the endpoint listens on loopback only
    listening = [
        conn.laddr
        for conn in psutil.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
    ]
    assert [address.ip for address in listening] == ["127.0.0.1"]

    # and it stops cleanly with the workers, leaving nothing behind
    assert worker.stop() == 0, worker.output
    poll_until(lambda: scrape(port) is None, "the metrics server to stop")
    assert pending_messages(broker, "observed") == 0


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_metrics_under_dramatiqs_own_cli(
    settings: dramaturg.Settings,
    broker: dramatiq.Broker,
    tmp_path: Path,
    spawn: Callable[..., Process],
    observed_project: Any,
) -> None:
    # Given metrics switched on in the environment, and `dramatiq dramaturg.worker`
    observed_tasks = observed_project
    for n in range(3):
        observed_tasks.ok.send(n)
    port = free_port()
    worker = spawn(
        [bin_path("dramatiq"), "dramaturg.worker", "-p", "1", "-t", "2"],
        PYTHONPATH=str(REPO),
        DRAMATURG_WORKER_METRICS_PORT=str(port),
    )

    # Then its worker counts, and the server it forks serves the counts
    samples = poll_until(
        lambda: (s := scrape(port)) is not None and value(s, "dramaturg_tasks_total") >= 3 and s,
        "3 tasks counted",
        timeout=60,
    )
    assert value(samples, "dramaturg_tasks_total", actor="ok", outcome="succeeded") == 3
    # counted in a directory of this worker group's own, private, removed when it stops
    directory = Path(tempfile.gettempdir()) / f"dramaturg-metrics-{worker.popen.pid}"
    assert any(directory.glob("counter_*.db"))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert worker.stop() == 0, worker.output
    poll_until(lambda: not directory.exists(), f"{directory} removed")


PLANTS = {
    "writable by others": ('mkdir -m 777 "$D"', "can be written by group or others (mode 777)"),
    "holding a link": (
        'mkdir -m 700 "$D" && ln -s "$VICTIM" "$D/counter_1.db"',
        "holds a symbolic link (counter_1.db)",
    ),
    "a link itself": ('ln -s "$VICTIM_DIR" "$D"', "is a symbolic link"),
    **(
        {"another user's": ('mkdir -m 755 "$D" && chown 4242 "$D"', "belongs to another user (uid 4242)")}
        if os.geteuid() == 0  # only root can give a directory away
        else {}
    ),
}


@pytest.mark.parametrize("broker_kind", ["redis"])
@pytest.mark.parametrize("plant", PLANTS)
def test_a_metrics_directory_someone_else_prepared_is_refused(
    plant: str, settings: dramaturg.Settings, tmp_path: Path, spawn: Callable[..., Process]
) -> None:
    # Given the directory `dramatiq dramaturg.worker` counts in made ahead of it in the
    # shared temporary directory (its name is predictable: the main process's pid), with
    # a file of someone else's that a link in it points to
    write_config(tmp_path, settings)
    shared = tmp_path / "tmp"
    shared.mkdir(mode=0o1777)
    victim = tmp_path / "victim" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("keep me")
    script, problem = PLANTS[plant]
    shell = f'D="$TMPDIR/dramaturg-metrics-$$"; {script} && exec "$0" dramaturg.worker -p 1 -t 1'  # exec: same pid

    # When the worker starts with metrics on
    worker = spawn(
        ["sh", "-c", shell, bin_path("dramatiq")],
        TMPDIR=str(shared),
        VICTIM=str(victim),
        VICTIM_DIR=str(victim.parent),
        DRAMATURG_WORKER_METRICS_PORT=str(free_port()),
    )

    # Then it refuses, in one line naming the directory and why; nothing is written there
    worker.popen.wait(timeout=60)  # exits by itself (stop() would signal it)
    assert worker.stop() == 78, worker.output  # and every line it printed is read
    assert "Traceback" not in worker.output
    [line] = [line for line in worker.output.splitlines() if "[dramaturg.worker]" in line]
    assert f"metrics directory {shared}/dramaturg-metrics-" in line and problem in line
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in victim.parent.iterdir()) == ["precious.txt"]


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_a_metrics_port_in_use_is_one_clear_line(settings: dramaturg.Settings, tmp_path: Path) -> None:
    write_config(tmp_path, settings)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = run_cli([bin_path("dramaturg"), "worker", "--metrics-port", str(port)], cwd=tmp_path)

    assert result.returncode == 78
    assert result.stderr.strip() == (
        f"dramaturg: configuration error: worker.metrics_port: cannot listen on 127.0.0.1:{port}:"
        " Address already in use; choose another port (from env DRAMATURG_WORKER_METRICS_PORT)"
    )


def test_metrics_are_off_unless_a_port_is_set() -> None:
    from dramaturg.middleware import framework_middleware

    def metrics(**worker: object) -> list[Metrics]:
        stack = framework_middleware(dramaturg.Settings(broker={"type": "stub"}, worker=worker))
        return [m for m in stack if isinstance(m, Metrics)]

    assert metrics() == []
    [on] = metrics(metrics_port=9191)
    assert (on.host, on.port) == ("127.0.0.1", 9191)
