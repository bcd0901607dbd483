"""worker.modules of the killed-purge tests in tests/test_queue_admin.py.

With ``PURGE_KILL`` set, ``dramaturg queue purge`` kills itself (SIGKILL) between taking
its first step of tasks off the queue and writing their records and batch ends, as the
OOM killer or a lost SSH session would kill it. With ``LEFT_STEP_MS`` set, a purge step
that old is taken for left behind (the default is a minute).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

from dramaturg import queue_admin
from dramaturg.brokers.redis import admin

_recorder = queue_admin._recorder


def _dies_before_recording(broker: Any, queue: str) -> queue_admin.OnPurged:
    _recorder(broker, queue)  # checks the state store answers, as the real purge does

    def record(bodies: Sequence[bytes]) -> None:
        print(f"took {len(bodies)} task(s); killed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    return record


if os.environ.get("PURGE_KILL"):
    queue_admin._recorder = _dies_before_recording  # type: ignore[assignment]
if os.environ.get("LEFT_STEP_MS"):
    admin.LEFT_STEP_MS = int(os.environ["LEFT_STEP_MS"])
