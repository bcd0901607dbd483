"""Acknowledgements and rejections of a worker's threads, sent to Redis together.

Dramatiq acknowledges each message with a script call of its own, from the thread that
ran it: on a worker draining short tasks that is the largest single cost of a message
(redis-py's connection checkout, the round trip, the reply), and the threads wait for it
one after another. :class:`Settler` sends them as a group commit: a thread that settles a
message while no call is out sends it at once, alone; those that come while a call is out
wait for it to end, and the first of them then sends every one that has come meanwhile,
in one call of ``settle.lua`` (:class:`~dramaturg.group_commit.GroupCommit`). Nobody
waits for a timer, a lone message goes out as before, and under load a call carries as
many messages as threads ended meanwhile.

Nothing changes in what a thread can rely on: :meth:`Settler.settle` returns only once
Redis has done it (or raises the error of the call that carried it, as a lone call
would), with the same answer per message as a call of its own (1, 0 or -1); so a worker killed
at any moment leaves its messages exactly as claimed or as settled as before. Batch members'
ends are the one difference: those of a call are written together, and what they fire is
kept by one message of the batch that the worker still holds, not always by the one whose
end completed the batch (see settle.lua).
"""

from __future__ import annotations

import hashlib
from typing import Any

from dramatiq.common import current_millis

from ...batches.state import _SCRIPT as _BATCH
from ...group_commit import GroupCommit
from .connection import OwnConnection, script

__all__ = ["Settler"]

#: settle.lua, with batch.lua as the function ``batch_end`` (its "owned-end-from" step) before it:
#: a batch member's end is written in the call that acknowledges it.
_SETTLE = "local function batch_end(KEYS, ARGV)\n" + _BATCH + "\nend\n" + script("settle")
_SETTLE_SHA = hashlib.sha1(_SETTLE.encode()).hexdigest()


class Settler:
    """Settles claimed messages of one worker (``worker_id``) in group commits; see the module."""

    def __init__(self, client: Any, namespace: str, worker_id: str) -> None:
        #: Used by the thread sending a group, one at a time.
        self._connection = OwnConnection(client)
        self._namespace = namespace
        self._worker_id = worker_id
        self._groups: GroupCommit[tuple[Any, ...], int | list[str]] = GroupCommit(self._send_group)

    @property
    def waiting(self) -> int:
        """How many messages wait for the call out to end."""
        return self._groups.waiting

    def settle(self, kind: str, queue_name: str, redis_id: str, end: tuple[Any, ...] | None = None) -> int | list[str]:
        """Acknowledge (``kind`` "a") or reject ("n") one claimed message; its answer.

        ``end``: the message is a batch member whose end (batch keys' prefix, ttl ms,
        batch id, member id, code) is written in the same call, first, with the other ends
        of the call. If the ends fire callbacks, one member of that batch in the call that
        this worker still holds is not settled, and its answer is their events (see settle.lua).
        """
        if end is None:
            return self._groups.submit((kind, queue_name, redis_id))
        return self._groups.submit((kind.upper(), queue_name, redis_id, *end))

    def put_back(self, queue_name: str, redis_id: str, copy_queue: str, copy_id: str, body: bytes) -> int:
        """Acknowledge one claimed message and enqueue its copy (``body`` under ``copy_id``
        on ``copy_queue``) in the same step, the copy only if it was still claimed; the
        answer as :meth:`settle`'s (see settle.lua)."""
        answer = self._groups.submit(("m", queue_name, redis_id, copy_queue, copy_id, body))
        return answer if isinstance(answer, int) else 0

    def _send_group(self, group: list[tuple[Any, ...]]) -> list[int | list[str]]:
        args: list[Any] = [self._worker_id, current_millis()]
        batches: tuple[Any, ...] = ()
        for settling in group:
            kind = settling[0]
            if kind == "A" or kind == "N":
                # A batch member's end: its batch keys' prefix and ttl, batch id and code once
                # per call (a "B" entry, again only where they change); its member id only
                # where it is not its Redis id (a message sent new has the one as the other).
                _, queue_name, redis_id, prefix, ttl_ms, batch_id, member_id, code = settling
                if batches != (prefix, ttl_ms, batch_id, code):
                    batches = (prefix, ttl_ms, batch_id, code)
                    args += ("B", *batches)
                if member_id == redis_id:
                    args += (kind, queue_name, redis_id)
                else:
                    args += (kind + "M", queue_name, redis_id, member_id)
            else:
                args += settling
        return [_answer(answer) for answer in self._call(args)]

    def _call(self, args: list[Any]) -> Any:
        return self._connection.run(_SETTLE_SHA, _SETTLE, [self._namespace], args)

    def close(self) -> None:
        self._connection.close()


def _answer(answer: Any) -> int | list[str]:
    """1, 0, -1; or the events a batch member's end fired ("fire:complete,success")."""
    if isinstance(answer, bytes | str):
        text = answer.decode() if isinstance(answer, bytes) else answer
        if text.startswith("fire:"):
            return [event for event in text[5:].split(",") if event]
    return int(answer)
