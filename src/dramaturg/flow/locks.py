"""Locks across every worker and process (Drupal's Lock API): ``dramaturg.lock(name)``.

::

    with dramaturg.lock("import:users.csv", ttl="30s", wait="10s") as lk:   # LockTimeout after 10 s
        for chunk in chunks:
            write(chunk, fence=lk.token)    # a token that only grows, for writes guarded by it
            lk.renew()                      # or: task.touch() renews the locks its handler holds

- **Acquire** takes the lock if nobody holds it, with a **fencing token** that only
  grows: taken in the same atomic step, the greater of the name's last token + 1 (kept
  apart from the lock, so it survives the lock's expiry) and the state store's clock in
  microseconds (so it grows across a wipe of the store too, as long as that clock does
  not go back: see :mod:`dramaturg.flow.state`). A store that accepts writes only with a
  token at least as high as the last it saw cannot be written by a holder whose lock
  expired.
- **Wait**: up to ``wait`` for a held lock (0, the default: try once), then
  :class:`~dramaturg.LockTimeout`, naming the holder. The waiting thread polls, 10 ms at
  first, backing off to 200 ms, never past the holder's expiry.
- A step the store may have done without its answer coming back raises
  :class:`~dramaturg.BrokerUnreachable`; :meth:`Lock.acquire` called again on the same
  ``Lock`` then finds the lock its first ask took (same owner) and holds it, same token.
- **Release** (the end of the ``with`` block, or :meth:`Lock.release`) and **renew** are
  refused with :class:`~dramaturg.LockLost` when this holder no longer holds it: its ttl
  passed, and another may hold it now. A holder that dies frees it when its ttl passes.
- Inside a task, ``touch()`` renews every lock its handler holds (by each lock's ttl).
- :func:`locked` says whether a name is held (and by whom: :func:`lock_holder`).

Why not redis-py's ``Lock``: it is the same design (a random owner token, release and
extend by compare-and-act in Lua), but the fencing token must be taken in the very step
that takes the lock, which its scripts do not do; it raises its own errors
(``LockNotOwnedError``), has no memory twin for eager mode, and ``dramaturg locks list``
needs the holder stored with it. So ``lock.lua`` keeps its design in twenty lines and adds
the counter (see :mod:`dramaturg.flow.state`).
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from types import TracebackType
from typing import Any

import dramatiq

from ..durations import Duration, parse_ms
from ..errors import BrokerUnreachable, LockLost, LockTimeout
from ..task import Task, current_task_or_none, touch_observers
from .state import FlowState, HeldLock, MemoryFlowState

__all__ = ["Lock", "lock", "lock_holder", "locked"]


_HOST = socket.gethostname()
#: Per thread: the locks held there, renewed by the task's touch().
_held = threading.local()


class Lock:
    """A lock on ``name`` (see the module); made by :func:`lock`. ``token`` is its fencing
    token while held, None before it is acquired and after it is released."""

    def __init__(self, name: str, *, ttl: Duration = "30s", wait: Duration = 0, broker: dramatiq.Broker | None = None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"lock: the name must be a non-empty string, not {name!r}")
        self.name = name
        self.ttl_ms = parse_ms(ttl, what="lock ttl")
        if self.ttl_ms <= 0:
            raise ValueError(f"lock {name!r}: the ttl must be more than 0, got {ttl!r}")
        self.wait_ms = parse_ms(wait, what="lock wait")
        if self.wait_ms < 0:
            raise ValueError(f"lock {name!r}: the wait must be 0 or more, got {wait!r}")
        self._broker = broker
        self._owner = uuid.uuid4().hex
        self.token: int | None = None

    def _state(self) -> FlowState:
        from .control import state_of

        return state_of(self._broker)

    def acquire(self) -> Lock:
        """Take the lock, waiting up to ``wait``; raises :class:`~dramaturg.LockTimeout`."""
        if self.token is not None:
            raise RuntimeError(f"lock {self.name!r} is held by this Lock already; make a new one to nest")
        state = self._state()
        holder = _holder()
        started = time.monotonic()
        deadline = started + self.wait_ms / 1000
        pause = 0.01
        while True:
            fence, expires_ms = _call(lambda: state.lock_acquire(self.name, self._owner, self.ttl_ms, holder))
            if fence is not None:
                self.token = fence
                _locks_here().append(self)
                return self
            left = deadline - time.monotonic()
            if left <= 0:
                found = _call(lambda: state.lock_holder(self.name))
                raise LockTimeout(
                    self.name, int((time.monotonic() - started) * 1000), None if found is None else found.holder
                )
            sleep = min(left, pause * random.uniform(0.8, 1.2), max(expires_ms, 1) / 1000)
            if isinstance(state, MemoryFlowState):
                with state.changed:
                    state.changed.wait(sleep)  # woken by a release in this process
            else:
                time.sleep(sleep)
            pause = min(pause * 2, 0.2)

    def release(self) -> None:
        """Free the lock; raises :class:`~dramaturg.LockLost` when it is no longer ours."""
        if self.token is None:
            raise LockLost(f"lock {self.name!r} is not held by this Lock (never acquired, or released)")
        self._forget()
        state = self._state()
        token, self.token = self.token, None
        if not _call(lambda: state.lock_release(self.name, self._owner)):
            raise LockLost(
                f"lock {self.name!r} (token {token}) was no longer held by this holder when released:"
                f" its ttl ({self.ttl_ms} ms) passed; another may have held it since"
            )
        self.token = None

    def renew(self, ttl: Duration | None = None) -> None:
        """Hold the lock ``ttl`` (default: its own) from now; raises :class:`~dramaturg.LockLost`
        when it is no longer ours."""
        ttl_ms = self.ttl_ms if ttl is None else parse_ms(ttl, what="lock renew")
        if self.token is None:
            raise LockLost(f"lock {self.name!r} is not held by this Lock (never acquired, or released)")
        state = self._state()
        if not _call(lambda: state.lock_renew(self.name, self._owner, ttl_ms)):
            self._forget()
            raise LockLost(
                f"lock {self.name!r} (token {self.token}) could not be renewed: its ttl ({self.ttl_ms} ms)"
                " passed; another may hold it now"
            )

    def _forget(self) -> None:
        held = _locks_here()
        if self in held:
            held.remove(self)

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.token is not None:
            self.release()

    def __repr__(self) -> str:
        return f"<Lock {self.name!r} {'token ' + str(self.token) if self.token is not None else 'not held'}>"


def lock(name: str, *, ttl: Duration = "30s", wait: Duration = 0, broker: dramatiq.Broker | None = None) -> Lock:
    """A lock on ``name``, held at most ``ttl`` unless renewed, taken by ``with`` (or
    :meth:`Lock.acquire`) after waiting at most ``wait`` (default 0: try once).

    Raises :class:`~dramaturg.StateUnavailable` when there is no state store (RabbitMQ
    without ``[state] url``) and :class:`~dramaturg.BrokerUnreachable` when it does not
    answer: never "acquired" without a store that says so.
    """
    return Lock(name, ttl=ttl, wait=wait, broker=broker)


def lock_holder(name: str, broker: dramatiq.Broker | None = None) -> HeldLock | None:
    """Who holds the lock ``name`` (its token, holder, time left), or None."""
    from .control import state_of

    state = state_of(broker)
    found: HeldLock | None = _call(lambda: state.lock_holder(name))
    return found


def locked(name: str, broker: dramatiq.Broker | None = None) -> bool:
    """Whether someone holds the lock ``name`` now."""
    return lock_holder(name, broker) is not None


def _locks_here() -> list[Lock]:
    held: list[Lock] | None = getattr(_held, "locks", None)
    if held is None:
        held = _held.locks = []
    return held


def _holder() -> str:
    """``host:pid thread``, and the task's message id inside a task."""
    label = f"{_HOST}:{os.getpid()} {threading.current_thread().name}"
    task = current_task_or_none()
    return f"{label} task {task.message_id}" if task is not None else label


def _call(step: Any) -> Any:
    """Run a step against the state store; its client's errors become BrokerUnreachable."""
    try:
        return step()
    except (LockLost, LockTimeout):
        raise
    except Exception as error:
        if type(error).__module__.startswith("redis"):
            raise BrokerUnreachable(
                f"the state store did not answer, so the lock step was not done: {type(error).__name__}: {error}"
            ) from None
        raise


def _renew_on_touch(task: Task) -> None:
    for held in list(getattr(_held, "locks", ())):
        try:
            held.renew()
        except Exception as error:  # logged, not raised: touch() itself must not fail for it
            import logging

            logging.getLogger("dramaturg.flow").warning("touch(): lock %r not renewed: %s", held.name, error)


if _renew_on_touch not in touch_observers:
    touch_observers.append(_renew_on_touch)
