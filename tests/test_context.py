"""Store context: captured at send, restored around the handler, kept through retries,
holds, kicks and delays, isolated between threads; on RabbitMQ, Redis and embedded."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import dramatiq
import pytest

import dramaturg

from .apps.simulated import busy
from .conftest import Runs

store_var: ContextVar[str] = ContextVar("store_var")


def test_a_task_runs_in_the_context_it_was_sent_in(broker: dramatiq.Broker, start_worker: Callable[..., Any]) -> None:
    # Given an application contextvar bound to the task context
    dramaturg.bind_contextvar("store", store_var)
    runs = Runs()

    @dramaturg.actor(queue_name="ctx")
    def reindex(product_id: int) -> None:
        runs.record(
            product=product_id,
            context=dict(dramaturg.current_task().context),
            store=store_var.get("unset"),
            current=dict(dramaturg.current_context()),
        )

    # When one task is sent from the French store with a request id, and one with none
    token = store_var.set("fr")
    try:
        with dramaturg.context(locale="fr_FR", request_id="r-1"):
            reindex.send(42)
    finally:
        store_var.reset(token)
    reindex.send(43)
    worker = start_worker(threads=1)
    seen = runs.wait(2)
    worker.join()

    # Then the first ran in the French store, the second in none: nothing carried over
    by_product = {run["product"]: run for run in seen}
    french = {"store": "fr", "locale": "fr_FR", "request_id": "r-1"}
    assert by_product[42] == {"product": 42, "context": french, "store": "fr", "current": french}
    assert by_product[43] == {"product": 43, "context": {}, "store": "unset", "current": {}}


def test_context_survives_retry_hold_kick_and_delay_and_follow_ups_inherit_it(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="ctx", max_retries=3, min_backoff=10, max_backoff=20)
    def flaky() -> None:
        task = dramaturg.current_task()
        runs.record(step=f"attempt {task.attempt} kick {task.kicks}", context=dict(task.context))
        if task.attempt == 1 and task.kicks == 0:
            task.retry(delay=50)
        if task.kicks == 0:
            task.hold("look at it")
        with dramaturg.context(step="follow-up"):  # adds to what the task carries
            follow_up.send_with_options(delay=50)

    @dramaturg.actor(queue_name="ctx")
    def follow_up() -> None:
        runs.record(step="follow-up", context=dict(dramaturg.current_task().context))

    with dramaturg.context(store="de"):
        message = flaky.send()
    worker = start_worker()
    runs.wait(2)  # attempt 1 (retried), attempt 2 (held)
    worker.join()

    held = dramaturg.held_tasks().get(message.message_id, "ctx")
    assert held is not None and held.context == {"store": "de"}
    # A kick from somewhere with a context of its own does not change the task's
    with dramaturg.context(store="us"):
        assert dramaturg.held_tasks().kick("ctx", [message.message_id]) == 1
    seen = runs.wait(4)
    worker.join()

    assert [run["step"] for run in seen] == ["attempt 1 kick 0", "attempt 2 kick 0", "attempt 1 kick 1", "follow-up"]
    assert [run["context"] for run in seen[:3]] == [{"store": "de"}] * 3
    assert seen[3]["context"] == {"store": "de", "step": "follow-up"}


def test_two_threads_running_tasks_of_two_stores_see_only_their_own(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    dramaturg.bind_contextvar("store", store_var)
    both_running = threading.Barrier(2, timeout=20)
    runs = Runs()

    @dramaturg.actor(queue_name="ctx")
    def report(expected: str) -> None:
        both_running.wait()  # each thread is inside its task while the other is in its own
        runs.record(expected=expected, context=dramaturg.current_task().context["store"], var=store_var.get())

    for store in ("fr", "de"):
        with dramaturg.context(store=store):
            report.send(store)
    worker = start_worker(threads=2)
    seen = runs.wait(2)
    worker.join()

    assert sorted(seen, key=lambda run: run["expected"]) == [
        {"expected": "de", "context": "de", "var": "de"},
        {"expected": "fr", "context": "fr", "var": "fr"},
    ]


def test_an_async_actor_runs_in_its_context(broker: dramatiq.Broker, start_worker: Callable[..., Any]) -> None:
    dramaturg.bind_contextvar("store", store_var)
    runs = Runs()

    @dramaturg.actor(queue_name="ctx")
    async def notify() -> None:
        runs.record(context=dict(dramaturg.current_task().context), var=store_var.get("unset"))

    with dramaturg.context(store="it"):
        notify.send()
    worker = start_worker()
    [run] = runs.wait(1)
    worker.join()
    assert run == {"context": {"store": "it"}, "var": "it"}


def test_the_context_is_cleared_after_a_failed_task(broker: dramatiq.Broker, start_worker: Callable[..., Any]) -> None:
    dramaturg.bind_contextvar("store", store_var)
    runs = Runs()

    @dramaturg.actor(queue_name="ctx", max_retries=0)
    def fails() -> None:
        runs.record(var=store_var.get("unset"))
        raise RuntimeError("boom")

    @dramaturg.actor(queue_name="ctx")
    def after() -> None:
        runs.record(var=store_var.get("unset"), context=dict(dramaturg.current_context()))

    with dramaturg.context(store="nl"):
        fails.send()
    worker = start_worker(threads=1)
    runs.wait(1)
    after.send()
    seen = runs.wait(2)
    worker.join()
    assert seen == [{"var": "nl"}, {"var": "unset", "context": {}}]


def test_a_context_that_is_not_json_fails_in_the_sender(broker: dramatiq.Broker) -> None:
    @dramaturg.actor(queue_name="ctx")
    def anything() -> None: ...

    # checked as the context is entered, before anything is sent
    with (
        pytest.raises(dramaturg.SendError, match=r"context value 'user' = <object .*> is not JSON"),
        dramaturg.context(user=object()),
    ):
        anything.send()

    dramaturg.context_provider(lambda: {"tenant": {1, 2}})
    with pytest.raises(dramaturg.SendError, match=r"sending anything: context value 'tenant' = \{1, 2\} is not JSON"):
        anything.send()


def test_a_configured_default_and_named_providers_apply(
    settings: dramaturg.Settings, start_worker: Callable[..., Any]
) -> None:
    configured = settings.model_copy(
        update={
            "context": dramaturg.Settings(
                context={"default": {"store": "default", "locale": "en"}, "providers": ["tests.test_context:tenant"]}
            ).context
        }
    )
    broker = dramaturg.bootstrap(configured)
    runs = Runs()

    @dramaturg.actor(queue_name="ctx")
    def show() -> None:
        runs.record(context=dict(dramaturg.current_task().context))

    show.send()
    with dramaturg.context(store="fr"):
        show.send()
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        seen = runs.wait(2)
        worker.join()
    finally:
        worker.stop()
    assert [run["context"] for run in seen] == [
        {"store": "default", "locale": "en", "tenant": "acme"},
        {"store": "fr", "locale": "en", "tenant": "acme"},
    ]


def tenant() -> dict[str, str]:
    """A provider named in the config of the test above."""
    return {"tenant": "acme"}


def test_a_failing_provider_stops_the_send_instead_of_sending_without_context(broker: dramatiq.Broker) -> None:
    @dramaturg.actor(queue_name="ctx")
    def anything() -> None: ...

    def broken_tenant() -> dict[str, str]:
        raise LookupError("no tenant in this request")

    dramaturg.context_provider(broken_tenant)
    with pytest.raises(dramaturg.SendError, match=r"context provider .*broken_tenant failed: LookupError: no tenant"):
        anything.send()
    assert broker.pending("ctx") == 0  # type: ignore[attr-defined]


def test_context_survives_a_ttr_interrupt(broker: dramatiq.Broker, start_worker: Callable[..., Any]) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="ctx", ttr=200, max_retries=1, min_backoff=10, max_backoff=20)
    def slow_once() -> None:
        task = dramaturg.current_task()
        runs.record(attempt=task.attempt, context=dict(task.context))
        if task.attempt == 1:
            busy(60)  # simulated work past the ttr: the interrupt lands here

    with dramaturg.context(store="se"):
        slow_once.send()
    worker = start_worker()
    seen = runs.wait(2)
    worker.join()
    assert seen == [{"attempt": 1, "context": {"store": "se"}}, {"attempt": 2, "context": {"store": "se"}}]


def test_pipeline_steps_and_callbacks_inherit_the_context(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="ctx")
    def first() -> int:
        runs.record(step="first", context=dict(dramaturg.current_task().context))
        return 1

    @dramaturg.actor(queue_name="ctx")
    def second(value: int) -> None:
        runs.record(step="second", context=dict(dramaturg.current_task().context))

    @dramaturg.actor(queue_name="ctx")
    def done(message_data: dict[str, Any], result: Any) -> None:
        runs.record(step="callback", context=dict(dramaturg.current_task().context))

    with dramaturg.context(store="pt"):
        dramatiq.pipeline([first.message(), second.message()]).run()
        first.send_with_options(on_success=done)
    worker = start_worker()
    seen = runs.wait(4)
    worker.join()
    assert all(run["context"] == {"store": "pt"} for run in seen), seen
    assert sorted(run["step"] for run in seen) == ["callback", "first", "first", "second"]


def test_a_failing_restorer_fails_the_task_instead_of_running_it_in_the_wrong_context(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    failures = [1]

    def flaky_restorer(values: Any) -> None:
        if failures:
            failures.pop()
            raise RuntimeError("tenant database unreachable")

    dramaturg.context_restorer(flaky_restorer)
    runs = Runs()

    @dramaturg.actor(queue_name="ctx", max_retries=2, min_backoff=10, max_backoff=20)
    def work() -> None:
        runs.record(attempt=dramaturg.current_task().attempt)

    with dramaturg.context(store="fi"):
        work.send()
    worker = start_worker()
    seen = runs.wait(1)
    worker.join()
    assert seen == [{"attempt": 2}]  # attempt 1 never reached the handler
