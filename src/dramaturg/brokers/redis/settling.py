"""Acknowledgements and rejections of a worker's threads, sent to Redis together.

Dramatiq acknowledges each message with a script call of its own, from the thread that
ran it: on a worker draining short tasks that is the largest single cost of a message
(redis-py's connection checkout, the round trip, the reply), and the threads wait for it
one after another. :class:`Settler` sends them as a group commit: a thread that settles a
message while no call is out sends it at once, alone; those that come while a call is out
wait for it to end, and the first of them then sends every one that has come meanwhile,
in one call of ``settle.lua``. Nobody waits for a timer, a lone message goes out as
before, and under load a call carries as many messages as threads ended meanwhile.

Nothing changes in what a thread can rely on: :meth:`Settler.settle` returns only once
Redis has done it (or raises the error of the call that carried it, as a lone call
would), with the same answer per message as a call of its own (1, 0 or -1); so a worker killed
at any moment leaves its messages exactly as claimed or as settled as before.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from dramatiq.common import current_millis

from .connection import OwnConnection, script

__all__ = ["Settler"]

_SETTLE = script("settle")
_SETTLE_SHA = hashlib.sha1(_SETTLE.encode()).hexdigest()


class _Settling:
    """One message to settle, and the lock its thread waits on (held until it is settled,
    or until the thread is to send the next group)."""

    __slots__ = ("answer", "done", "error", "kind", "queue_name", "redis_id", "wait")

    def __init__(self, kind: str, queue_name: str, redis_id: str) -> None:
        self.kind = kind
        self.queue_name = queue_name
        self.redis_id = redis_id
        self.done = False
        self.answer = 0
        self.error: BaseException | None = None
        self.wait = threading.Lock()
        self.wait.acquire()


class Settler:
    """Settles claimed messages of one worker (``worker_id``) in group commits; see the module."""

    def __init__(self, client: Any, namespace: str, worker_id: str) -> None:
        #: Used by the thread sending a group, one at a time.
        self._connection = OwnConnection(client)
        self._namespace = namespace
        self._worker_id = worker_id
        self._lock = threading.Lock()
        self._waiting: list[_Settling] = []
        self._sending = False  # a thread is sending a group: the others wait in _waiting

    def settle(self, kind: str, queue_name: str, redis_id: str) -> int:
        """Acknowledge (``kind`` "a") or reject ("n") one claimed message; its answer."""
        mine = _Settling(kind, queue_name, redis_id)
        with self._lock:
            sending, self._sending = self._sending, True
            if sending:
                self._waiting.append(mine)
        if sending:
            mine.wait.acquire()  # released once it is settled, or for this thread to send next
        if not mine.done:
            self._send_group(mine)
        if mine.error is not None:
            raise mine.error
        return mine.answer

    def _send_group(self, mine: _Settling) -> None:
        """Send ``mine`` and every message waiting; then hand the sending on to the first
        thread that came meanwhile, if any."""
        with self._lock:
            group, self._waiting = [mine, *self._waiting], []
        args: list[Any] = [self._worker_id, current_millis()]
        for item in group:
            args += (item.kind, item.queue_name, item.redis_id)
        try:
            answers = self._call(args)
        except BaseException as error:  # each thread raises it, as its own call would have
            for item in group:
                item.error = error
        else:
            for item, answer in zip(group, answers, strict=True):
                item.answer = int(answer)
        for item in group:
            item.done = True
            if item is not mine:
                item.wait.release()
        with self._lock:
            if self._waiting:
                self._waiting.pop(0).wait.release()  # not done: it sends the next group
            else:
                self._sending = False

    def _call(self, args: list[Any]) -> Any:
        return self._connection.run(_SETTLE_SHA, _SETTLE, [self._namespace], args)

    def close(self) -> None:
        self._connection.close()
