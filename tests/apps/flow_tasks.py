"""Actors and a lock contender for the flow-control tests, run in worker processes.

Each task measures the bound it runs under itself: on entry it INCRs a counter in the
test's Redis (``FLOW_COUNTER_URL``), keeps the highest value seen in ``<key>:max``, and
DECRs it on the way out; each start is also appended to ``FLOW_LOG``:
``start <message id> <pid> <unix time>``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import redis

import dramaturg

from . import event_log

_client: redis.Redis | None = None

# INCR a counter, keep its highest value in <counter>:max.
_ENTER = """
local now = redis.call('INCR', KEYS[1])
local top = tonumber(redis.call('GET', KEYS[2]) or '0')
if now > top then redis.call('SET', KEYS[2], now) end
return now
"""


def counter() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["FLOW_COUNTER_URL"])
    return _client


def enter(name: str) -> int:
    return int(counter().eval(_ENTER, 2, name, f"{name}:max"))


def leave(name: str) -> None:
    counter().decr(name)


def _run(name: str, seconds: float) -> None:
    task = dramaturg.current_task()
    event_log.append("FLOW_LOG", f"start {task.message_id} {os.getpid()} {time.time():.3f}")
    enter(name)
    try:
        time.sleep(seconds)
    finally:
        leave(name)
        counter().incr(f"{name}:done")


@dramaturg.actor(queue_name="flow", max_retries=0, limits=[dramaturg.concurrency(2, key="tenant:{store}")])
def per_store(n: int, seconds: float) -> None:
    """At most two at once per store (the store context value)."""
    _run(f"running:{dramaturg.current_task().context['store']}", seconds)


@dramaturg.actor(queue_name="flow", ttr=2_000, max_retries=0, limits=[dramaturg.concurrency(1, key="solo")])
def solo(n: int, first_run_s: float) -> None:
    """One at a time; a 2 s ttr, so a slot outlives a killed worker by 2 s at most. Task 0
    runs ``first_run_s`` the first time (to be killed), 10 ms after."""
    if n == 0 and counter().set("solo:first", 1, nx=True):
        _run("running:solo:killed", first_run_s)  # its leave() never comes: counted apart
    else:
        _run("running:solo", 0.01)


@dramaturg.actor(queue_name="flow", max_retries=0, limits=[dramaturg.concurrency(32, key="wide")])
def wide(n: int, seconds: float) -> None:
    """At most 32 at once: a limit roomy enough that workers take slots ahead on credit."""
    _run("running:wide", seconds)


@dramaturg.actor(queue_name="flow", max_retries=0, limits=[dramaturg.rate(5, per="1s", key="api")])
def rated(n: int) -> None:
    """At most five starts in any second."""
    event_log.append("FLOW_LOG", f"start {dramaturg.current_task().message_id} {os.getpid()} {time.time():.3f}")
    counter().incr("rated:done")


def contend(name: str, rounds: int) -> None:
    """Take the lock ``name`` ``rounds`` times, measuring exclusion; print each token."""
    for _ in range(rounds):
        with dramaturg.lock(name, ttl="10s", wait="30s") as lk:
            inside = enter("locked")
            counter().rpush("tokens", lk.token or 0)
            time.sleep(0.002)
            leave("locked")
            if inside != 1:
                print(f"violation {inside}", flush=True)
    print("done", flush=True)


def hold(name: str, ttl: str) -> None:
    """Take the lock ``name`` for ``ttl``, say so with its token and the time (epoch s) just
    before it was asked for (its ttl began no earlier), and sleep (to be killed)."""
    asked_at = time.time()
    lk = dramaturg.lock(name, ttl=ttl).acquire()
    print(f"holding {lk.token} {asked_at!r}", flush=True)
    threading.Event().wait(600)  # until the test kills this process


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    argv: list[Any] = rest
    if command == "contend":
        contend(argv[0], int(argv[1]))
    elif command == "hold":
        hold(argv[0], argv[1])
    dramaturg.shutdown()
