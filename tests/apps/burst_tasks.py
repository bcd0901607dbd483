"""Actors for the shutdown tests: a burst of short tasks with a few long ones.

Each start and end is recorded with one O_APPEND write to the file named by
``BURST_LOG`` (lines from concurrent threads never interleave), and in ``ENDED``.
"""

from __future__ import annotations

import time

import dramaturg

from . import event_log

#: Numbers that ran to the end in this process.
ENDED: list[int] = []


def record(event: str, n: int) -> None:
    event_log.append("BURST_LOG", f"{event} {n}")


@dramaturg.actor(queue_name="burst", ttr=120_000)
def step(n: int, seconds: float) -> None:
    record("start", n)
    if dramaturg.current_task().message.options.get("dramaturg_rerun"):
        seconds = 0.01  # the long ones are quick the second time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.005)  # short sleeps: an interrupt lands between them
    ENDED.append(n)
    record("end", n)
