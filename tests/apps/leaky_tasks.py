"""Actors for the worker-recycling tests: each run keeps some memory on purpose.

Each start and end is recorded with one O_APPEND write to the file named by
``LEAK_LOG``, with this interpreter's incarnation (new in every fresh interpreter), its
pid and its resident memory.
"""

from __future__ import annotations

import os
import uuid

import dramaturg
from dramaturg.middleware.recycle import resident_mb

from . import event_log

#: Differs in every interpreter that imports this module.
INCARNATION = uuid.uuid4().hex[:12]
_kept: list[bytes] = []


def record(event: str, n: int) -> None:
    event_log.append("LEAK_LOG", f"{event} {n} {INCARNATION} {os.getpid()} {resident_mb():.1f}")


@dramaturg.actor(queue_name="leaky")
def leak(n: int, mb: int) -> None:
    record("start", n)
    _kept.append(b"\x01" * (mb * 2**20))  # non-zero bytes: the pages are really resident
    record("end", n)
