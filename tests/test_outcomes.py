"""Outcomes inside a handler (success, retry, hold) and what becomes of the message,
on RabbitMQ, Redis and embedded."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg.middleware import Outcomes
from dramaturg.task import RunOutcome, current_task_or_none, run_of

from .conftest import Runs, pending_messages, poll_until


def settled(worker: dramatiq.Worker) -> None:
    """Wait until the worker has acknowledged (or rejected) everything it took."""
    worker.join()


def test_success_ends_the_handler_and_acks(broker: dramatiq.Broker, start_worker: Callable[..., Any]) -> None:
    runs = Runs()
    after_success: list[str] = []

    @dramaturg.actor(queue_name="outcomes")
    def finish(order_id: int) -> None:
        task = dramaturg.current_task()
        runs.record(id=task.message_id, actor=task.actor_name, queue=task.queue_name, attempt=task.attempt)
        task.success()
        after_success.append("ran")  # must never happen

    message = finish.send(5)
    worker = start_worker()

    [run] = runs.wait(1)
    settled(worker)
    worker.stop()
    assert run == {"id": message.message_id, "actor": "finish", "queue": "outcomes", "attempt": 1}
    assert after_success == []
    assert pending_messages(broker, "outcomes") == 0
    assert dramaturg.held_tasks().count("outcomes") == 0


def test_retry_runs_again_after_the_delay_with_the_next_attempt(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="outcomes", max_retries=3)
    def flaky() -> None:
        task = dramaturg.current_task()
        runs.record(attempt=task.attempt, at=time.monotonic(), id=task.message_id)
        if task.attempt == 1:
            task.retry(delay=600)

    message = flaky.send()
    worker = start_worker()

    first, second = runs.wait(2)
    settled(worker)
    worker.stop()
    assert [first["attempt"], second["attempt"]] == [1, 2]
    assert first["id"] == second["id"] == message.message_id
    assert second["at"] - first["at"] >= 0.6
    assert pending_messages(broker, "outcomes") == 0
    assert dramaturg.held_tasks().count("outcomes") == 0


def test_retries_count_toward_max_retries_then_the_task_is_held(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="outcomes", max_retries=2)
    def always_busy(user_id: int) -> None:
        runs.record(attempt=dramaturg.current_task().attempt)
        dramaturg.current_task().retry(delay=10)

    message = always_busy.send(7)
    worker = start_worker()

    runs.wait(3)
    settled(worker)
    held = dramaturg.held_tasks().get(message.message_id, "outcomes")
    assert [run["attempt"] for run in runs.seen] == [1, 2, 3]
    assert held is not None
    assert held.reason == "retries exhausted"
    assert held.attempts == 3
    assert held.args == [7]


def test_an_exception_is_retried_with_backoff_and_held_when_retries_run_out(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="outcomes", max_retries=2, min_backoff=20, max_backoff=100)
    def broken(row: dict[str, Any]) -> None:
        runs.record(attempt=dramaturg.current_task().attempt)
        raise ValueError(f"bad row {row['id']}")

    message = broken.send({"id": 3})
    worker = start_worker()

    runs.wait(3)
    settled(worker)
    held = dramaturg.held_tasks().get(message.message_id)
    assert held is not None
    assert held.reason == "retries exhausted"
    assert (held.exception_type, held.exception_message) == ("ValueError", "bad row 3")
    assert held.origin is not None and held.origin.startswith(__file__)
    assert "raise ValueError" in (held.traceback or "")
    assert len(runs.seen) == 3


def test_hold_parks_the_task_with_everything_needed_to_examine_it(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="imports", max_retries=5)
    def import_user(row: dict[str, Any], *, source: str) -> None:
        runs.record(attempt=dramaturg.current_task().attempt)
        if not row.get("email"):
            dramaturg.current_task().hold("row has no email")

    before = int(time.time() * 1000)
    message = import_user.send({"id": 9}, source="shop.csv")
    worker = start_worker()

    runs.wait(1)
    settled(worker)
    worker.stop()
    held = dramaturg.held_tasks().get(message.message_id, "imports")
    assert held is not None
    assert (held.message_id, held.queue_name, held.actor_name) == (message.message_id, "imports", "import_user")
    assert (held.args, held.kwargs) == ([{"id": 9}], {"source": "shop.csv"})
    assert held.reason == "row has no email"
    assert held.attempts == 1 and held.kicks == 0
    assert held.enqueued_at == message.message_timestamp
    assert before <= held.held_at <= int(time.time() * 1000)
    assert (held.host, held.pid) == (socket.gethostname(), os.getpid())
    assert held.origin is not None and held.origin.startswith(__file__)
    # it is never run again, and nothing is left on the queue
    assert len(runs.seen) == 1
    assert pending_messages(broker, "imports") == 0


def test_hold_on_exceptions_are_held_at_once(broker: dramatiq.Broker, start_worker: Callable[..., Any]) -> None:
    class InvalidRow(Exception):
        pass

    runs = Runs()

    @dramaturg.actor(queue_name="outcomes", max_retries=5, hold_on=(InvalidRow,))
    def strict() -> None:
        runs.record(attempt=dramaturg.current_task().attempt)
        raise InvalidRow("email 'x@' is malformed")

    message = strict.send()
    worker = start_worker()

    runs.wait(1)
    settled(worker)
    held = dramaturg.held_tasks().get(message.message_id, "outcomes")
    assert held is not None
    assert held.reason == "InvalidRow: email 'x@' is malformed"
    assert held.attempts == 1
    assert len(runs.seen) == 1


def test_except_exception_in_the_handler_cannot_swallow_an_outcome(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="outcomes")
    def careless() -> None:
        runs.record(attempt=dramaturg.current_task().attempt)
        try:
            dramaturg.current_task().hold("parked despite the except")
        except Exception:
            runs.record(swallowed=True)

    message = careless.send()
    worker = start_worker()

    runs.wait(1)
    settled(worker)
    held = dramaturg.held_tasks().get(message.message_id, "outcomes")
    assert held is not None and held.reason == "parked despite the except"
    assert runs.seen == [{"attempt": 1}]


def test_a_kicked_task_runs_again_with_a_fresh_retry_budget(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="outcomes", max_retries=1)
    def needs_fixing(user_id: int) -> None:
        task = dramaturg.current_task()
        runs.record(attempt=task.attempt, kicks=task.kicks)
        if task.kicks == 0:
            task.retry(delay=10)

    message = needs_fixing.send(1)
    worker = start_worker()
    runs.wait(2)
    settled(worker)
    store = dramaturg.held_tasks()
    assert store.get(message.message_id, "outcomes") is not None

    # When it is kicked
    assert store.kick("outcomes", [message.message_id]) == 1

    # Then it runs again from attempt 1, knowing it was kicked once, and is held no more
    runs.wait(3)
    settled(worker)
    assert runs.seen[2] == {"attempt": 1, "kicks": 1}
    assert store.count("outcomes") == 0, [(t.actor_name, t.reason) for t in store.list("outcomes")]


def test_a_pipeline_stops_at_a_held_or_retried_task(broker: dramatiq.Broker, start_worker: Callable[..., Any]) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="outcomes", max_retries=0)
    def first(n: int) -> int:
        runs.record(step="first", n=n)
        if n == 1:
            dramaturg.current_task().hold("stop here")
        if n == 2:
            dramaturg.current_task().retry(delay=10)
        return dramaturg.current_task().success(n * 10)

    @dramaturg.actor(queue_name="outcomes")
    def second(value: int) -> None:
        runs.record(step="second", value=value)

    worker = start_worker()
    dramatiq.pipeline([first.message(1), second.message()]).run()
    dramatiq.pipeline([first.message(2), second.message()]).run()
    dramatiq.pipeline([first.message(3), second.message()]).run()

    runs.wait(4)
    settled(worker)
    steps = sorted((run["step"], run.get("n") or run.get("value")) for run in runs.seen)
    # success() passes its value down the pipeline; hold and (exhausted) retry do not
    assert steps == [("first", 1), ("first", 2), ("first", 3), ("second", 30)]


def test_an_async_handler_has_its_task_and_outcomes(broker: dramatiq.Broker, start_worker: Callable[..., Any]) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="outcomes")
    async def fetch(url: str) -> None:
        task = dramaturg.current_task()
        runs.record(attempt=task.attempt, id=task.message_id)
        task.hold(f"{url} answered 410 Gone")

    message = fetch.send("https://example.com/feed")
    worker = start_worker()

    [run] = runs.wait(1)
    settled(worker)
    held = dramaturg.held_tasks().get(message.message_id, "outcomes")
    assert run == {"attempt": 1, "id": message.message_id}
    assert held is not None and held.reason == "https://example.com/feed answered 410 Gone"


def test_every_failure_logs_one_line_with_where_why_and_what_next(
    broker: dramatiq.Broker, start_worker: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="outcomes", max_retries=1, min_backoff=10, max_backoff=10)
    def failing(n: int) -> None:
        runs.record(attempt=dramaturg.current_task().attempt)
        raise KeyError("sku-17")

    with caplog.at_level(logging.INFO):
        message = failing.send(1)
        worker = start_worker()
        runs.wait(2)
        settled(worker)

    lines = [r for r in caplog.records if r.name == "dramaturg.outcomes"]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.ERROR]
    retry_line, held_line = (r.getMessage() for r in lines)
    assert retry_line.startswith(
        f"failing failed (message {message.message_id}, attempt 1 of 2): KeyError: 'sku-17' at "
    )
    assert f"{__file__}:" in retry_line
    assert retry_line.endswith("; retrying in 10 ms")
    assert held_line.endswith("; held: retries exhausted")
    assert lines[0].dramaturg["origin"].startswith(__file__)  # type: ignore[attr-defined]
    # Dramatiq's own multi-line error for the same failure is not repeated
    assert not [r for r in caplog.records if r.getMessage().startswith("Failed to process message")]


def test_current_task_outside_a_handler_is_a_clear_error() -> None:
    with pytest.raises(dramaturg.NotInTask, match="outside a task handler"):
        dramaturg.current_task()
    assert current_task_or_none() is None  # for code that runs inside and outside handlers


def test_a_middleware_reads_what_became_of_each_run(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given a middleware of the application's before Outcomes (its after-hook runs after
    # Outcomes' and sees the outcome), and three tasks: one returns, one holds, one fails
    # with no retries left
    seen: dict[str, tuple[Any, ...]] = {}

    class Watch(dramatiq.Middleware):
        def after_process_message(
            self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
        ) -> None:
            run = run_of(message)
            assert run is not None
            seen[message.message_id] = (run.outcome, run.reason, run.error, run.started <= time.monotonic())

    broker.add_middleware(Watch(), before=Outcomes)
    handles: list[Any] = []

    @dramaturg.actor(queue_name="outcomes", max_retries=0)
    def check(row: int) -> None:
        task = dramaturg.current_task()
        handles.append((current_task_or_none() is task, task.started_at <= time.monotonic()))
        if row == 2:
            task.hold("row 2 has no email")
        if row == 3:
            raise ValueError("row 3 is not a number")

    ok, parked, broken = (check.send(row).message_id for row in (1, 2, 3))
    worker = start_worker()
    poll_until(lambda: len(seen) == 3, "three runs settled")
    settled(worker)
    worker.stop()

    # Then each run's record says what became of it: nothing to decide for the one that
    # returned, held with its reason for the others, and the error the third raised
    assert seen[ok] == (None, None, None, True)
    assert seen[parked] == (RunOutcome.HELD, "row 2 has no email", None, True)
    outcome, reason, error, _ = seen[broken]
    assert (outcome, reason) == (RunOutcome.HELD, "retries exhausted")
    assert error is not None and error.startswith("ValueError: row 3 is not a number (at ")
    # and the handler saw its own handle either way
    assert handles == [(True, True)] * 3
    # sent 3 == succeeded 1 + held 2 + still queued 0
    assert dramaturg.held_tasks().count("outcomes") == 2
    assert pending_messages(broker, "outcomes") == 0
