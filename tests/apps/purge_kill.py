"""A ``dramaturg queue purge`` killed (SIGKILL) between taking its first step of tasks off
the queue and writing their records and batch ends, as the OOM killer or a lost SSH
session would kill it (worker.modules of the killed-purge tests in tests/test_queue_admin.py).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

from dramaturg import queue_admin

_recorder = queue_admin._recorder


def _dies_before_recording(broker: Any, queue: str) -> queue_admin.OnPurged:
    _recorder(broker, queue)  # checks the state store answers, as the real purge does

    def record(bodies: Sequence[bytes]) -> None:
        print(f"took {len(bodies)} task(s); killed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    return record


queue_admin._recorder = _dies_before_recording  # type: ignore[assignment]
