"""A ``dramaturg held kick`` that stops itself (SIGSTOP) just before it requeues its first
task, as a kicker paused by an operator, a long GC or a VM stall would be (worker.modules
of the stalled-kicker tests in tests/test_held_faults.py). With ``HELD_PAUSE_TAKING=N`` it
stops instead while it takes the held tasks, once it has read N of them.

On Redis and embedded its lease is shortened to ``HELD_LEASE_MS``; on RabbitMQ the test
sets ``broker.heartbeat`` low, so that RabbitMQ drops the stopped kicker's connection soon.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import dramatiq

import dramaturg
from dramaturg.brokers.redis import RedisHeldStore
from dramaturg.held import HeldTask


class StopBeforeFirstRequeue(dramatiq.Middleware):
    def __init__(self) -> None:
        self.stopped = False

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        if not self.stopped:
            self.stopped = True
            os.kill(os.getpid(), signal.SIGSTOP)


def stop_while_taking(after: int) -> None:
    """SIGSTOP once ``after`` held tasks were read (RabbitMQ reads each into a HeldTask)."""
    read = HeldTask.from_json.__func__  # type: ignore[attr-defined]
    count = [0]

    def from_json(cls: type[HeldTask], data: Any) -> HeldTask:
        count[0] += 1
        if count[0] == after:
            os.kill(os.getpid(), signal.SIGSTOP)
        return read(cls, data)  # type: ignore[no-any-return]

    HeldTask.from_json = classmethod(from_json)  # type: ignore[method-assign, assignment]


if os.environ.get("HELD_PAUSE_TAKING"):
    stop_while_taking(int(os.environ["HELD_PAUSE_TAKING"]))
else:
    dramaturg.get_broker().add_middleware(StopBeforeFirstRequeue())
_store = dramaturg.held_tasks()
if isinstance(_store, RedisHeldStore):
    _store.lease_ms = int(os.environ.get("HELD_LEASE_MS", "500"))
