"""Dramatiq's in-memory stub broker, for unit tests of pure logic.

Nothing is durable and nothing crosses a process boundary: the behaviour suite runs on
real brokers, this one only tests code that does not depend on one.

A unit test written for Dramatiq keeps working: ``join(queue, fail_fast=True)`` (the
default) re-raises the exception of a task that failed for good, which is held here
where Dramatiq dead-letters it, and ``flush_all()`` empties the held store as Dramatiq's
empties its dead letters.
"""

from __future__ import annotations

import builtins
import functools
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from dramatiq import Consumer, Middleware
from dramatiq.brokers.stub import StubBroker as _DramatiqStubBroker

from .. import suspension
from ..held import HeldStore, HeldTask
from ..queues import canonical_queue
from ..stats import QueueStats, StatsReader
from ..task import outcome_of
from .hooks import HookDispatch

if TYPE_CHECKING:
    from ..config import BrokerSettings

__all__ = ["StubBroker", "StubHeldStore", "StubStatsReader", "create_broker", "ping"]


class StubBroker(HookDispatch, _DramatiqStubBroker):
    def __init__(self, settings: BrokerSettings, *, middleware: list[Middleware]) -> None:
        super().__init__(middleware=middleware)
        self.settings = settings
        self.held = StubHeldStore(self)
        #: Each task held after a failure, as its worker had it: queue -> message id -> message
        #: (its exception, as Dramatiq's stub keeps a dead letter's, for join()).
        self.held_failures: dict[str, dict[str, Any]] = {}

    @functools.cached_property
    def stats(self) -> StubStatsReader:
        """Queue statistics (see :mod:`dramaturg.stats`); no worker counts."""
        return StubStatsReader(self)

    def pending(self, queue_name: str) -> int:
        """Messages waiting in a queue and its delay queue."""
        return sum(self.queues[name].qsize() for name in (queue_name, f"{queue_name}.DQ") if name in self.queues)

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 100) -> Consumer:
        consumer = super().consume(queue_name, prefetch, timeout)
        if queue_name.endswith(".DQ"):
            return consumer
        return StubConsumer(self, consumer, canonical_queue(queue_name))

    def join(self, queue_name: str, *, timeout: int | None = None, fail_fast: bool | None = None) -> None:
        """Wait until ``queue_name`` is empty, as Dramatiq's stub broker does; with
        ``fail_fast`` (default: ``fail_fast_default``, True) raise the exception of a task
        of that queue that is held, as Dramatiq raises that of a dead-lettered one."""
        super().join(queue_name, timeout=timeout, fail_fast=fail_fast)
        if not (fail_fast if fail_fast is not None else self.fail_fast_default):
            return
        queue = canonical_queue(queue_name)
        for message_id, message in list(self.held_failures.get(queue, {}).items()):
            if self.held.get(message_id, queue) is not None:  # not kicked or purged since
                raise (message._exception or Exception("Message failed with unknown error")) from None

    def flush_all(self) -> None:
        """Drop every queued message, dead letter and held task."""
        super().flush_all()
        self.held_failures.clear()
        self.held.clear()

    def __repr__(self) -> str:
        return "<StubBroker>"


class StubConsumer(Consumer):
    """Dramatiq's stub consumer, taking nothing while its queue is suspended."""

    def __init__(self, broker: StubBroker, inner: Any, queue: str) -> None:
        self.broker = broker
        self.inner = inner
        self.queue = queue

    def ack(self, message: Any) -> None:
        if outcome_of(message) == "held":
            # Before the acknowledgement wakes join(), which looks for it.
            self.broker.held_failures.setdefault(self.queue, {})[message.message_id] = message
        self.inner.ack(message)

    def nack(self, message: Any) -> None:
        self.inner.nack(message)

    def __next__(self) -> Any:
        wait = suspension.remaining_s(self.queue)
        if wait > 0:
            time.sleep(min(wait, self.inner.timeout / 1000))  # idle, as between fetches
            return None
        return next(self.inner)


