"""Shared per-worker resources and per-task hooks, on RabbitMQ, Redis and embedded."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq

import dramaturg

from .conftest import Runs


def test_a_resource_is_made_on_first_use_shared_by_threads_and_closed_at_shutdown(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    events: list[str] = []
    runs = Runs()

    @dramaturg.resource
    def pool() -> Iterator[dict[str, int]]:
        events.append("open")
        yield {"connections": 4}
        events.append("close")

    @dramaturg.actor(queue_name="res")
    def use() -> None:
        runs.record(pool=id(pool()), thread=threading.get_ident())

    for _ in range(12):
        use.send()
    assert events == []  # sending (or importing) makes nothing

    worker = start_worker(threads=4)
    seen = runs.wait(12)
    worker.join()
    assert events == ["open"]  # once for the process, whichever thread came first
    assert len({run["pool"] for run in seen}) == 1

    worker.stop()
    assert events == ["open", "close"]


def test_a_per_thread_resource_gives_each_thread_its_own(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    opened: list[int] = []
    closed: list[int] = []
    both = threading.Barrier(2, timeout=20)
    runs = Runs()

    @dramaturg.resource(per_thread=True)
    def connection() -> Iterator[int]:
        opened.append(threading.get_ident())
        yield threading.get_ident()
        closed.append(threading.get_ident())  # in the thread that made it, as it stops

    @dramaturg.actor(queue_name="res")
    def use() -> None:
        both.wait()  # two tasks at once, one per thread
        runs.record(thread=threading.get_ident(), connection=connection())

    use.send()
    use.send()
    worker = start_worker(threads=2)
    seen = runs.wait(2)
    worker.join()
    worker.stop()

    assert {run["connection"] for run in seen} == {run["thread"] for run in seen}  # each thread its own
    assert sorted(opened) == sorted(closed) and len(opened) == 2


def test_hooks_run_around_each_task_of_their_queues_also_after_a_failure(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    calls: list[tuple[str, ...]] = []
    runs = Runs()

    @dramaturg.before_task(queues=["hooked"])
    def begin(task: dramaturg.Task) -> None:
        calls.append(("before", str(task.attempt)))

    @dramaturg.after_task(queues=["hooked"])
    def end(task: dramaturg.Task, error: BaseException | None) -> None:
        calls.append(("after", str(task.attempt), type(error).__name__ if error else "ok"))

    @dramaturg.actor(queue_name="hooked", max_retries=2, min_backoff=10, max_backoff=20)
    def flaky() -> None:
        calls.append(("run", str(dramaturg.current_task().attempt)))
        runs.record(queue="hooked")
        if dramaturg.current_task().attempt == 1:
            raise RuntimeError("first time fails")

    @dramaturg.actor(queue_name="plain")
    def plain() -> None:
        runs.record(queue="plain")

    plain.send()
    flaky.send()
    worker = start_worker(threads=1)
    runs.wait(3)
    worker.join()

    assert calls == [
        ("before", "1"),
        ("run", "1"),
        ("after", "1", "RuntimeError"),
        ("before", "2"),
        ("run", "2"),
        ("after", "2", "ok"),
    ]


def test_a_failing_teardown_fails_the_task(broker: dramatiq.Broker, start_worker: Callable[..., Any]) -> None:
    runs = Runs()

    @dramaturg.after_task(queues=["commit"])
    def commit(task: dramaturg.Task, error: BaseException | None) -> None:
        if task.attempt == 1:
            raise ConnectionError("commit failed")

    @dramaturg.actor(queue_name="commit", max_retries=1, min_backoff=10, max_backoff=20)
    def write() -> None:
        runs.record(attempt=dramaturg.current_task().attempt)

    write.send()
    worker = start_worker()
    seen = runs.wait(2)
    worker.join()
    assert [run["attempt"] for run in seen] == [1, 2]  # the commit failure made it run again
