"""Actors for the chaos suite (tests/chaos): every run of a task is recorded where the
test can read it after the worker processes were killed, cut off or restarted.

Each worker process appends to its own file, ``$CHAOS_LOG_DIR/<pid>.log``, one
O_APPEND write per line (a recycled worker keeps its pid and its file):
``<event> <message id> <attempt> <pid> <parent pid> <unix time>``, the event being
``start``, ``end`` (written just before the handler returns, so before the
acknowledgement) or ``fail`` (a first attempt of ``flaky`` that raises). The parent is
the ``dramaturg worker`` main process: it names the worker group, and so the host.
"""

from __future__ import annotations

import os
import time

import dramaturg

LOG_DIR_ENV = "CHAOS_LOG_DIR"
QUEUE = "chaos"


def record(event: str) -> None:
    directory = os.environ.get(LOG_DIR_ENV)
    if not directory:
        return
    task = dramaturg.current_task()
    line = f"{event} {task.message_id} {task.attempt} {os.getpid()} {os.getppid()} {time.time():.6f}\n"
    fd = os.open(os.path.join(directory, f"{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def pause(seconds: float) -> None:
    """Simulated work: short sleeps, so an interrupt (TTR, a stopping worker) lands between them."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(0.005, seconds))


@dramaturg.actor(queue_name=QUEUE, ttr=120_000, max_retries=50)
def work(n: int, seconds: float) -> None:
    """A task of ``seconds`` (``n`` only tells the tasks apart in a listing)."""
    record("start")
    pause(seconds)
    record("end")


class FirstAttemptFails(Exception):
    """Raised by every first attempt of :func:`flaky`."""


@dramaturg.actor(queue_name=QUEUE, ttr=120_000, max_retries=50, min_backoff=1_000, max_backoff=2_000)
def flaky(n: int, seconds: float) -> None:
    """Fails its first attempt (a retry waits 1-2 s in the delay queue), then works as :func:`work`."""
    record("start")
    pause(seconds)
    if dramaturg.current_task().attempt == 1:
        record("fail")
        raise FirstAttemptFails(f"task {n} fails its first attempt")
    record("end")
