"""Drain queues for a while and stop: queue processing for cron jobs and admin buttons.

::

    summary = dramaturg.drain(["imports"], budget=timedelta(seconds=50))
    print(summary.line())
    # drained imports in 50.0 s: 41,203 processed, 12 retried, 3 held, 0 released, 58,782 left

A worker runs in this process on the given queues. When the budget is spent (or, with
``until_empty``, as soon as the queues are empty) it stops taking tasks, lets the
running ones finish for up to ``grace``, interrupts those still running and requeues
them untouched (not counted as an attempt), puts back everything it had prefetched,
and returns counts. Nothing is lost: a task is either done, retried, held, released
back to its queue, or still waiting there.

This is what ``dramaturg drain QUEUE --budget 10s`` runs. One drain (or worker) per
process at a time: Dramatiq's worker is not made to run twice in one process.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.worker import _WorkerMiddleware

from . import app
from .durations import Duration, parse_ms
from .errors import DramaturgError, did_you_mean
from .middleware.outcomes import Outcomes
from .middleware.shutdown import finish_running
from .queues import canonical_queue
from .task import RunOutcome, run_of

__all__ = ["DrainSummary", "drain"]

#: How often the budget and the queues are looked at (seconds).
_TICK_S = 0.05


@dataclass(frozen=True)
class DrainSummary:
    """What a drain did. ``released``: requeued untouched (interrupted at the grace limit,
    or its queue was suspended); ``cancelled``: skipped or interrupted on request
    (:func:`dramaturg.cancel`), never counted as processed, retried or held."""

    queues: tuple[str, ...]
    processed: int
    retried: int
    held: int
    released: int
    left: int
    seconds: float
    cancelled: int = 0

    def line(self) -> str:
        cancelled = f", {self.cancelled:,} cancelled" if self.cancelled else ""
        return (
            f"drained {', '.join(self.queues)} in {self.seconds:.1f} s: {self.processed:,} processed,"
            f" {self.retried:,} retried, {self.held:,} held, {self.released:,} released{cancelled},"
            f" {self.left:,} left"
        )


class Tally(dramatiq.Middleware):
    """Counts tasks running and their outcomes. Add it before Outcomes, so that its
    after-hook runs after Outcomes' (Dramatiq runs them in reverse) and sees the outcome.
    Also used by :mod:`dramaturg.testing`."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.running = 0
        self.lock = threading.Lock()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        with self.lock:
            self.running += 1

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        run = None if exception is None else run_of(message)
        outcome = RunOutcome.SUCCEEDED if run is None or run.outcome is None else run.outcome
        with self.lock:
            self.running -= 1
            self.counts[outcome] += 1

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        run = run_of(message)
        released = run is not None and run.outcome is RunOutcome.RELEASED
        with self.lock:
            self.running -= 1
            self.counts[RunOutcome.RELEASED if released else "skipped"] += 1


def drain(
    queues: Sequence[str],
    *,
    budget: Duration | None = None,
    until_empty: bool = False,
    threads: int = 8,
    grace: Duration = 30_000,
    broker: dramatiq.Broker | None = None,
) -> DrainSummary:
    """Process ``queues`` for ``budget`` and stop; see the module docstring.

    ``budget`` and ``grace`` are durations: ms, a timedelta, or ``"50s"``, ``"5m"`` (see
    :mod:`dramaturg.durations`).

    ``until_empty`` stops as soon as nothing is left (with no budget: whenever that is).
    """
    if budget is None and not until_empty:
        raise DramaturgError("drain() needs a budget, or until_empty=True (or both)")
    if not queues:
        raise DramaturgError("drain() needs at least one queue")
    if threads < 1:
        raise DramaturgError(f"drain() needs at least one thread, got threads={threads}")
    budget_s = None if budget is None else parse_ms(budget, what="drain(budget=...)") / 1000
    grace_s = parse_ms(grace, what="drain(grace=...)") / 1000
    broker = broker or app.get_broker()
    names = tuple(queues)
    _check_queues(broker, names)

    tally = Tally()
    broker.add_middleware(tally, before=Outcomes)
    worker = dramatiq.Worker(broker, queues=set(names), worker_threads=threads, worker_timeout=100)
    started = time.monotonic()
    try:
        worker.start()
        while True:
            time.sleep(_TICK_S)  # the budget is a clock; the queues have no event to wait on
            if budget_s is not None and time.monotonic() - started >= budget_s:
                break
            if until_empty and not tally.running and worker_idle(broker, worker, names):
                break
        _stop(worker, grace_s)
    finally:
        # Dramatiq's worker leaves a middleware of its own on the broker; take both out.
        broker.middleware[:] = [m for m in broker.middleware if m is not tally and not _belongs_to(m, worker)]
    seconds = time.monotonic() - started
    counts = tally.counts
    return DrainSummary(
        queues=names,
        processed=counts[RunOutcome.SUCCEEDED],
        retried=counts[RunOutcome.RETRIED],
        held=counts[RunOutcome.HELD],
        released=counts[RunOutcome.RELEASED],
        left=sum(_pending(broker, name) for name in names),
        seconds=seconds,
        cancelled=counts[RunOutcome.CANCELLED],
    )


def _check_queues(broker: dramatiq.Broker, names: Sequence[str]) -> None:
    """Refuse a queue no declared actor uses: a drain of it would take nothing, or hold
    every task it took as one of an unknown actor (a typo, a missing worker.modules)."""
    declared = {canonical_queue(actor.queue_name) for actor in broker.actors.values()}
    for name in names:
        if name not in declared:
            hint = did_you_mean(name, declared)
            listed = ", ".join(sorted(declared)) or "none"
            raise DramaturgError(
                f"unknown queue {name!r}{hint} (queues of declared actors: {listed};"
                " add the module that declares its actors to worker.modules)"
            )


def _belongs_to(middleware: dramatiq.Middleware, worker: dramatiq.Worker) -> bool:
    return isinstance(middleware, _WorkerMiddleware) and middleware.worker is worker


def _pending(broker: dramatiq.Broker, queue: str) -> int:
    return int(broker.pending(queue))  # type: ignore[attr-defined]


def worker_idle(broker: dramatiq.Broker, worker: dramatiq.Worker, queues: Sequence[str]) -> bool:
    """Nothing waits in ``worker``'s memory or on ``queues`` (tasks running are not seen here)."""
    if worker.work_queue.unfinished_tasks:
        return False
    if any(consumer.delay_queue.unfinished_tasks for consumer in worker.consumers.values()):
        return False
    return all(_pending(broker, name) == 0 for name in queues)


def _stop(worker: dramatiq.Worker, grace_s: float) -> None:
    """Stop taking tasks, give running ones ``grace_s``, then interrupt and requeue them."""
    finish_running(worker, grace_s)
    worker.stop(timeout=1_000)  # consumers: stop, put back what was prefetched, close
