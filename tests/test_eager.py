"""One test module, two modes: these tests pass with the queue switched off (eager: tasks
run inside send()) and on RabbitMQ, Redis and embedded, written with dramaturg's own
pytest plugin (dramaturg.testing) as a user would write them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg.brokers.eager import EagerBroker

from .apps.simulated import busy
from .conftest import broker_url, delete_rabbitmq_queues

MODES = ("eager", "rabbitmq", "redis", "embedded")


@pytest.fixture(params=MODES)
def dramaturg_settings(request: pytest.FixtureRequest, tmp_path: Path) -> dramaturg.Settings:
    """The plugin's settings fixture, overridden: each test runs in every mode."""
    url = "eager://" if request.param == "eager" else broker_url(request.param, request, tmp_path)
    return dramaturg.Settings(broker={"url": url, "namespace": f"test-{uuid.uuid4().hex[:8]}"})


@pytest.fixture
def dramaturg_broker(dramaturg_settings: dramaturg.Settings) -> Iterator[dramatiq.Broker]:
    """The plugin's broker fixture, plus deleting this test's RabbitMQ queues afterwards."""
    broker = dramaturg.bootstrap(dramaturg_settings)
    yield broker
    if dramaturg_settings.broker.url and dramaturg_settings.broker.url.startswith("amqp"):
        delete_rabbitmq_queues(broker)
    dramaturg.shutdown()


Runner = Callable[..., None]


def test_a_task_runs_with_its_arguments_and_context(dramaturg_worker: Any, wait_for_tasks: Runner) -> None:
    ran: list[tuple[int, str]] = []

    @dramaturg.actor(queue_name="shop")
    def reindex(product_id: int) -> None:
        ran.append((product_id, dramaturg.current_task().context["store"]))

    with dramaturg.context(store="fr"):
        reindex.send(42)
    wait_for_tasks("shop")

    assert ran == [(42, "fr")]


def test_a_failing_task_is_retried_until_it_succeeds(dramaturg_worker: Any, wait_for_tasks: Runner) -> None:
    attempts: list[int] = []

    @dramaturg.actor(queue_name="shop", max_retries=3, min_backoff=10, max_backoff=20)
    def flaky() -> None:
        attempts.append(dramaturg.current_task().attempt)
        if len(attempts) < 3:
            raise ConnectionError("mail server busy")

    flaky.send()
    wait_for_tasks("shop")

    assert attempts == [1, 2, 3]


def test_a_held_task_is_reported_not_lost(dramaturg_worker: Any, wait_for_tasks: Runner, held: Any) -> None:
    @dramaturg.actor(queue_name="shop")
    def import_row(row: dict[str, str]) -> None:
        if not row.get("email"):
            dramaturg.current_task().hold(f"row {row['id']} has no email")

    with pytest.raises(dramaturg.TaskHeld, match="row 7 has no email") as raised:
        import_row.send({"id": "7", "email": ""})
        wait_for_tasks("shop")

    assert raised.value.task.reason == "row 7 has no email"
    assert [task.reason for task in held.list("shop")] == ["row 7 has no email"]


def test_a_task_past_its_ttr_is_interrupted_and_held(dramaturg_worker: Any, wait_for_tasks: Runner) -> None:
    @dramaturg.actor(queue_name="shop", ttr=200, max_retries=0)
    def stuck() -> None:
        busy(3_600)  # simulated work that does not end in time; the ttr interrupts it

    with pytest.raises(dramaturg.TaskHeld, match="TTR exceeded"):
        stuck.send()
        wait_for_tasks("shop")


def test_follow_up_tasks_run_and_inherit_the_context(dramaturg_worker: Any, wait_for_tasks: Runner) -> None:
    ran: list[str] = []

    @dramaturg.actor(queue_name="shop")
    def import_user(email: str) -> None:
        ran.append(f"import {email}")
        send_welcome.send(email)

    @dramaturg.actor(queue_name="mail")
    def send_welcome(email: str) -> None:
        ran.append(f"welcome {email} in {dramaturg.current_task().context['store']}")

    with dramaturg.context(store="de"):
        import_user.send("ada@example.com")
    wait_for_tasks("shop", "mail")

    assert ran == ["import ada@example.com", "welcome ada@example.com in de"]


def test_an_async_actor_runs_in_its_context(dramaturg_worker: Any, wait_for_tasks: Runner) -> None:
    ran: list[str] = []

    @dramaturg.actor(queue_name="shop")
    async def notify(email: str) -> None:
        ran.append(f"{email} in {dramaturg.current_task().context['store']}")

    with dramaturg.context(store="at"):
        notify.send("ada@example.com")
    wait_for_tasks("shop")

    assert ran == ["ada@example.com in at"]


def test_switching_modes_is_configuration_only(dramaturg_broker: dramatiq.Broker, dramaturg_worker: Any) -> None:
    eager = isinstance(dramaturg_broker, EagerBroker)
    assert (dramaturg_worker is None) == eager
    if eager:
        with pytest.raises(dramaturg.DramaturgError, match="the eager broker has no queue to consume"):
            dramatiq.Worker(dramaturg_broker, worker_threads=1).start()
