"""SIGTERM in the middle of a burst: nothing lost, only interrupted tasks run twice."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import dramatiq
import pytest

import dramaturg
from dramaturg import app

from .conftest import Process, bin_path, pending_messages, poll_until, write_config

REPO = Path(__file__).resolve().parents[1]


def wait_for_lines(path: Path, prefix: str, count: int, timeout: float = 30.0) -> None:
    """Wait until a worker process has written ``count`` lines starting with ``prefix``."""

    def enough() -> bool:
        return path.exists() and sum(line.startswith(prefix) for line in path.read_text().splitlines()) >= count

    poll_until(enough, f"{count} {prefix!r} lines in {path}", timeout)


def test_sigterm_mid_burst_loses_nothing_and_reruns_only_interrupted_tasks(
    settings: dramaturg.Settings,
    broker: dramatiq.Broker,
    tmp_path: Path,
    spawn: Callable[..., Process],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given 200 tasks of 20 ms, every 25th of which takes 3 s (so it is still running
    # when the worker stops), and a worker with half a second of grace
    from tests.apps import burst_tasks

    app.register(burst_tasks.step)  # declared at the first import; isolated_app forgets it after each test
    burst_tasks.ENDED.clear()
    write_config(tmp_path, settings, modules=["tests.apps.burst_tasks"], shutdown_timeout="500ms")
    sent = 200
    long_ones = {n for n in range(sent) if n % 25 == 0}
    for n in range(sent):
        burst_tasks.step.send(n, 3.0 if n in long_ones else 0.02)
    log = tmp_path / "burst.log"
    worker = spawn([bin_path("dramaturg"), "worker", "-p", "2", "-t", "4"], PYTHONPATH=str(REPO), BURST_LOG=str(log))

    # When it gets SIGTERM in the middle of the burst
    worker.wait_for_line("Worker process is ready for action.")
    wait_for_lines(log, "end ", 40)
    assert worker.stop() == 0, worker.output

    # Then what ended plus what waits on the queue is exactly what was sent
    lines = log.read_text().splitlines()
    ended = {int(m[1]) for line in lines if (m := re.fullmatch(r"end (\d+)", line))}
    assert len(ended) + pending_messages(broker, "burst") == sent
    # and tasks were interrupted (only long ones), each requeued with a line saying so;
    # another worker process, still stopping, may have run some of them again already
    requeued = [line for line in worker.lines if "interrupted as its worker stopped; requeued untouched" in line]
    assert requeued
    reruns_logged = sum("runs again: it was interrupted when a worker stopped" in line for line in worker.lines)

    # When the rest is processed (recorded in the same log)
    monkeypatch.setenv("BURST_LOG", str(log))
    with caplog.at_level(logging.WARNING, logger="dramaturg.outcomes"):
        summary = dramaturg.drain(["burst"], until_empty=True, budget=120_000)

    # Then every task ended exactly once
    assert summary.left == 0
    lines = log.read_text().splitlines()
    starts = Counter(int(m[1]) for line in lines if (m := re.fullmatch(r"start (\d+)", line)))
    ends = Counter(int(m[1]) for line in lines if (m := re.fullmatch(r"end (\d+)", line)))
    assert ends == Counter(range(sent))
    # and only interrupted tasks ran more than once: one extra start per interruption
    assert {n for n, count in starts.items() if count > 1} <= long_ones
    assert sum(starts.values()) - sent == len(requeued)
    # and each re-run said so
    reruns_logged += sum("runs again: it was interrupted" in r.getMessage() for r in caplog.records)
    assert reruns_logged == len(requeued)


def test_a_doubled_sigterm_still_stops_gracefully(
    settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path, spawn: Callable[..., Process]
) -> None:
    # Given a worker whose whole process group gets SIGTERM (as systemd and `timeout` do),
    # so each worker process gets it twice: directly and forwarded by the main process
    import os
    import signal

    write_config(tmp_path, settings, modules=["tests.apps.burst_tasks"], shutdown_timeout="5s")
    worker = spawn([bin_path("dramaturg"), "worker", "-p", "1", "-t", "2"], PYTHONPATH=str(REPO))
    worker.wait_for_line("Worker process is ready for action.")

    os.killpg(worker.popen.pid, signal.SIGTERM)

    # Then it shuts down cleanly instead of hanging or being killed half-way
    assert worker.popen.wait(timeout=30) == 0, worker.output
    assert "Killing worker process" not in worker.output
    assert "Worker has been shut down." in worker.output
