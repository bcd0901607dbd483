"""An actor for the recovery tests: a task that blocks on its first run, so its worker can be killed.

Each start and end is recorded with one O_APPEND write to the file named by
``CRASH_LOG`` (lines from concurrent processes never interleave):
``<event> <pid> <parent pid> <unix time>``. The parent is the ``dramaturg worker`` main
process, which tells the test which of its worker groups ran the task.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import dramaturg

from . import event_log
from .simulated import busy


def record(event: str) -> None:
    event_log.append("CRASH_LOG", f"{event} {os.getpid()} {os.getppid()} {time.time():.3f}")


def started_before() -> bool:
    path = Path(os.environ.get("CRASH_LOG") or os.devnull)
    return path.is_file() and any(line.startswith("start ") for line in path.read_text().splitlines())


@dramaturg.actor(queue_name="crash", ttr=300_000)
def stall(first_run_s: float, later_runs_s: float = 0.01) -> None:
    """Run ``first_run_s`` the first time (as seen in ``CRASH_LOG``), ``later_runs_s`` after."""
    seconds = later_runs_s if started_before() else first_run_s
    record("start")
    busy(seconds)
    record("end")