def create_broker(settings: BrokerSettings, middleware: list[Middleware]) -> StubBroker:
    return StubBroker(settings, middleware=middleware)


def ping(settings: BrokerSettings) -> float:
    return 0.0


class StubHeldStore(HeldStore):
    """Held tasks in a dict, for unit tests; same behaviour as the durable stores."""

    def __init__(self, broker: StubBroker) -> None:
        super().__init__(broker)
        self._tasks: dict[str, dict[str, HeldTask]] = {}
        self._lock = threading.RLock()

    def hold(self, task: HeldTask) -> None:
        with self._lock:
            self._tasks.setdefault(task.queue_name, {})[task.message_id] = task

    def list(self, queue: str | None = None, *, offset: int = 0, limit: int = 50) -> list[HeldTask]:
        with self._lock:
            tasks = [t for name in ([queue] if queue else self.queues()) for t in self._tasks.get(name, {}).values()]
        return tasks[offset : offset + limit]

    def count(self, queue: str | None = None) -> int:
        with self._lock:
            return sum(len(self._tasks.get(name, {})) for name in ([queue] if queue else self.queues()))

    def get(self, message_id: str, queue: str | None = None) -> HeldTask | None:
        with self._lock:
            for name in [queue] if queue else self.queues():
                if message_id in self._tasks.get(name, {}):
                    return self._tasks[name][message_id]
        return None

    @contextmanager
    def taking(self, queue: str, message_ids: Sequence[str] | None) -> Iterator[Iterator[tuple[HeldTask, Any]]]:
        with self._lock:
            held = self._tasks.get(queue, {})
            ids = list(held) if message_ids is None else [i for i in message_ids if i in held]
            taken = {i: held.pop(i) for i in ids}  # this taking's own: two kicks never share it
        try:
            yield ((task, (taken, task.message_id)) for task in list(taken.values()))
        finally:
            with self._lock:
                self._tasks.setdefault(queue, {}).update(taken)

    def clear(self) -> None:
        with self._lock:
            self._tasks.clear()

    def forget(self, queue: str, receipt: Any) -> None:
        taken, message_id = receipt
        with self._lock:
            taken.pop(message_id, None)

    def purge(self, queue: str, message_ids: Sequence[str] | None = None) -> int:
        with self._lock:
            held = self._tasks.get(queue, {})
            ids = list(held) if message_ids is None else [i for i in message_ids if i in held]
            for i in ids:
                del held[i]
            return len(ids)

    def queues(self) -> builtins.list[str]:
        with self._lock:
            return sorted(set(self._tasks) | {canonical_queue(q) for q in self.broker.get_declared_queues()})


class StubStatsReader(StatsReader):
    """Counts from the stub broker's in-memory queues; worker processes are unknown (``None``)."""

    broker: StubBroker

    def read(self, queues: Sequence[str] | None = None) -> builtins.list[QueueStats]:
        names = list(queues) if queues is not None else sorted(self.known_queues())
        return [self._row(name) for name in names]

    def _row(self, queue: str) -> QueueStats:
        ready, taken = self._sizes(queue)
        delayed, delayed_taken = self._sizes(f"{queue}.DQ")
        return QueueStats(
            queue=queue,
            ready=ready,
            delayed=delayed + delayed_taken,
            in_flight=taken,
            held=self.broker.held.count(queue),
            dead=len(self.broker.dead_letters_by_queue.get(queue, ())),
            workers=None,
        )

    def _sizes(self, name: str) -> tuple[int, int]:
        """(waiting, taken and not yet acknowledged) in one of Dramatiq's stub queues."""
        queue = self.broker.queues.get(name)
        if queue is None:
            return 0, 0
        waiting = queue.qsize()
        return waiting, max(queue.unfinished_tasks - waiting, 0)
