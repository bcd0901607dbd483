"""A ``dramaturg held kick`` that stops itself (SIGSTOP) just before it requeues its first
task, as a kicker paused by an operator, a long GC or a VM stall would be (worker.modules
of the stalled-kicker test in tests/test_held_faults.py).

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


class StopBeforeFirstRequeue(dramatiq.Middleware):
    def __init__(self) -> None:
        self.stopped = False

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        if not self.stopped:
            self.stopped = True
            os.kill(os.getpid(), signal.SIGSTOP)


dramaturg.get_broker().add_middleware(StopBeforeFirstRequeue())
_store = dramaturg.held_tasks()
if isinstance(_store, RedisHeldStore):
    _store.lease_ms = int(os.environ.get("HELD_LEASE_MS", "500"))
