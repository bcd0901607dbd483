"""Worker recycling: a worker process past max_tasks_per_child or max_memory_mb starts
afresh, on RabbitMQ, Redis and embedded, without losing or repeating a task."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import dramatiq
import pytest

import dramaturg
from dramaturg import app

from .conftest import Process, bin_path, pending_messages, write_config
from .test_shutdown import wait_for_lines

REPO = Path(__file__).resolve().parents[1]


def read_log(path: Path) -> list[tuple[str, int, str, int, float]]:
    """(event, n, incarnation, pid, resident MiB) for each line the actor wrote."""
    rows = []
    for line in path.read_text().splitlines():
        event, n, incarnation, pid, mb = line.split()
        rows.append((event, int(n), incarnation, int(pid), float(mb)))
    return rows


def run_leaky_worker(
    tmp_path: Path, spawn: Callable[..., Process], tasks: int, flags: list[str]
) -> tuple[Process, list[tuple[str, int, str, int, float]]]:
    log = tmp_path / "leak.log"
    worker = spawn(
        [bin_path("dramaturg"), "worker", "-p", "1", "-t", "2", *flags], PYTHONPATH=str(REPO), LEAK_LOG=str(log)
    )
    wait_for_lines(log, "end ", tasks, timeout=60)
    return worker, read_log(log)


def test_a_worker_past_max_tasks_per_child_starts_afresh(
    settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path, spawn: Callable[..., Process]
) -> None:
    # Given 20 tasks and a worker process allowed 5 tasks (set in the config file)
    from tests.apps import leaky_tasks

    app.register(leaky_tasks.leak)  # declared at the first import; isolated_app forgets it after each test
    write_config(tmp_path, settings, modules=["tests.apps.leaky_tasks"], max_tasks_per_child=5)
    for n in range(20):
        leaky_tasks.leak.send(n, 1)

    # When the worker runs them all
    worker, rows = run_leaky_worker(tmp_path, spawn, 20, [])

    # Then every task started and ended exactly once
    assert Counter(n for event, n, *_ in rows if event == "start") == Counter(range(20))
    assert Counter(n for event, n, *_ in rows if event == "end") == Counter(range(20))
    # in at least four fresh interpreters, none running more than its 5 plus the one
    # its other thread was running when it reached the limit
    per_incarnation = Counter(incarnation for event, _, incarnation, *_ in rows if event == "end")
    assert len(per_incarnation) >= 4, per_incarnation
    assert max(per_incarnation.values()) <= 5 + 1, per_incarnation
    # replaced in place: the same pid, and Dramatiq's main process never saw a worker exit
    assert len({pid for *_, pid, _ in rows}) == 1
    assert worker.popen.poll() is None
    assert worker.output.count("recycles: it has run") >= len(per_incarnation) - 1
    assert "exited unexpectedly" not in worker.output
    # and it still stops cleanly, leaving nothing behind
    assert worker.stop() == 0, worker.output
    assert pending_messages(broker, "leaky") == 0


# The memory limit only decides when; how a worker starts afresh is the same as above,
# tested there on every broker.
@pytest.mark.parametrize("broker_kind", ["redis"])
def test_a_worker_over_max_memory_mb_starts_afresh(
    settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path, spawn: Callable[..., Process]
) -> None:
    # Given tasks that each keep 8 MiB for good, and a worker process allowed 40 MiB
    # more than it uses at boot (given as a command-line flag)
    from tests.apps import leaky_tasks

    app.register(leaky_tasks.leak)
    write_config(tmp_path, settings, modules=["tests.apps.leaky_tasks"])
    leaky_tasks.leak.send(-1, 0)  # measures the worker's own footprint
    probe, [(_, _, _, _, boot_mb), *_] = run_leaky_worker(tmp_path, spawn, 1, [])
    assert probe.stop() == 0
    (tmp_path / "leak.log").unlink()
    limit = int(boot_mb) + 40
    for n in range(30):
        leaky_tasks.leak.send(n, 8)

    # When the worker runs them
    worker, rows = run_leaky_worker(tmp_path, spawn, 30, ["--max-memory-mb", str(limit)])

    # Then it started afresh whenever it went over the limit, so its memory stayed bounded:
    # checked after every 8th task at the latest, with two threads, it overshoots by at
    # most 9 tasks' worth
    assert Counter(n for event, n, *_ in rows if event == "end") == Counter(range(30))
    incarnations = {incarnation for _, _, incarnation, *_ in rows}
    assert len(incarnations) >= 2, rows
    assert max(mb for *_, mb in rows) <= limit + 9 * 8, (limit, rows)
    assert f"(worker.max_memory_mb = {limit})" in worker.output
    assert worker.stop() == 0, worker.output
    assert pending_messages(broker, "leaky") == 0
