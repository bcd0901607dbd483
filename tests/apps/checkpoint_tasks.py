"""An actor for the checkpoint tests: a long import that keeps its place, so its worker
can be killed in the middle.

Each run appends lines to the file named by ``CHECKPOINT_LOG`` (one O_APPEND write each):
``start <offset> <pid>`` when it begins (the offset it read from its checkpoint),
``saved <offset> <pid>`` after each checkpoint, ``end <offset> <pid>`` when it is done.

With ``CHECKPOINT_DIE_AFTER_END`` set, the process kills itself (SIGKILL) once its first
run has ended, after every middleware's after-hook and before the acknowledgement: a
worker lost the moment its task succeeded.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import dramatiq

import dramaturg

from . import event_log
from .simulated import busy

#: Rows between two checkpoints.
EVERY = 100


def record(event: str, offset: int) -> None:
    event_log.append("CHECKPOINT_LOG", f"{event} {offset} {os.getpid()}")


@dramaturg.actor(queue_name="checkpoints", ttr=60_000)
def import_rows(total: int, row_s: float = 0.0005) -> None:
    """Import ``total`` rows, ``row_s`` each, from the last checkpoint on."""
    task = dramaturg.current_task()
    offset = int((task.checkpoint_state or {}).get("offset", 0))
    record("start", offset)
    while offset < total:
        busy(row_s * EVERY)  # a slice of rows
        offset = min(offset + EVERY, total)
        task.checkpoint({"offset": offset})
        record("saved", offset)
        task.progress(offset / total, f"row {offset:,} of {total:,}")
        task.touch()
    record("end", offset)


class DieAfterEnd(dramatiq.Middleware):
    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        if message.actor_name == "import_rows" and exception is None:
            os.kill(os.getpid(), signal.SIGKILL)


if os.environ.get("CHECKPOINT_DIE_AFTER_END"):
    dramaturg.get_broker().add_middleware(DieAfterEnd())
