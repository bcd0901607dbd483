"""Draining queues for a time budget (cron mode), on every broker."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import dramatiq
import pytest

import dramaturg
from dramaturg.middleware import shutdown

from .conftest import bin_path, pending_messages, run_cli, write_config

REPO = Path(__file__).resolve().parents[1]


def test_a_budget_of_two_seconds_over_ten_thousand_tasks(broker: dramatiq.Broker) -> None:
    # Given 10,000 short tasks (3 ms each: more than 8 threads get through in 2 s)
    ran: Counter[int] = Counter()
    lock = threading.Lock()

    @dramaturg.actor(queue_name="nightly")
    def reindex(n: int) -> None:
        time.sleep(0.003)  # stands for 3 ms of work
        with lock:
            ran[n] += 1

    sent = 10_000
    for n in range(sent):
        reindex.send(n)

    # When a drain runs with a 2 s budget and a 1 s grace
    started = time.monotonic()
    summary = dramaturg.drain(["nightly"], budget=2_000, grace=1_000, threads=8)
    elapsed = time.monotonic() - started

    # Then it stopped within budget + grace (+ the time to hand back what it held, on a loaded
    # machine)
    assert elapsed < 2.0 + 1.0 + 4.0, summary
    # and every task is either done, once, or still waiting: no duplicates, no loss
    assert max(ran.values()) == 1
    assert summary.processed == len(ran)
    assert summary.processed + summary.left == sent, summary
    assert summary.left == pending_messages(broker, "nightly")
    assert 0 < summary.processed < sent
    assert summary.line().startswith(f"drained nightly in {summary.seconds:.1f} s: {summary.processed:,} processed")


def test_until_empty_stops_early_and_counts_outcomes(broker: dramatiq.Broker) -> None:
    @dramaturg.actor(queue_name="nightly", max_retries=0)
    def sync(n: int) -> None:
        if n % 10 == 0:
            dramaturg.current_task().hold(f"row {n} is bad")

    for n in range(100):
        sync.send(n)

    summary = dramaturg.drain(["nightly"], until_empty=True, budget=60_000)

    assert summary.seconds < 30
    assert (summary.processed, summary.held, summary.retried, summary.left) == (90, 10, 0, 0)


def test_a_task_still_running_at_the_grace_limit_is_requeued_untouched(broker: dramatiq.Broker) -> None:
    started = threading.Event()
    attempts: list[int] = []

    @dramaturg.actor(queue_name="nightly", ttr=60_000)
    def slow() -> None:
        attempts.append(dramaturg.current_task().attempt)
        started.set()
        while True:
            time.sleep(0.01)  # runs until interrupted

    message = slow.send()

    summary = dramaturg.drain(["nightly"], budget=500, grace=300, threads=1)

    assert started.is_set()
    assert (summary.processed, summary.released, summary.left) == (0, 1, 1)
    # it waits on its queue again, with its attempt not counted
    assert pending_messages(broker, "nightly") == 1
    assert dramaturg.held_tasks().get(message.message_id) is None
    assert attempts == [1]


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_the_drain_command(settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path) -> None:
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])
    for n in range(20):  # sent as another process would, without the actor module
        dramaturg.get_broker().enqueue(
            dramatiq.Message(queue_name="imports", actor_name="import_user", args=({"id": n},), kwargs={}, options={})
        )

    result = run_cli(
        [bin_path("dramaturg"), "drain", "imports", "--until-empty", "--budget", "60s", "--json"],
        cwd=tmp_path,
        PYTHONPATH=str(REPO),
    )

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])  # after the actor's own prints
    assert (summary["processed"], summary["left"], summary["queues"]) == (20, 0, ["imports"])
    assert pending_messages(broker, "imports") == 0


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_threads_a_drain_left_stuck_do_not_hold_back_a_later_drain(
    settings: dramaturg.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a drain that ended while its 8 tasks were stuck in C code past its grace:
    # their threads take the interrupt only when the call returns, after the drain
    # stopped waiting for them (the worker's shutdown_timeout and the wait after the
    # interrupt are short here)
    worker = settings.worker.model_copy(update={"shutdown_timeout": 200})
    dramaturg.bootstrap(settings.model_copy(update={"worker": worker}))
    monkeypatch.setattr(shutdown, "INTERRUPTED_JOIN_S", 0.2)
    stuck_threads: list[threading.Thread] = []

    @dramaturg.actor(queue_name="nightly", ttr=60_000)
    def stuck() -> None:
        stuck_threads.append(threading.current_thread())
        time.sleep(4)  # one call in C: no interrupt lands before it returns

    for _ in range(8):
        stuck.send()
    dramaturg.drain(["nightly"], budget=300, grace=0, threads=8)
    assert any(thread.is_alive() for thread in stuck_threads), "the tasks were meant to outlast the drain"
    for thread in stuck_threads:  # each took its interrupt (its task is put back) and is gone
        thread.join(10)
        assert not thread.is_alive()

    # When a later drain in the same process runs (its threads get the gone threads'
    # ids: the C library reuses a thread's stack, and its id with it)
    ran: list[int] = []

    @dramaturg.actor(queue_name="morning")
    def report(n: int) -> None:
        ran.append(n)

    for n in range(50):
        report.send(n)
    summary = dramaturg.drain(["morning"], until_empty=True, budget=20_000, threads=8)

    # Then it runs every task once: none is put back as if its thread were stopping
    assert sorted(ran) == list(range(50))
    assert (summary.processed, summary.released, summary.left) == (50, 0, 0), summary


def test_grace_zero_ends_the_drain_soon_though_a_task_is_stuck_in_c_code(
    broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a task stuck in one call into C (it takes no interrupt until that returns), and
    # the default worker.shutdown_timeout of 10 minutes (the wait after the interrupt is
    # short here)
    monkeypatch.setattr(shutdown, "INTERRUPTED_JOIN_S", 0.2)
    started = threading.Event()
    stuck_threads: list[threading.Thread] = []

    @dramaturg.actor(queue_name="nightly", ttr=60_000)
    def stuck() -> None:
        stuck_threads.append(threading.current_thread())
        started.set()
        time.sleep(6)  # one call in C

    stuck.send()

    # When a drain with no grace spends its budget
    summary = dramaturg.drain(["nightly"], budget=500, grace=0, threads=1)

    # Then it ends within budget + grace + a small bound, not when the task does
    assert started.is_set()
    assert summary.seconds < 0.5 + 0 + 3.0, summary
    assert stuck_threads[0].is_alive(), "the drain waited for the stuck task"
    stuck_threads[0].join(10)  # it takes its interrupt when the call returns, and is put back
    assert not stuck_threads[0].is_alive()
    assert summary.processed == 0
    # and the task waits on its queue once, to run again: put back by its thread, or
    # taken back by RabbitMQ when the drain closed its channel, not both
    assert pending_messages(broker, "nightly") == 1
