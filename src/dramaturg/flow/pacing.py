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
towards coming back early), a rate key lets a start through every *window / limit*.
While a key has few tasks out (:data:`POLLERS_MIN` to :data:`POLLERS_MAX`, twice its
limit) they wait their plain backoff as before: they take its slots as they free, within
the backoff, so a key with a short queue is served as fast as without pacing. Each task
put back beyond them is given the next return time of its key's schedule (at the
earliest its backoff, or the store's wait for a rate), four times faster than that pace
(:data:`PACE`), so that a slot freed is soon met by a return; one that comes back too
early is put back again, at the end of the schedule. The schedule's end is never later than the tasks
paced at the moment need at the current pace, so a slow run or a copy that never came
back (cancelled, purged) leaves no hole in it. The queue then holds a key's tasks as
they are due rather than all of them, and another key's tasks are reached after one pass
over what was queued before them. A key is paced from the first run of it that ended in
this process (before, its run time is not known).

Bounded, because a delayed copy waits in a worker's memory: Dramatiq's consumer of a
delay queue takes its messages in the order they were put back, holds up to its prefetch
of them (``worker.delay_prefetch``, 1,000 a worker thread) until each is due, and takes no
more meanwhile. Copies held for long would keep the copies behind them (another key's,
due at once) from being taken: with 10,000 tasks of one key paced over a minute, 8
threads, the other key's copies waited 30 s behind them. So a process paces at most three
quarters of its delay prefetch of copies at a time (:attr:`Pacing.budget`, leaving room
for other delayed messages); beyond that a task waits its plain backoff, as without
pacing (the budget counts the copies paced: the first few of each key, and those put back
beyond the budget, are not counted, as before pacing). No return is scheduled past
:data:`HORIZON_MS`: a task beyond it comes back 30 s to 2 min later (:data:`BEYOND_MS`),
out of the schedule, which is what a pace estimated too slow can cost a task at most (a
rate's wait already longer is left as it is). A copy that could not be put back (the
broker refused it) keeps its place until its time passes.

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

__all__ = ["BEYOND_MS", "HORIZON_MS", "PACE", "POLLERS_MAX", "POLLERS_MIN", "Pacing"]

#: The latest a task put back is scheduled to come back, in ms from now (later ones: BEYOND_MS).
HORIZON_MS = 30_000
#: When a task whose turn is past the horizon comes back (ms from now, at random): it would
#: only be put back again before, so as late as keeps its copy's place in a worker's memory
#: short (and far within RabbitMQ's consumer_timeout). Coming back again and again within
#: 15-30 s, 10,000 tasks of one tenant kept RabbitMQ busy enough (two worker processes)
#: that another tenant's tasks waited as long as without pacing.
BEYOND_MS = (HORIZON_MS, 4 * HORIZON_MS)
#: Returns are scheduled this fraction of the key's pace apart: a slot that frees waits
#: for the next return, so they come four times as often as the key can start them (the
#: extra ones are put back again; their number follows the key's pace, not its queue).
#: Measured by simulation (test_pacing_keeps_a_keys_slots_busy): at 0.8, a key of limit 1
#: drained its own queue 4-56% slower than unpaced.
PACE = 0.25
#: The weight of a new run in a key's moving average of run times.
ALPHA = 0.3
#: How many of a key's tasks keep waiting their plain backoff before any is paced: twice
#: its limit, within these bounds. They take its slots as they free (each tries again
#: within 2 s), so that pacing the rest leaves no slot idle; a key with fewer tasks
#: waiting is never paced.
POLLERS_MIN = 8
POLLERS_MAX = 64
#: The most keys remembered (keys of a template, tenant:{store}, must not pile up), and how
#: often, at the most, the ones done with are dropped once there are that many.
KEYS_MAX = 10_000
PRUNE_EVERY_S = 1.0


class _Key:
    """A key's copies out (put back and not yet due, by when they come back: heaps) and the
    last return its schedule gave."""

    __slots__ = ("last", "paced", "polling")

    def __init__(self) -> None:
        self.polling: list[float] = []
        self.paced: list[float] = []
        self.last = 0.0


def _drop_due(heap: list[float], now: float) -> None:
    while heap and heap[0] <= now:
        heapq.heappop(heap)


class Pacing:
    """The return schedule of the keys a worker process puts tasks back for."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: A concurrency key's run time (s), from this process's runs: (the moving average,
        #: the last one). The pace uses the shorter: a task that comes back too early is put
        #: back once more, one that comes back too late leaves a slot idle.
        self._runs: dict[str, tuple[float, float]] = {}
        #: The keys put back for ("c:tenant:fr", "r:shopify").
        self._keys: dict[str, _Key] = {}
        self._pruned = 0.0
        #: When the copies paced and not yet due come back (a heap): at most `budget` of them.
        self._out: list[float] = []
        #: How many copies may be paced at a time (3/4 of the worker's delay prefetch, set
        #: when it boots; none before: an eager sender waits inline, never puts back).
        self.budget = 0
        self._lock = threading.Lock()

    @property
    def watching(self) -> bool:
        """Whether any key was put back for: only then are run times measured (nothing on
        the message path of a process whose limits never refuse)."""
        return bool(self._keys)

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
        """How long a task refused ``spec`` waits: its plain ``earliest_ms`` (the backoff, or
        a rate's exact wait) while its key has few tasks out, else its key's next return time."""
        if earliest_ms >= HORIZON_MS:
            return earliest_ms  # a long rate wait: nothing to pace within the horizon
        if spec.kind == "c":
            run = self._runs.get(spec.key)
            gap = 0.0 if run is None else min(run) / spec.limit * PACE
        else:
            gap = spec.ms / spec.limit / 1000 * PACE
        name = spec.kind + ":" + spec.key
        now = self._clock()
        with self._lock:
            key = self._keys.get(name)
            if key is None:
                if len(self._keys) >= KEYS_MAX and now - self._pruned >= PRUNE_EVERY_S:
                    self._prune(now)
                key = self._keys[name] = _Key()
            _drop_due(key.polling, now)
            _drop_due(key.paced, now)
            _drop_due(self._out, now)
            pollers = min(POLLERS_MAX, max(POLLERS_MIN, 2 * spec.limit))
            if gap <= 0 or len(key.polling) < pollers or len(self._out) >= self.budget:
                heapq.heappush(key.polling, now + earliest_ms / 1000)
                return earliest_ms
            # The schedule: a turn every gap from now (a concurrency key's backoff is jitter,
            # which must not push it on), or from the end of a rate's wait (the same for all
            # the tasks of its window); its end no later than the copies paced now need at the
            # current pace (a pace that was slower, or copies that never came back, leave no hole).
            base = now if spec.kind == "c" else now + earliest_ms / 1000
            turn = max(base, min(key.last, base + len(key.paced) * gap)) + gap
            if turn - now > HORIZON_MS / 1000:
                # Past the horizon: it comes back later (BEYOND_MS), out of the schedule (the
                # tasks that come back before it keep their turns).
                at = now + random.uniform(*BEYOND_MS) / 1000
            else:
                key.last = turn
                at = max(now + earliest_ms / 1000, turn)
                heapq.heappush(key.paced, at)
            heapq.heappush(self._out, at)
        return max(earliest_ms, round((at - now) * 1000))

    def _prune(self, now: float) -> None:
        """Forget the keys with no copy out and no schedule ahead (under the lock)."""
        self._pruned = now
        for name, key in list(self._keys.items()):
            _drop_due(key.polling, now)
            _drop_due(key.paced, now)
            if key.last <= now and not key.paced and not key.polling:
                del self._keys[name]
