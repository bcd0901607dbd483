"""Actors for the statistics tests: a task that runs until the test opens its gate.

Each start is one O_APPEND line ``start <number>`` in the file named by ``STATS_LOG``;
the task then waits until the file named by ``STATS_GATE`` exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import dramaturg

from . import event_log


@dramaturg.actor(queue_name="reports", ttr=300_000)
def gated(number: int) -> None:
    event_log.append("STATS_LOG", f"start {number}")
    gate = Path(os.environ.get("STATS_GATE") or os.devnull)
    event_log.wait_until(gate.exists, "the test to open the gate", 120)


@dramaturg.actor(queue_name="emails")
def mail(address: str) -> None:
    print(f"mailed {address}", flush=True)
