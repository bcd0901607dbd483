"""Queues this worker process has stopped taking tasks from, and until when.

A handler raises :class:`dramaturg.SuspendQueue` when every task of its queue would
fail for now (the mail server is down)::

    @dramaturg.actor(queue_name="emails")
    def send_welcome(user_id: int) -> None:
        try:
            smtp.send(...)
        except ConnectionRefusedError:
            raise dramaturg.SuspendQueue("5m", reason="mail server down") from None

The task goes back to the queue untouched (not counted as an attempt), and this worker
process takes nothing from that queue until the delay is over, while its other queues
go on. What it had already taken from the queue goes back too: messages waiting for a
thread are requeued as they come up, and the consumer returns its prefetched messages
(on Redis they are pushed back; on RabbitMQ the consumer is cancelled, which hands the
unstarted deliveries back to the server, and it consumes again when the delay ends).
Other worker processes are not told: each finds out for itself at its next attempt.

The state lives in this process only, so a restarted worker starts unsuspended.
"""

from __future__ import annotations

import threading
import time

__all__ = ["remaining_s", "resume_all", "suspend", "suspended"]

_lock = threading.Lock()
#: Canonical queue name -> time.monotonic() at which it resumes.
_until: dict[str, float] = {}


def suspend(queue: str, ms: int) -> None:
    """Take nothing from ``queue`` (canonical name) for ``ms`` milliseconds from now.

    A longer suspension already in force is kept.
    """
    until = time.monotonic() + ms / 1000
    with _lock:
        if _until.get(queue, 0.0) < until:
            _until[queue] = until


def remaining_s(queue: str) -> float:
    """Seconds ``queue`` stays suspended in this process (0.0 when it is not)."""
    if not _until:  # the message path: one dict check when nothing is suspended
        return 0.0
    until = _until.get(queue)
    if until is None:
        return 0.0
    left = until - time.monotonic()
    if left > 0:
        return left
    with _lock:
        if _until.get(queue) == until:
            del _until[queue]
    return 0.0


def suspended() -> dict[str, float]:
    """Every queue suspended now, with the seconds it has left."""
    return {queue: left for queue in list(_until) if (left := remaining_s(queue)) > 0}


def resume_all() -> None:
    """Lift every suspension (a fresh worker, or a test)."""
    with _lock:
        _until.clear()
