"""SIGTERM in the middle of a burst: nothing lost, only interrupted tasks run twice."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg import app

from .chaos.harness import read_events
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


def log_time(line: str) -> float:
    """The time (``time.time()``) of a Dramatiq worker log line, to the millisecond above."""
    stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", line)
    assert stamp, line
    return datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() + 0.001


def test_no_task_starts_once_a_worker_process_got_its_stop_signal(
    settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path, spawn: Callable[..., Process]
) -> None:
    # Given a worker process of four threads busy with a stream of 20 ms tasks
    from tests.apps import chaos_tasks

    app.register(chaos_tasks.work)  # declared at the first import; isolated_app forgets it after each test
    write_config(tmp_path, settings, modules=["tests.apps.chaos_tasks"], shutdown_timeout="5s")
    sent = [chaos_tasks.work.send(n, 0.02).message_id for n in range(2000)]
    runs = tmp_path / "runs"
    runs.mkdir()
    worker = spawn(
        [bin_path("dramaturg"), "worker", "-p", "1", "-t", "4"], PYTHONPATH=str(REPO), CHAOS_LOG_DIR=str(runs)
    )
    ready = worker.wait_for_line("Worker process is ready for action.")
    poll_until(lambda: sum(e.event == "end" for e in read_events(runs)) >= 40, "40 tasks ended")

    # When it gets SIGTERM. (Dramatiq's worker process looks at its stop flag once a second,
    # counted from that line: the signal comes 0.3 s into such a second, so that before the
    # fix its threads went on starting tasks for 0.7 s.)
    ready_at = log_time(ready)
    target = ready_at + int(time.time() - ready_at + 1) + 0.3
    time.sleep(max(0.0, target - time.time()))  # a point on a clock: nothing to wait on
    assert worker.stop(timeout=60) == 0, worker.output

    # Then no task started after the worker process logged that it stops (it stops its
    # threads before saying so; 50 ms allow for a thread that had just begun one)
    [pid] = {e.pid for e in read_events(runs)}
    signalled = log_time(worker.wait_for_line(f"[PID {pid}] [MainThread] [dramatiq.WorkerProcess(0)] [INFO] Stopping"))
    events = read_events(runs)
    late = [
        f"{e.message_id} +{e.at - signalled:.3f} s" for e in events if e.event == "start" and e.at > signalled + 0.05
    ]
    assert not late, f"{len(late)} tasks started after the stop signal: {late[:5]}"
    # and every task ran at most once, to its end; the rest waits on the queue
    starts = Counter(e.message_id for e in events if e.event == "start")
    ended = {e.message_id for e in events if e.event == "end"}
    assert set(starts) == ended and max(starts.values()) == 1
    poll_until(lambda: len(ended) + pending_messages(broker, "chaos") == len(sent), "every task ended or queued")


class ConnectionUse:
    """Records each time two threads are inside one pika connection at once. pika's
    connections are not thread-safe: that made a stopping RabbitMQ worker hang for good,
    or broke pika's state ("pop from an empty deque")."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from pika.adapters.blocking_connection import BlockingConnection

        self.lock = threading.Lock()
        self.inside: dict[Any, Counter[threading.Thread]] = {}
        self.overlaps: list[str] = []
        flush = BlockingConnection._flush_output  # every wait on the connection goes through it

        def watched(connection: Any, *waiters: Any) -> None:
            me = threading.current_thread()
            with self.lock:
                users = self.inside.setdefault(connection, Counter())
                others = [thread.name for thread, depth in users.items() if depth and thread is not me]
                if others:
                    self.overlaps.append(f"{me.name} while {', '.join(others)} was in it")
                users[me] += 1
            try:
                flush(connection, *waiters)
            finally:
                with self.lock:
                    users[me] -= 1

        monkeypatch.setattr(BlockingConnection, "_flush_output", watched)


@pytest.mark.parametrize("broker_kind", ["rabbitmq"])
def test_a_rabbitmq_stop_shorter_than_the_consumers_poll_ends_soon_and_gives_back_what_it_took(
    broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker whose consumer polls RabbitMQ for 5 s at a time and has taken far more
    # tasks than its two threads run
    use = ConnectionUse(monkeypatch)
    ended: list[int] = []
    enough = threading.Event()

    @dramaturg.actor(queue_name="stopping")
    def step(n: int) -> None:
        time.sleep(0.02)
        ended.append(n)
        if len(ended) >= 10:
            enough.set()

    for n in range(100):
        step.send(n)
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=5_000)
    worker.start()
    assert enough.wait(30)

    # When it stops, giving its consumer 100 ms (less than its poll) to leave
    stopper = threading.Thread(target=worker.stop, kwargs={"timeout": 100}, daemon=True)
    began = time.monotonic()
    stopper.start()
    stopper.join(30)

    # Then the stop ends soon: it neither hangs nor waits out the poll, since no two
    # threads ever use one connection at once
    assert not stopper.is_alive(), "the worker's stop hung"
    assert use.overlaps == []
    assert time.monotonic() - began < 3.0
    # and every task not run is back on the queue
    poll_until(lambda: len(ended) + pending_messages(broker, "stopping") == 100, "every task ended or queued again")
    assert len(set(ended)) == len(ended)
