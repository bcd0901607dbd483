"""Pacing the return of tasks put back to wait for a key, so that a long queue of one key
is not taken and put back again and again ahead of other keys' tasks.

A task that may not start is put back as a delayed copy (see :mod:`dramaturg.flow.control`).
With a plain backoff (100 ms doubling to 2 s), a key with thousands of tasks waiting
brings them all back within two seconds, again and again: every worker thread turns them
over, and another key's tasks queued behind them wait for each pass. Measured with 2,000
tasks of one tenant (two at a time, 300 ms each) ahead of another's ten, each task ahead
was put back five times before the other's ten had started.

So a worker process paces the returns of each key's tasks at the rate the key can take
them: a concurrency key frees a slot every *run time / limit* (the run time: the shorter
of the moving average and the last of this process's runs holding a slot of it, erring
towards coming back early), a rate key lets a start through
every *window / limit*. Each task put back is given the next return time of its key's
schedule (at the earliest its backoff, or the store's wait for a rate), a little faster
than that pace (:data:`PACE`) so that a slot seldom stands idle while the next task
sleeps; a task that comes back too early is put back again, at the end of the schedule.
The queue then holds a key's tasks as they are due rather than all of them, and another
key's tasks are reached after one pass over what was queued before them.

Bounded, because a delayed copy waits in a worker's memory: Dramatiq's consumer of a
delay queue takes its messages in the order they were put back, holds up to its prefetch
of them (``worker.delay_prefetch``, 1,000 a worker thread) until each is due, and takes no
more meanwhile. Copies held for long would keep the copies behind them (another key's,
due at once) from being taken: with 10,000 tasks of one key paced over a minute, 8
threads, the other key's copies waited 30 s behind them. So a process paces at most three
quarters of its delay prefetch of copies at a time (:attr:`Pacing.budget`, leaving room
for other delayed messages); beyond that a task waits its plain backoff, as without
pacing. And no return is scheduled past :data:`HORIZON_MS` (RabbitMQ also closes a
channel holding a delivery past its ``consumer_timeout``): a task beyond it comes back
within its second half, without extending the schedule.

Per process: the processes of a worker group pace their own put-backs, so with *n*
processes refusing one key its tasks come back up to *n* times as often as it takes them,
the extra ones put back once more each.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from collections.abc import Callable, Sequence

from .state import LimitSpec

__all__ = ["HORIZON_MS", "PACE", "Pacing"]

#: The latest a task put back is scheduled to come back, in ms from now.
HORIZON_MS = 30_000
#: Returns are scheduled this fraction of the key's pace apart (below 1: a few early ones
#: are put back again, rather than a slot standing idle).
PACE = 0.8
#: The weight of a new run in a key's moving average of run times.
ALPHA = 0.3
#: The most keys remembered (keys of a template, tenant:{store}, must not pile up).
KEYS_MAX = 10_000


class Pacing:
    """The return schedule of the keys a worker process puts tasks back for."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: A concurrency key's run time (s), from this process's runs: (the moving average,
        #: the last one). The pace uses the shorter: a task that comes back too early is put
        #: back once more, one that comes back too late leaves a slot idle.
        self._runs: dict[str, tuple[float, float]] = {}
        #: A key's ("c:tenant:fr", "r:shopify") last return scheduled (the monotonic clock).
        self._next: dict[str, float] = {}
        #: When the copies paced and not yet due come back (a heap): at most `budget` of them.
        self._out: list[float] = []
        #: How many copies may be paced at a time (3/4 of the worker's delay prefetch, set
        #: when it boots; none before: an eager sender waits inline, never puts back).
        self.budget = 0
        self._lock = threading.Lock()

    @property
    def watching(self) -> bool:
        """Whether any key was paced: only then are run times measured (nothing on the
        message path of a process whose limits never refuse)."""
        return bool(self._next)

    def ran(self, keys: Sequence[str], seconds: float) -> None:
        """A run that held a slot of each of ``keys`` (concurrency keys) took ``seconds``."""
        runs = self._runs
        if len(runs) >= KEYS_MAX:
            runs.clear()
        for key in keys:
            before = runs.get(key)
            average = seconds if before is None else before[0] + ALPHA * (seconds - before[0])
            runs[key] = (average, seconds)

    def delay_ms(self, spec: LimitSpec, earliest_ms: int) -> int:
        """How long a task refused ``spec`` waits: its key's next return time, at the
        earliest ``earliest_ms`` from now (the backoff, or a rate's exact wait)."""
        if spec.kind == "c":
            run = self._runs.get(spec.key)
            gap = 0.0 if run is None else min(run) / spec.limit * PACE
        else:
            gap = spec.ms / spec.limit / 1000 * PACE
        name = spec.kind + ":" + spec.key
        now = self._clock()
        with self._lock:
            out = self._out
            while out and out[0] <= now:
                heapq.heappop(out)
            if len(out) >= self.budget:
                return earliest_ms
            at = max(now + earliest_ms / 1000, self._next.get(name, 0.0) + gap)
            if at - now > HORIZON_MS / 1000:
                # Past the horizon: it comes back within its second half, and the schedule
                # stays where it is for the tasks that come back before it.
                wait_ms = max(earliest_ms, int(random.uniform(HORIZON_MS / 2, HORIZON_MS)))
                heapq.heappush(out, now + wait_ms / 1000)
                return wait_ms
            if len(self._next) >= KEYS_MAX:
                for stale in [key for key, when in self._next.items() if when <= now]:
                    del self._next[stale]
            self._next[name] = at
            heapq.heappush(out, at)
        return max(earliest_ms, round((at - now) * 1000))
