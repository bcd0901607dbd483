"""Code written for Dramatiq keeps working: what Dramatiq's own test suite found
(``make compat``), checked here on dramaturg's brokers.

Retries, callbacks, result backends and the stub broker's join behave as they do under
Dramatiq's ``Retries``, where dramaturg does not say otherwise
(docs/coming-from-dramatiq.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import dramatiq
import dramatiq.worker
import pytest
from dramatiq.errors import RateLimitExceeded
from dramatiq.results import ResultFailure, Results
from dramatiq.results.backends import StubBackend

import dramaturg
from dramaturg.middleware import priority, ttr
from dramaturg.middleware.outcomes import backoff_ms
from dramaturg.status import state_store

from .conftest import Runs, pending_messages, poll_until


@pytest.fixture
def stub_broker() -> dramatiq.Broker:
    return dramaturg.bootstrap(dramaturg.Settings(broker={"url": "stub://"}))


@pytest.fixture
def stub_worker(stub_broker: dramatiq.Broker) -> Iterator[dramatiq.Worker]:
    worker = dramatiq.Worker(stub_broker, worker_threads=2, worker_timeout=100)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(autouse=True)
def warnings_not_given_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    """The once-per-actor warnings about ignored options, as in a fresh process."""
    monkeypatch.setattr(ttr, "_warned", set(), raising=False)
    monkeypatch.setattr(priority, "_warned", set(), raising=False)


# -- backoff ------------------------------------------------------------------------------


def test_a_max_backoff_below_min_backoff_caps_the_backoff() -> None:
    # Given the inherited 15 s minimum and an actor's max_backoff of 200 ms
    # Then every retry waits at most 200 ms, as on Dramatiq
    assert {backoff_ms(retries, 15_000, 200) for retries in range(5)} == {200}
    # And within the range, the minimum is still a real minimum
    assert all(1_000 <= backoff_ms(0, 1_000, 60_000) <= 1_500 for _ in range(50))


def test_an_actor_with_a_small_max_backoff_retries_fast(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    # Given an actor that always fails, written for Dramatiq's fast retries
    attempts = Runs()

    @dramatiq.actor(queue_name="fidelity", max_backoff=200, max_retries=2)
    def always_fails() -> None:
        attempts.add(time.monotonic())
        raise RuntimeError("boom")

    # When it runs
    always_fails.send()
    worker = start_worker()

    # Then its three attempts take well under the inherited 15 s minimum backoff (Dramatiq: 0.4 s)
    runs = attempts.wait(3, timeout=10)
    worker.join()
    worker.stop()
    assert runs[-1] - runs[0] < 5
    # And the task is held once its retries are used up; nothing is left on the queue
    assert dramaturg.held_tasks().count("fidelity") == 1
    assert pending_messages(broker, "fidelity") == 0


# -- what the on_failure callbacks and the retry copy see -----------------------------------


def test_on_failure_callbacks_see_dramatiqs_retry_count(
    broker_kind: str, broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    # Given a failure callback and an actor that fails every time
    seen = Runs()

    @dramatiq.actor(queue_name="fidelity")
    def on_failed(message_data: dict[str, Any], exception_data: dict[str, Any]) -> None:
        seen.add(message_data["options"].get("retries"))

    @dramatiq.actor(queue_name="fidelity", max_retries=2, max_backoff=50, on_failure=on_failed.actor_name)
    def always_fails() -> None:
        raise RuntimeError("boom")

    # When it runs until it is held
    message = always_fails.send()
    worker = start_worker()

    # Then each callback saw the failed attempts so far, as Dramatiq's Retries counts them
    assert seen.wait(3) == [1, 2, 3]
    worker.join()
    worker.stop()
    # And the held task, and its record in the state store (none beside RabbitMQ here), still say it ran 3 times
    [held] = dramaturg.held_tasks().list("fidelity")
    assert held.attempts == 3
    if broker_kind != "rabbitmq":
        record = poll_until(
            lambda: (r := state_store().get(message.message_id)) and r["state"] == "held" and r, "the record says held"
        )
        assert record["attempt"] == 3
    assert pending_messages(broker, "fidelity") == 0


def test_a_retried_message_carries_dramatiqs_requeue_timestamp_and_traceback(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    # Given an actor that fails on its first attempt and reads its options on the second
    options = Runs()

    @dramatiq.actor(queue_name="fidelity", max_retries=1, max_backoff=50)
    def fails_once() -> None:
        task = dramaturg.current_task()
        if task.attempt == 1:
            raise ValueError("first attempt fails")
        options.add(dict(task.message.options))

    # When it runs twice
    before_ms = int(time.time() * 1000)
    fails_once.send()
    worker = start_worker()
    [second] = options.wait(1)
    worker.join()
    worker.stop()

    # Then the retry carries the options Dramatiq's Retries sets
    assert second["retries"] == 1
    assert before_ms <= second["requeue_timestamp"] <= int(time.time() * 1000)
    assert second["traceback"].startswith("Traceback (most recent call last)")
    assert "ValueError: first attempt fails" in second["traceback"]
    assert pending_messages(broker, "fidelity") == 0


# -- result backends ------------------------------------------------------------------------


def test_a_held_task_reports_its_failure_to_dramatiqs_result_backend(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    # Given Dramatiq's Results middleware and an actor that stores results and fails for good
    backend = StubBackend()
    broker.add_middleware(Results(backend=backend))

    @dramatiq.actor(queue_name="fidelity", store_results=True, max_retries=0)
    def fails() -> None:
        raise RuntimeError("failed")

    # When it runs and is held
    message = fails.send()
    worker = start_worker()

    # Then waiting for its result raises ResultFailure at once, as for a dead-lettered task on Dramatiq
    with pytest.raises(ResultFailure) as failure:
        message.get_result(backend=backend, block=True, timeout=10_000)
    assert str(failure.value) == "actor raised RuntimeError: failed"
    worker.join()
    worker.stop()
    assert dramaturg.held_tasks().count("fidelity") == 1


# -- the stub broker --------------------------------------------------------------------------


def test_stub_join_reraises_the_exception_of_a_held_task(
    stub_broker: dramatiq.Broker, stub_worker: dramatiq.Worker
) -> None:
    # Given a Dramatiq-style unit test of an actor that fails
    class CustomError(Exception):
        pass

    @dramatiq.actor(max_retries=0)
    def fails() -> None:
        raise CustomError("well")

    fails.send()

    # When it joins the queue, fail_fast as by default, Then the actor's exception is raised
    with pytest.raises(CustomError, match="well"):
        stub_broker.join(fails.queue_name)  # type: ignore[attr-defined]
    # But not with fail_fast=False
    stub_broker.join(fails.queue_name, fail_fast=False)  # type: ignore[attr-defined]
    # And no more once the held task is purged
    assert dramaturg.held_tasks().purge("default") == 1
    stub_broker.join(fails.queue_name)  # type: ignore[attr-defined]


def test_stub_flush_all_empties_the_held_store(stub_broker: dramatiq.Broker, stub_worker: dramatiq.Worker) -> None:
    @dramatiq.actor(max_retries=0)
    def fails() -> None:
        raise RuntimeError("no")

    fails.send()
    with pytest.raises(RuntimeError):
        stub_broker.join(fails.queue_name)  # type: ignore[attr-defined]

    stub_broker.flush_all()  # type: ignore[attr-defined]

    assert dramaturg.held_tasks().count() == 0
    stub_broker.join(fails.queue_name)  # type: ignore[attr-defined]


def test_dramatiqs_queue_prefetch_applies_when_the_worker_boots(stub_broker: dramatiq.Broker) -> None:
    # Given Dramatiq's prefetch, set (as its tests patch it) after the broker was built
    with mock.patch.object(dramatiq.worker, "QUEUE_PREFETCH", 20):
        worker = dramatiq.Worker(stub_broker, worker_threads=1, worker_timeout=100)
        worker.start()
        try:
            # Then the worker prefetches that many, as on Dramatiq
            assert worker.queue_prefetch == 20
        finally:
            worker.stop()


# -- log lines and warnings ---------------------------------------------------------------------


def test_a_rate_limited_task_is_retried_with_a_debug_line(
    stub_broker: dramatiq.Broker, stub_worker: dramatiq.Worker, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an actor that hits a rate limit once
    runs = Runs()

    @dramatiq.actor(max_backoff=10)
    def limited() -> None:
        runs.add(1)
        if len(runs.seen) == 1:
            raise RateLimitExceeded("exceeded")

    # When it runs
    caplog.set_level(logging.DEBUG, logger="dramaturg.outcomes")
    limited.send()
    runs.wait(2)
    stub_broker.join(limited.queue_name)  # type: ignore[attr-defined]

    # Then its retry is logged at DEBUG, as Dramatiq logs a rate limit, and nothing louder
    lines = [r for r in caplog.records if r.name == "dramaturg.outcomes"]
    assert [r.levelno for r in lines] == [logging.DEBUG]
    assert "RateLimitExceeded: exceeded" in lines[0].getMessage()


def test_a_message_time_limit_is_warned_about(stub_broker: dramatiq.Broker, caplog: pytest.LogCaptureFixture) -> None:
    @dramatiq.actor
    def slow() -> None: ...

    # When a message is sent with Dramatiq's time_limit, twice
    slow.send_with_options(time_limit=1_000)
    slow.send_with_options(time_limit=1_000)

    # Then one warning says it is ignored and what to write instead
    [line] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "time_limit=1000 is ignored" in line.getMessage()
    assert "ttr=" in line.getMessage()


@pytest.mark.parametrize("broker_kind", ["rabbitmq"])
def test_an_explicit_broker_priority_is_warned_about(broker: dramatiq.Broker, caplog: pytest.LogCaptureFixture) -> None:
    @dramatiq.actor(queue_name="fidelity")
    def urgent() -> None: ...

    # When a message is sent with a RabbitMQ priority of its own
    urgent.send_with_options(broker_priority=9)
    urgent.send_with_options(broker_priority=9)

    # Then one warning says it is replaced by the priority band, and what to write instead
    [line] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "broker_priority=9 is replaced" in line.getMessage()
    assert "priority=" in line.getMessage()
    assert pending_messages(broker, "fidelity") == 2
