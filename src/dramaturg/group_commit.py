"""Group commit: the writes of many threads made together, each thread returning once its own is done.

A thread whose item comes while no write is out writes it at once, alone; those that
come while one is out wait for it to end, and the first of them then writes every item
that has come meanwhile, in one call. Nobody waits for a timer, a lone item goes out at
once, and under load a call carries as many items as threads came meanwhile.

What a thread can rely on is what a write of its own would give: :meth:`GroupCommit.submit`
returns only once the call that carried its item returned, with that item's answer, or
raises the error of that call. Used where a thread must wait for a write before it goes
on: the Redis broker's acknowledgements (:mod:`dramaturg.brokers.redis.settling`) and
the ends of batch members (:mod:`dramaturg.batches.writer`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")


class _Pending(Generic[T, R]):
    """One item to write, and the lock its thread waits on (held until it is written, or
    until the thread is to write the next group)."""

    __slots__ = ("answer", "done", "error", "item", "wait")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = False
        self.answer: R | None = None
        self.error: BaseException | None = None
        self.wait = threading.Lock()
        self.wait.acquire()


class GroupCommit(Generic[T, R]):
    """Writes items of any thread in groups with ``write(items) -> answers`` (one answer
    per item, in order); see the module."""

    def __init__(self, write: Callable[[list[T]], Sequence[R]]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._waiting: list[_Pending[T, R]] = []
        self._busy = False  # a thread is writing a group: the others wait in _waiting

    @property
    def waiting(self) -> int:
        """How many items wait for the call out to end."""
        return len(self._waiting)

    def submit(self, item: T) -> R:
        """Write ``item`` (with those of other threads meanwhile); its answer."""
        mine: _Pending[T, R] = _Pending(item)
        with self._lock:
            busy, self._busy = self._busy, True
            if busy:
                self._waiting.append(mine)
        if busy:
            mine.wait.acquire()  # released once it is written, or for this thread to write next
        if not mine.done:
            self._write_group(mine)
        if mine.error is not None:
            raise mine.error
        return mine.answer  # type: ignore[return-value]

    def _write_group(self, mine: _Pending[T, R]) -> None:
        """Write ``mine`` and every item waiting; then hand the writing on to the first
        thread that came meanwhile, if any."""
        with self._lock:
            group, self._waiting = [mine, *self._waiting], []
        try:
            answers = self._write([pending.item for pending in group])
        except BaseException as error:  # each thread raises it, as its own write would have
            for pending in group:
                pending.error = error
        else:
            for pending, answer in zip(group, answers, strict=True):
                pending.answer = answer
        for pending in group:
            pending.done = True
            if pending is not mine:
                pending.wait.release()
        with self._lock:
            if self._waiting:
                self._waiting.pop(0).wait.release()  # not done: it writes the next group
            else:
                self._busy = False
