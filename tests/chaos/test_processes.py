"""Worker processes that die, stop or recycle in the middle of a run: nothing lost, and only
tasks that were running when it happened run again, each with a line saying so."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

from ..conftest import BROKERS
from .conftest import Scale
from .harness import Chaos, kill_nine

pytestmark = pytest.mark.chaos


def task_length(n: int) -> float:
    """20-60 ms, every 20th task 1 s (so some are running whenever a fault comes)."""
    return 1.0 if n % 20 == 0 else 0.02 + (n * 7919 % 41) / 1000


@pytest.mark.parametrize("broker_kind", BROKERS)
def test_kill_9_of_worker_processes_at_random_points(
    chaos: Callable[[str], Chaos], scale: Scale, run: int, broker_kind: str
) -> None:
    seed = random.randrange(1_000_000)
    print(f"seed {seed}")
    rng = random.Random(seed)
    # Given two worker groups (each its own Dramatiq main process) and a burst of tasks
    scenario = chaos("kill -9 of a worker process")
    scenario.start_workers(2)
    scenario.send(scale.tasks, task_length)

    # When, at random points of the run, a worker process running tasks is killed with
    # kill -9, several times, and a fresh group replaces the one it belonged to
    points = sorted(rng.sample(range(scale.tasks // 10, scale.tasks * 8 // 10), scale.kills))
    for point in points:
        scenario.wait_for_ends(point, timeout=scale.settle_s)
        busy = scenario.running_pids()
        if not busy:
            continue
        victim = rng.choice(busy)
        scenario.fault(kill_nine(victim), scope=[victim])
        scenario.start_worker(wait=False)

    # Then every task succeeded once, except those running at a kill, which ran again
    # (each logged); none is lost
    scenario.settle(scale.settle_s)
    row = scenario.count()
    assert len(scenario.faults) >= 1, "no worker was running a task at any kill point"
    scenario.finish(row)


@pytest.mark.parametrize("broker_kind", BROKERS)
def test_sigterm_mid_burst_repeatedly(chaos: Callable[[str], Chaos], scale: Scale, run: int, broker_kind: str) -> None:
    # Given two worker groups with half a second of grace, and a burst in which every
    # 20th task takes 1 s (so a SIGTERM interrupts some)
    scenario = chaos("SIGTERM mid-burst")
    scenario.start_workers(2)
    scenario.send(scale.tasks, task_length)

    # When a group gets SIGTERM in the middle of the burst, several times, and a fresh
    # group takes its place each time
    for k in range(scale.sigterms):
        scenario.wait_for_ends(scale.tasks * (k + 1) // (scale.sigterms + 2), timeout=scale.settle_s)
        (group, *_) = scenario.live_workers()
        scope = [group.popen.pid, *scenario.worker_pids(group)]
        began = time.time()
        assert group.stop(timeout=60) == 0, group.output
        # The fault begins when the worker process gets the signal, which Dramatiq's main
        # process forwards: a task it started before that was running at the fault.
        received = [at for pid, at in scenario.noticed("Stopping worker process", since=began).items() if pid in scope]
        scenario.fault(max(received, default=began), time.time(), scope=scope)
        scenario.start_worker(wait=False)

    # Then nothing is lost, and only tasks interrupted by a stop ran twice, each logged
    scenario.settle(scale.settle_s)
    scenario.finish(scenario.count())


@pytest.mark.parametrize("broker_kind", BROKERS)
def test_recycling_under_load(chaos: Callable[[str], Chaos], scale: Scale, run: int, broker_kind: str) -> None:
    # Given two worker processes of four threads that start afresh every 25 tasks
    scenario = chaos("recycling (max_tasks_per_child)")
    scenario.start_worker(processes=2, DRAMATURG_WORKER_MAX_TASKS_PER_CHILD="25")
    # When they run a burst of short tasks
    scenario.send(scale.tasks, lambda n: 0.01 + (n % 5) / 100)
    # Then every task succeeded exactly once: recycling is no fault
    scenario.settle(scale.settle_s)
    row = scenario.count()
    assert "recycles: it has run" in "\n".join(scenario.worker_output())
    scenario.finish(row)
