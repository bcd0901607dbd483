"""The application of ``benchmarks/fairness.py --processes N``: its tenant-limited actor, run
by ``dramaturg worker`` processes, which read the broker (and the state store) from the
environment as users' workers do. Each start is appended, with its time, to the list
``fair:<store>`` in the Redis at ``FAIR_LOG_URL``.
"""

from __future__ import annotations

import os
import time

import redis

import dramaturg

_log = redis.Redis.from_url(os.environ["FAIR_LOG_URL"])


@dramaturg.actor(
    queue_name="fair", actor_name="fair_sync", max_retries=0, limits=[dramaturg.concurrency(2, key="tenant:{store}")]
)
def sync(n: int) -> None:
    _log.rpush(f"fair:{dramaturg.current_task().context['store']}", f"{time.time():.4f}")
    time.sleep(0.3)
