"""RabbitMQ's consumer_timeout: what happens when a task outlives it, and the warnings
that come before. RabbitMQ only: Redis has no delivery timeout (a dead worker's messages
come back through heartbeats, see test_recovery)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest

import dramaturg

from .conftest import Runs, delete_rabbitmq_queues, pending_messages

pytestmark = pytest.mark.parametrize("broker_kind", ["rabbitmq"])

SHORT_TIMEOUT_MS = 2_000


@pytest.fixture
def short_consumer_timeout(request: pytest.FixtureRequest) -> Iterator[int]:
    """The private node's consumer_timeout set to 2 s (and checked every 200 ms) for new channels."""
    server = request.getfixturevalue("rabbitmq_server")

    def erl(expression: str) -> str:
        return str(server.rabbitctl_output("eval", expression)).strip()

    before = {key: erl(f"application:get_env(rabbit, {key}).") for key in ("consumer_timeout", "channel_tick_interval")}
    assert all(value.startswith("{ok,") for value in before.values()), before
    erl(f"application:set_env(rabbit, consumer_timeout, {SHORT_TIMEOUT_MS}).")
    erl("application:set_env(rabbit, channel_tick_interval, 200).")
    try:
        yield SHORT_TIMEOUT_MS
    finally:
        for key, value in before.items():  # "{ok,1800000}": channels read both on every tick
            erl(f"application:set_env(rabbit, {key}, {value[4:-1]}).")


def test_a_task_outliving_consumer_timeout_runs_again_logged_and_nothing_is_lost(
    short_consumer_timeout: int,
    settings: dramaturg.Settings,
    broker: dramatiq.Broker,
    start_worker: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a task that runs past the server's consumer_timeout (it waits for its own
    # second run), and two quick ones
    runs = Runs()
    second_run = threading.Event()
    first_run_done = threading.Event()

    @dramaturg.actor(queue_name="slowq")
    def slow(n: int) -> None:
        task = dramaturg.current_task()
        runs.record(n=n, id=task.message_id)
        if n == 0 and sum(run["n"] == 0 for run in runs.seen) == 1:
            # the first run: still working when RabbitMQ's timeout passes
            assert second_run.wait(30), "RabbitMQ never redelivered the task"
            first_run_done.set()

    original = slow.message(0)
    broker.enqueue(original)
    slow.send(1)
    slow.send(2)

    # When a worker runs them
    with caplog.at_level(logging.INFO):
        worker = start_worker(threads=2)
        seen = runs.wait(3, timeout=30)
        # RabbitMQ closes the channel and gives task 0 back; it runs a second time
        reruns = runs.wait(4, timeout=30)
        second_run.set()
        assert first_run_done.wait(30)
        worker.join()
        worker.stop()

    # Then task 0 ran twice (the same message), the others once: nothing lost
    assert sorted(run["n"] for run in reruns) == [0, 0, 1, 2], seen
    assert {run["id"] for run in reruns if run["n"] == 0} == {original.message_id}
    # and every step was logged: the closed channel, the redelivery, the late finish
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert any(
        level == logging.ERROR and "RabbitMQ closed the channel of queue 'slowq'" in text and "consumer_timeout" in text
        for level, text in messages
    ), messages
    assert any(f"(message {original.message_id}) was delivered again" in text for _, text in messages)
    assert any(
        f"(message {original.message_id}) finished after RabbitMQ closed the channel it came on" in text
        for _, text in messages
    )
    # and nothing is left behind on the queue, nothing held
    assert pending_messages(broker, "slowq") == 0
    assert dramaturg.held_tasks().count("slowq") == 0


def test_workers_warn_at_boot_about_ttrs_and_backoffs_past_consumer_timeout(
    settings: dramaturg.Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a server whose consumer_timeout is 1 minute, an actor with a 2-minute ttr,
    # one whose retries back off up to 5 minutes, and one within both
    told = settings.model_copy(update={"broker": settings.broker.model_copy(update={"consumer_timeout": 60_000})})
    broker = dramaturg.bootstrap(told)

    @dramaturg.actor(queue_name="limits", ttr=120_000, max_backoff=30_000)
    def long_runner() -> None: ...

    @dramaturg.actor(queue_name="limits", ttr=30_000, max_backoff=300_000)
    def slow_retrier() -> None: ...

    @dramaturg.actor(queue_name="limits", ttr=30_000, max_backoff=30_000)
    def fine() -> None: ...

    # When a worker boots
    with caplog.at_level(logging.WARNING, logger="dramaturg.rabbitmq"):
        worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
        worker.start()
        worker.stop()
        # and a message is sent with a delay past the timeout
        fine.send_with_options(delay=120_000)
    delete_rabbitmq_queues(broker)

    # Then each problem is named with its actor, its value and the timeout
    lines = [r.getMessage() for r in caplog.records]
    assert any("actor 'long_runner': its ttr (2m) exceeds RabbitMQ's consumer_timeout (1m" in line for line in lines)
    assert any("actor 'slow_retrier': its retries wait up to 5m (max_backoff)" in line for line in lines)
    assert not any("'fine'" in line for line in lines if "actor" in line)
    assert any(line.startswith("fine: a delay of 2m exceeds RabbitMQ's consumer_timeout (1m") for line in lines)
