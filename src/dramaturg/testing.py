"""A pytest plugin for testing an application's tasks (registered on install).

::

    # test_signup.py
    from shop.tasks import send_welcome

    def test_signup_sends_a_welcome(dramaturg_worker, wait_for_tasks, outbox):
        send_welcome.send(user_id=42)
        wait_for_tasks("emails")          # until the queue is empty; re-raises a handler's error
        assert outbox.last().to == "ada@example.com"

Fixtures:

- ``dramaturg_settings``: the settings tests run with: the project's configuration with
  the broker replaced by ``--dramaturg-broker URL`` (or the ``dramaturg_broker`` ini
  option, or ``DRAMATURG_TEST_BROKER``), ``stub://`` when none is given. Override the
  fixture to choose per test (``"eager://"``, a real Redis for integration tests).
- ``dramaturg_broker``: that broker, bootstrapped for the test and shut down after it.
- ``dramaturg_worker``: a worker running in the test process (none on an eager broker,
  where tasks run inside ``send()``).
- ``wait_for_tasks(*queues, timeout=30, fail_fast=False)``: waits until the queues (all,
  when none are named) are empty and the worker idle. A task that was held meanwhile
  raises :class:`dramaturg.TaskHeld` here, as ``send()`` does in eager mode, so one test
  passes in both modes; one that could not be settled raises :class:`TaskFailed`. With
  ``fail_fast``, the first exception any handler raised (even one that is retried)
  raises :class:`TaskFailed` at once.
- ``held``: ``dramaturg.held_tasks()`` for the test's broker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest

from . import app, suspension
from .config import Settings, load_settings
from .drain import Tally, worker_idle
from .errors import TaskHeld
from .held import HeldStore, held_tasks
from .middleware.outcomes import Outcomes
from .queues import canonical_queue
from .task import RunOutcome, run_of

__all__ = ["TaskFailed", "dramaturg_broker", "dramaturg_settings", "dramaturg_worker", "held", "wait_for_tasks"]

#: How often wait_for_tasks looks at the queues (a broker has no "empty" event to wait on).
POLL_S = 0.01


class TaskFailed(AssertionError):
    """A handler raised while the test waited for its tasks; the original is the cause."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--dramaturg-broker", default=None, help="broker URL for dramaturg's fixtures (default: stub://)")
    parser.addini("dramaturg_broker", "broker URL for dramaturg's fixtures (default: stub://)", default="")


@pytest.fixture
def dramaturg_settings(request: pytest.FixtureRequest) -> Settings:
    """The project's settings with the test broker (see the module docstring)."""
    url = (
        request.config.getoption("--dramaturg-broker")
        or request.config.getini("dramaturg_broker")
        or os.environ.get("DRAMATURG_TEST_BROKER")
        or "stub://"
    )
    settings = load_settings()
    return settings.model_copy(update={"broker": settings.broker.model_copy(update={"url": url, "type": None})})


@pytest.fixture
def dramaturg_broker(dramaturg_settings: Settings) -> Iterator[dramatiq.Broker]:
    """The test's broker, bootstrapped for this test and shut down after it (queues a
    task suspended are resumed, so the next test starts clean)."""
    suspension.resume_all()
    broker = app.bootstrap(dramaturg_settings)
    yield broker
    app.shutdown()
    suspension.resume_all()


class _Failures(Tally):
    """A :class:`~dramaturg.drain.Tally` that also keeps the exceptions handlers raised and
    counts what is unsettled, for wait_for_tasks.

    ``outstanding`` counts messages this process enqueued and no worker acknowledged or
    rejected yet: RabbitMQ does not count the deliveries a consumer holds, so an empty
    queue alone does not mean the work is done.
    """

    def __init__(self) -> None:
        super().__init__()
        #: (message, what its handler raised, what became of it: None when none was decided)
        self.errors: list[tuple[Any, BaseException, RunOutcome | None]] = []
        self.outstanding = 0

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        with self.lock:
            self.outstanding += 1

    def after_ack(self, broker: dramatiq.Broker, message: Any) -> None:
        with self.lock:
            self.outstanding -= 1

    after_nack = after_ack

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        super().after_process_message(broker, message, result=result, exception=exception)
        if exception is not None:
            run = run_of(message)
            with self.lock:
                self.errors.append((message, exception, None if run is None else run.outcome))


@pytest.fixture
def dramaturg_worker(dramaturg_broker: dramatiq.Broker) -> Iterator[dramatiq.Worker | None]:
    """A worker in the test process, stopped after the test (None on an eager broker)."""
    from .brokers.eager import EagerBroker

    if isinstance(dramaturg_broker, EagerBroker):
        yield None
        return
    failures = _Failures()
    # Before Outcomes, so that its after-hooks run after Outcomes' (Dramatiq runs them in
    # reverse): it sees what became of each failure.
    dramaturg_broker.add_middleware(failures, before=Outcomes)
    worker = dramatiq.Worker(dramaturg_broker, worker_threads=4, worker_timeout=100)
    worker._dramaturg_failures = failures  # type: ignore[attr-defined]
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def wait_for_tasks(dramaturg_broker: dramatiq.Broker, dramaturg_worker: dramatiq.Worker | None) -> Callable[..., None]:
    """``wait_for_tasks(*queues, timeout=30, fail_fast=False)``: see the module docstring."""

    def wait(*queues: str, timeout: float = 30.0, fail_fast: bool = False) -> None:
        if dramaturg_worker is None:
            return  # eager: everything ran inside send()
        failures: _Failures = dramaturg_worker._dramaturg_failures  # type: ignore[attr-defined]
        names = queues or sorted({canonical_queue(q) for q in dramaturg_broker.get_declared_queues()})
        deadline = time.monotonic() + timeout
        while True:
            with failures.lock:
                _raise_settled_failures(failures, fail_fast)
                busy = failures.running or failures.outstanding > 0
            if not busy and worker_idle(dramaturg_broker, dramaturg_worker, names):
                return
            if time.monotonic() >= deadline:
                last = f"; the last handler error: {failures.errors[-1][1]!r}" if failures.errors else ""
                raise TimeoutError(f"tasks of {', '.join(names)} still pending after {timeout} s{last}")
            time.sleep(POLL_S)

    return wait


def _raise_settled_failures(failures: _Failures, fail_fast: bool) -> None:
    for index, (message, error, outcome) in enumerate(failures.errors):
        if outcome is RunOutcome.HELD:
            del failures.errors[index]
            task = held_tasks().get(message.message_id, canonical_queue(message.queue_name))
            raise TaskHeld(task.reason if task else str(error), task) from error
        if outcome is RunOutcome.REJECTED or fail_fast:
            del failures.errors[index]
            raise TaskFailed(f"{message.actor_name} (message {message.message_id}) raised {error!r}") from error


@pytest.fixture
def held(dramaturg_broker: dramatiq.Broker) -> HeldStore:
    """The held tasks of the test's broker."""
    return held_tasks()
