"""Flow control by key, across every worker: locks, concurrency and rate limits, unique tasks.

::

    with dramaturg.lock("import:users.csv", ttl="30s", wait="10s") as lk:   # LockTimeout after 10 s
        ...                                        # lk.token: a fencing token that only grows

    @dramaturg.actor(queue_name="api", limits=[
        dramaturg.concurrency(2, key="tenant:{store}"),     # at most 2 running per store
        dramaturg.rate(100, per="1m", key="shopify"),         # at most 100 starts in any minute
    ])
    def sync(order_id: int) -> None: ...

    @dramaturg.actor(unique=dramaturg.unique(key="reindex:{0}", until="started"))
    def reindex(product_id: int) -> None: ...

- Locks: :mod:`dramaturg.flow.locks`.
- Key templates, limits and unique keys as declared: :mod:`dramaturg.flow.limits`.
- How they are enforced (a task that may not start waits on the broker, spends no
  retry, and says what it waits for in its status): :mod:`dramaturg.flow.control`.
- Where the state lives (Lua scripts in Redis, or memory in eager mode):
  :mod:`dramaturg.flow.state`.

The state store is the broker's own Redis (Redis, embedded) or ``[state] url`` (needed
on RabbitMQ); without one, a lock or a send to an actor with limits raises
:class:`~dramaturg.StateUnavailable` / :class:`~dramaturg.FlowSendError` naming the
setting. In eager mode everything is kept in memory, with the same meaning.
"""

from __future__ import annotations

from collections.abc import Iterator

import dramatiq

from .control import FlowControl, state_of
from .limits import Concurrency, Rate, Unique, concurrency, rate, unique
from .locks import Lock, lock, lock_holder, locked
from .state import HeldLock, Usage

__all__ = [
    "Concurrency",
    "FlowControl",
    "HeldLock",
    "Lock",
    "Rate",
    "Unique",
    "Usage",
    "concurrency",
    "held_locks",
    "limit_usage",
    "lock",
    "lock_holder",
    "locked",
    "rate",
    "unique",
]


def held_locks(broker: dramatiq.Broker | None = None) -> Iterator[HeldLock]:
    """Every lock held now, by name (``dramaturg locks list``)."""
    yield from state_of(broker).locks()


def limit_usage(broker: dramatiq.Broker | None = None) -> Iterator[Usage]:
    """Every limit key in use now: its slots taken (or its starts in the window), and the
    tasks waiting for it (``dramaturg limits``)."""
    yield from state_of(broker).usage()
