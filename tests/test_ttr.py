"""Time to run: deadlines, touch(), and the race at the deadline, on every broker."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import itertools
import logging
import operator
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg import resources
from dramaturg.actors import _runner
from dramaturg.middleware.ttr import StopRequested, TimeToRun, TimeToRunExceeded

from .apps.simulated import busy
from .conftest import Runs

WAIT_S = 30


def test_a_task_past_its_ttr_is_interrupted_and_held_when_retries_run_out(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="slow", ttr=200, max_retries=1, min_backoff=10, max_backoff=10)
    def stuck(n: int) -> None:
        runs.record(attempt=dramaturg.current_task().attempt)
        try:
            busy(10)
        except Exception:  # an interrupt is not an Exception: this must not catch it
            runs.record(swallowed=True)
        runs.record(finished=True)

    message = stuck.send(1)
    worker = start_worker()

    runs.wait(2)
    worker.join()
    held = dramaturg.held_tasks().get(message.message_id, "slow")
    assert runs.seen == [{"attempt": 1}, {"attempt": 2}]  # retried once, never finished
    assert held is not None
    assert (held.reason, held.attempts, held.exception_type) == ("TTR exceeded", 2, "TimeToRunExceeded")


def test_touch_keeps_a_long_task_alive(broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="slow", ttr=1_000, max_retries=0)
    def long_import(rows: int) -> None:
        task = dramaturg.current_task()
        left = []
        for _ in range(rows):
            busy(0.3)  # 300 ms per row, 1.8 s in all: nearly twice the ttr (a row's margin 700 ms)
            left.append(task.time_left())
            assert task.touch()
        runs.record(done=True, smallest_time_left=min(left))

    message = long_import.send(6)
    worker = start_worker()

    [run] = runs.wait(1)
    worker.join()
    assert run["done"] is True
    assert 0 < run["smallest_time_left"] <= 1_000
    assert dramaturg.held_tasks().get(message.message_id) is None


def test_touch_with_a_chosen_extension_and_time_left(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="slow", ttr=1_000)
    def measured() -> None:
        task = dramaturg.current_task()
        before = task.time_left()
        task.touch(60_000)
        runs.record(before=before, after=task.time_left())

    measured.send()
    start_worker()

    [run] = runs.wait(1)
    assert 900 <= run["before"] <= 1_000
    assert 59_000 <= run["after"] <= 60_000


def test_a_touch_after_the_deadline_is_reported(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker], caplog: pytest.LogCaptureFixture
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="slow", ttr=100, max_retries=0)
    def late() -> None:
        task = dramaturg.current_task()
        try:
            busy(5)
        except TimeToRunExceeded:
            runs.record(touched=task.touch())  # too late: reported, not ignored
            raise

    with caplog.at_level(logging.WARNING, logger="dramaturg.ttr"):
        message = late.send()
        worker = start_worker()
        [run] = runs.wait(1)
        worker.join()

    assert run == {"touched": False}
    assert "touch() came after the time to run (100 ms) had passed" in caplog.text
    held = dramaturg.held_tasks().get(message.message_id)
    assert held is not None and held.reason == "TTR exceeded"


def test_an_async_handler_is_interrupted_too(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    runs = Runs()

    @dramaturg.actor(queue_name="slow", ttr=300, max_retries=0)
    async def fetch_feed(url: str) -> None:
        runs.record(started=url)
        await asyncio.sleep(30)
        runs.record(finished=url)

    message = fetch_feed.send("https://example.com/feed")
    worker = start_worker()

    runs.wait(1)
    worker.join()
    held = dramaturg.held_tasks().get(message.message_id)
    assert held is not None and held.reason == "TTR exceeded"
    assert runs.seen == [{"started": "https://example.com/feed"}]


def test_an_interrupt_landing_just_after_the_handler_returned_is_ignored() -> None:
    # Given a handler that returns at the very moment its interrupt is raised: a C
    # function that makes TimeToRunExceeded pending in this thread and returns, so it
    # is delivered after the handler's return, at the end of the call that ran it
    raise_now = functools.partial(
        ctypes.pythonapi.PyThreadState_SetAsyncExc,
        ctypes.c_ulong(threading.get_ident()),
        ctypes.py_object(TimeToRunExceeded),
    )
    run = _runner(raise_now, "on_the_edge")

    # When the framework runs it, the task counts as finished, not interrupted (the
    # value it returned is lost with the call that delivered the interrupt)
    assert run() is None


@pytest.mark.parametrize("where", ["on entering the wrapper", "in the wrapper, before the handler"])
@pytest.mark.parametrize("interrupt", [TimeToRunExceeded, StopRequested])
def test_an_interrupt_landing_before_the_handler_is_called_interrupts_the_task(
    interrupt: type[BaseException], where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an interrupt that arrives just as the worker calls the task (its deadline
    # passed in the middleware, or a stop with no grace): C code makes it pending in
    # this thread, so that it lands at the wrapper's next instruction that takes one,
    # either its first, or the end of a C call the wrapper makes before the handler
    ran: list[int] = []
    run = _runner(ran.append, "never_started")
    raise_now = functools.partial(
        ctypes.pythonapi.PyThreadState_SetAsyncExc,
        ctypes.c_ulong(threading.get_ident()),
        ctypes.py_object(interrupt),
    )
    if where == "in the wrapper, before the handler":
        # the wrapper's check for task hooks, as a C call that raises it and says "none"
        monkeypatch.setattr(resources, "any_hooks", functools.partial(next, map(operator.not_, iter(raise_now, 0))))

        def call_task() -> object:
            return run(1)
    else:

        def call_task() -> object:
            return list(map(run, itertools.islice(iter(raise_now, 0), 1)))  # no Python code in between

    # When the framework runs it, the interrupt reaches the worker (which retries or
    # releases the task) instead of the task counting as done
    with pytest.raises(interrupt):
        call_task()

    # and the handler never ran
    assert ran == []


def test_tasks_that_end_at_their_deadline_run_once_and_end_once(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given 150 tasks that each take about as long as their ttr (30 to 50 ms against 40)
    starts: dict[int, int] = {}
    outcomes: dict[str, list[str]] = {}
    lock = threading.Lock()
    all_settled = threading.Event()
    total = 150
    rng = random.Random(7)
    durations = [rng.uniform(0.030, 0.050) for _ in range(total)]

    class Recorder(dramatiq.Middleware):
        def after_process_message(
            self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
        ) -> None:
            with lock:
                outcomes.setdefault(message.message_id, []).append("done" if exception is None else "interrupted")
                if len(outcomes) == total:
                    all_settled.set()

    broker.add_middleware(Recorder())

    @dramaturg.actor(queue_name="edge", ttr=40, max_retries=0)
    def on_the_edge(n: int) -> None:
        with lock:
            starts[n] = starts.get(n, 0) + 1
        deadline = time.monotonic() + durations[n]
        while time.monotonic() < deadline:
            pass  # pure Python: an interrupt can land on any instruction

    messages = [on_the_edge.send(n) for n in range(total)]
    worker = start_worker(threads=8)
    assert all_settled.wait(WAIT_S)
    worker.join()

    # Then each ran once and ended once: done, or interrupted and held
    held = {task.message_id for task in dramaturg.held_tasks().list("edge", limit=total)}
    assert set(starts.values()) == {1}
    assert all(len(ended) == 1 for ended in outcomes.values())
    interrupted = {message_id for message_id, ended in outcomes.items() if ended == ["interrupted"]}
    assert held == interrupted
    assert {m.message_id for m in messages} == set(outcomes)
    assert 0 < len(held) < total, "the durations should straddle the deadline"


def test_ttr_resolves_message_then_actor_then_queue_then_default() -> None:
    broker = dramaturg.bootstrap(
        dramaturg.Settings(broker={"type": "stub"}, tasks={"ttr": "10m"}, queues={"imports": {"ttr": "30m"}})
    )
    middleware = next(m for m in broker.middleware if isinstance(m, TimeToRun))

    @dramaturg.actor(queue_name="imports")
    def import_user() -> None: ...

    @dramaturg.actor(queue_name="imports", ttr=5_000)
    def quick() -> None: ...

    @dramaturg.actor(queue_name="mail")
    def send_mail() -> None: ...

    def ttr(message: Any) -> int:
        return middleware.ttr_ms(broker, message)

    assert ttr(quick.message_with_options(ttr=1_000)) == 1_000
    assert ttr(quick.message()) == 5_000
    assert ttr(import_user.message()) == 1_800_000
    assert ttr(send_mail.message()) == 600_000
