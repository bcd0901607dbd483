"""Actors for the statistics tests: a task that runs until the test opens its gate.

Each start is one O_APPEND line ``start <number>`` in the file named by ``STATS_LOG``;
the task then waits until the file named by ``STATS_GATE`` exists.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import dramaturg

from . import event_log


@dramaturg.actor(queue_name="reports", ttr=300_000)
def gated(number: int) -> None:
    event_log.append("STATS_LOG", f"start {number}")
    gate = Path(os.environ.get("STATS_GATE") or os.devnull)
    while not gate.exists():
        time.sleep(0.01)  # short sleeps: a stopping worker's interrupt lands between them


@dramaturg.actor(queue_name="emails")
def mail(address: str) -> None:
    print(f"mailed {address}", flush=True)
