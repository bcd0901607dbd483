"""SuspendQueue: a handler stops its worker taking tasks from its queue for a while,
on RabbitMQ, Redis and embedded; the task goes back untouched and nothing is lost."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg import suspension

from .conftest import Runs, pending_messages

DELAY_MS = 1_500


def test_a_suspended_queue_waits_while_other_queues_go_on(
    broker: dramatiq.Broker, start_worker: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    # Given a mail queue whose first task finds the mail server down, and another queue
    runs = Runs()
    down = [True]

    @dramaturg.actor(queue_name="mail")
    def send_mail(n: int) -> None:
        task = dramaturg.current_task()
        runs.record(kind="mail", n=n, attempt=task.attempt, at=time.monotonic())
        if down[0]:
            down[0] = False
            raise dramaturg.SuspendQueue(DELAY_MS, reason="mail server down")

    @dramaturg.actor(queue_name="other")
    def other(n: int) -> None:
        runs.record(kind="other", n=n, at=time.monotonic())

    for n in range(6):
        send_mail.send(n)
    for n in range(5):
        other.send(n)

    # When one worker thread runs both queues (so the order of events is the worker's own)
    with caplog.at_level(logging.INFO, logger="dramaturg.outcomes"):
        worker = start_worker(threads=1)
        seen = runs.wait(6 + 1 + 5, timeout=30)
        worker.join()
        worker.stop()

    mail = [run for run in seen if run["kind"] == "mail"]
    others = [run for run in seen if run["kind"] == "other"]
    suspended_at = mail[0]["at"]
    # Then no mail task started during the suspension
    assert all(run["at"] >= suspended_at + DELAY_MS / 1000 for run in mail[1:]), mail
    # while the other queue's tasks all ran in it
    assert len(others) == 5
    assert all(run["at"] < suspended_at + DELAY_MS / 1000 for run in others), (suspended_at, others)
    # and the task that suspended the queue ran again, untouched (still its first attempt)
    first = mail[0]["n"]
    assert [run["attempt"] for run in mail if run["n"] == first] == [1, 1]
    # and every mail task ran to the end exactly once; nothing is left, nothing held
    assert sorted(run["n"] for run in mail[1:]) == list(range(6))
    assert pending_messages(broker, "mail") == 0
    assert dramaturg.held_tasks().count("mail") == 0
    # and the suspension was logged with its reason
    lines = [r.getMessage() for r in caplog.records if "suspended queue 'mail'" in r.getMessage()]
    assert len(lines) == 1
    assert f"for {DELAY_MS} ms: mail server down; the task is requeued untouched" in lines[0]


def test_suspend_queue_takes_durations() -> None:
    assert dramaturg.SuspendQueue("5m").delay_ms == 300_000
    assert dramaturg.SuspendQueue(timedelta(seconds=2)).delay_ms == 2_000
    assert dramaturg.SuspendQueue(250, reason="down").reason == "down"
    with pytest.raises(ValueError, match="more than 0"):
        dramaturg.SuspendQueue(0)
    with pytest.raises(ValueError, match="'soon' is not a duration"):
        dramaturg.SuspendQueue("soon")
    assert not issubclass(dramaturg.SuspendQueue, Exception)  # a handler's `except Exception` cannot swallow it


def test_suspensions_end_and_a_longer_one_wins() -> None:
    suspension.suspend("mail", 60_000)
    suspension.suspend("mail", 10)  # shorter: the longer one stays
    assert 59 < suspension.remaining_s("mail") <= 60
    assert suspension.remaining_s("other") == 0.0
    suspension.suspend("brief", 1)
    deadline = time.monotonic() + 0.002
    while time.monotonic() < deadline:  # a 1 ms suspension: spin past it rather than sleep
        pass
    assert suspension.remaining_s("brief") == 0.0
    assert set(suspension.suspended()) == {"mail"}


def test_in_eager_mode_a_suspended_queue_holds_the_task_instead() -> None:
    # Given the queue switched off: there is no queue to leave alone, and the caller waits
    dramaturg.bootstrap(dramaturg.Settings(broker={"url": "eager://"}))

    @dramaturg.actor(queue_name="mail")
    def send_mail() -> None:
        raise dramaturg.SuspendQueue("5m", reason="mail server down")

    # When it suspends its queue, then the caller learns it at once, and nothing is lost
    started = time.monotonic()
    with pytest.raises(dramaturg.TaskHeld, match="queue 'mail' suspended for 300000 ms: mail server down"):
        send_mail.send()
    assert time.monotonic() - started < 5
    assert dramaturg.held_tasks().count("mail") == 1
    assert suspension.suspended() == {}
