"""Actors for the metrics and JSON log tests: one for each outcome a worker counts.

``meet`` records its pid with one O_APPEND write to the file named by ``OBSERVE_LOG``
and waits until two of its runs have started: run with one thread per worker process
and a prefetch of 1, two of them prove that two processes did work.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import dramaturg

from . import event_log
from .simulated import busy


@dramaturg.actor(queue_name="observed")
def meet(n: int) -> None:
    event_log.append("OBSERVE_LOG", f"meet {os.getpid()}")
    log = Path(os.environ["OBSERVE_LOG"])
    event_log.wait_until(lambda: log.read_text().count("meet ") >= 2, "the other meet task", 30)


@dramaturg.actor(queue_name="observed")
def ok(n: int) -> int:
    return n


@dramaturg.actor(queue_name="observed", max_retries=3, min_backoff=10, max_backoff=10)
def flaky(n: int) -> None:
    if dramaturg.current_task().attempt == 1:
        raise ValueError(f"row {n} not ready")


@dramaturg.actor(queue_name="observed")
def parked(n: int) -> None:
    dramaturg.current_task().hold(f"row {n} needs a look")


@dramaturg.actor(queue_name="observed", ttr=300, max_retries=0)
def stuck(n: int) -> None:
    busy(30)


@dramaturg.actor(queue_name="observed", ttr=10_000)
def toucher(n: int) -> None:
    task = dramaturg.current_task()
    for _ in range(3):
        task.touch()


@dramaturg.actor(queue_name="observed", max_retries=1, min_backoff=10, max_backoff=10)
def fails(row: int) -> None:
    logging.getLogger("tests.observed").warning("row %d: sending the welcome mail", row)
    # FAILS_HERE: the JSON log test finds this line (and that the password is masked in every field)
    raise ValueError(f"row {row}: cannot reach smtp://mailer:hunter2@mail.invalid/")


ACTORS = (meet, ok, flaky, parked, stuck, toucher, fails)


def declare() -> None:
    """Declare these actors again in a test process: they are declared at the first import,
    and each test (``isolated_app``) forgets the actors it declared."""
    from dramaturg import app

    for actor in ACTORS:
        app.register(actor)
