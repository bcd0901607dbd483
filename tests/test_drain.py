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

    # Then it stopped within budget + grace (+ the time to hand back what it held)
    assert elapsed < 2.0 + 1.0 + 2.0, summary
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
