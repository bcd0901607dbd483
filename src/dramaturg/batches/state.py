"""Where a batch's state is kept: Redis (every real broker), or memory (eager mode).

Both answer the same few steps, with the same meaning, so that a batch behaves the same
inline as on workers:

- ``create``: a new batch, open (not sealed), no members;
- ``add``: members by message id, before they are sent (a member already in it is not
  counted again);
- ``end``: members that ended, succeeded ("s"), failed ("f": rejected), held ("h",
  counted as failed too) or cancelled ("c": ended, neither succeeded nor failed), for
  many members at once; what fires for each;
- ``seal``: no member is added from outside any more (members may still add members to
  it); what fires;
- ``drop``: members added but certainly not sent (their send failed) leave it; what
  fires then;
- ``note``: best-effort news of members (running, waiting again, progress);
- ``sent``: a callback was published;
- ``stale``: the batches whose callbacks have been firing (not yet published) for longer
  than a while, each taken for as long again by the caller that gets it, for a worker to
  publish them again (:meth:`BatchTracker.refire <dramaturg.batches.tracker.BatchTracker.refire>`);
- ``unended``: the members that have not ended (for cancelling a batch), and
  ``describe``: fields that only tell (who asked for it to be cancelled, and when).

What "fires" is ``complete`` (sealed, and every member has ended) and ``success``
(sealed, and every member succeeded), each once: a compare-and-set in the same atomic
step that counted the end (``batch.lua`` on Redis, a lock in memory).

On Redis the keys are ``<namespace>:__batch__:<id>`` (the batch's fields and counts),
``...:m`` (its members), ``...:p`` (running members' progress), and the index
``<namespace>:__batches__`` (ids by creation time, for ``dramaturg batch list``); they
expire ``[batch] ttl`` after the batch ends (the index entry is dropped when a listing
finds its batch gone).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import BatchNotFound

if TYPE_CHECKING:
    import redis

__all__ = ["BatchState", "MemoryBatchState", "RedisBatchState", "fired", "progress_prefix"]

_SCRIPT = resources.files("dramaturg.batches").joinpath("batch.lua").read_text(encoding="utf-8")
_SCRIPT_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()

#: An end to record: (batch id, member message id, "s" | "f" | "h" | "c").
End = tuple[str, str, str]
#: A note: (batch id, member message id, "r" running | "w" waiting again | "g" progress, value).
Note = tuple[str, str, str, str]


#: An end's batch and outcome (its group in ``batch.lua``'s end step), and its member.
_BATCH_AND_CODE = itemgetter(0, 2)
_MEMBER = itemgetter(1)
#: The answer of an end that fired nothing, shared (callers only read answers).
_NOTHING: list[str] = []


def fired(answer: Any) -> list[str]:
    """The events an answer of ``seal`` or ``end`` names (``"complete,success"`` -> both)."""
    if isinstance(answer, bytes):
        answer = answer.decode()
    return [event for event in str(answer).split(",") if event]


class BatchState(Protocol):
    """The steps every store of batches answers (see the module)."""

    def create(self, batch_id: str, fields: Mapping[str, str]) -> None: ...
    def add(self, batch_id: str, member_ids: Sequence[str]) -> int: ...
    def seal(self, batch_id: str) -> list[str]: ...
    def drop(self, batch_id: str, member_ids: Sequence[str]) -> list[str]: ...
    def end(self, ends: Sequence[End], *, owned: bool = False) -> list[list[str]]: ...
    def note(self, notes: Sequence[Note]) -> None: ...
    def task_progress(self, items: Sequence[tuple[str, str]]) -> None: ...
    def sent(self, batch_id: str, event: str) -> None: ...
    def disown(self, batch_id: str) -> None: ...
    def stale(self, older_ms: int, limit: int) -> list[str]: ...
    def close(self) -> None: ...
    def read(self, batch_id: str) -> tuple[dict[str, str], dict[str, str]] | None: ...
    def ids(self, limit: int) -> list[str]: ...
    def unended(self, batch_id: str) -> list[str]: ...
    def describe(self, batch_id: str, fields: Mapping[str, str]) -> None: ...


def member_state(stored: str) -> str:
    """A member's state by its number in ``batch.lua``'s members hash: 1 "p" (sent), 2 "r"
    (running), then ten times its end and what it was before: 10-12 "s" (succeeded),
    20-22 "f" (failed), 30-32 "h" (held), 40-42 "c" (cancelled). The version before
    2026-12-03 stored the letter itself, which a batch of that time may still hold."""
    if not stored.isdigit():
        return stored
    number = int(stored)
    return "pr"[number - 1] if number < 10 else "sfhc"[number // 10 - 1]


class RedisBatchState:
    """Batches in a Redis (the state store's): ``batch.lua`` for every change."""

    def __init__(self, client: redis.Redis, *, namespace: str, ttl_ms: int) -> None:
        self.client = client
        self.prefix = f"{namespace}:__batch__:"
        #: A task's last ``progress()``, for its status: ``<namespace>:__progress__:<message id>``.
        self.progress_prefix = progress_prefix(namespace)
        self.index = f"{namespace}:__batches__"
        self.ttl_ms = ttl_ms
        self._script = client.register_script(_SCRIPT)
        # Ends are on the message path: written straight on a connection kept for them
        # (about 15 us of CPU a call against 40 through redis-py's pool; see OwnConnection).
        from ..brokers.redis.connection import OwnConnection  # redis: imported only when used

        self._own = OwnConnection(client)
        self._own_lock = threading.Lock()

    def _run(self, *args: Any) -> Any:
        return self._script(keys=[self.prefix], args=list(args))

    def create(self, batch_id: str, fields: Mapping[str, str]) -> None:
        meta: dict[str, str | int] = {
            "sealed": "0",
            "total": 0,
            "running": 0,
            "succeeded": 0,
            "failed": 0,
            "held": 0,
            "cancelled": 0,
            **fields,
        }
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.prefix + batch_id, mapping=meta)  # type: ignore[arg-type]
            pipe.zadd(self.index, {batch_id: int(fields["created_at"])})
            pipe.execute()

    def add(self, batch_id: str, member_ids: Sequence[str]) -> int:
        added = int(self._run("add", batch_id, *member_ids))
        if added < 0:
            raise BatchNotFound(batch_id)
        return added

    def seal(self, batch_id: str) -> list[str]:
        answer = self._run("seal", batch_id, _now_ms(), self.ttl_ms)
        if answer == -1:
            raise BatchNotFound(batch_id)
        return fired(answer)

    def drop(self, batch_id: str, member_ids: Sequence[str]) -> list[str]:
        answer = self._run("drop", batch_id, _now_ms(), self.ttl_ms, *member_ids)
        return [] if answer == -1 else fired(answer)

    def end(self, ends: Sequence[End], *, owned: bool = False) -> list[list[str]]:
        """``owned``: the caller keeps each member's message unacknowledged until what
        it fires is published (so it is not put in the firing index; see ``batch.lua``)."""
        args: list[Any] = ["owned-end" if owned else "end", _now_ms(), self.ttl_ms]
        for (batch_id, code), group in itertools.groupby(ends, _BATCH_AND_CODE):
            members = list(map(_MEMBER, group))
            args += (batch_id, code, len(members), *members)
        with self._own_lock:  # one caller at a time: the group commit's writer, nearly always alone
            answer = self._own.run(_SCRIPT_SHA, _SCRIPT, [self.prefix], args)
        answers: list[list[str]] = [_NOTHING] * len(ends)  # nearly all: nothing fired (never changed in place)
        for i in range(0, len(answer), 2):
            answers[int(answer[i]) - 1] = fired(answer[i + 1])
        return answers

    def close(self) -> None:
        self._own.close()

    def note(self, notes: Sequence[Note]) -> None:
        args: list[Any] = ["note"]
        for note in notes:
            args += note
        self._run(*args)

    def task_progress(self, items: Sequence[tuple[str, str]]) -> None:
        """Each task's last progress (message id, ``"<fraction>|<text>"``), kept ``ttl_ms``."""
        with self.client.pipeline(transaction=False) as pipe:
            for message_id, value in items:
                pipe.set(self.progress_prefix + message_id, value, px=self.ttl_ms)
            pipe.execute()

    def sent(self, batch_id: str, event: str) -> None:
        self._run("sent", batch_id, event)

    def disown(self, batch_id: str) -> None:
        """Put the batch's firing events in the firing index: their owner (see ``end``'s
        ``owned``) stops trying them, and leaves them to the workers' sweep."""
        self._run("disown", batch_id)

    def stale(self, older_ms: int, limit: int) -> list[str]:
        """Up to ``limit`` batches with a callback firing for over ``older_ms`` (Redis's
        clock), each taken for ``older_ms`` more: another caller meanwhile gets the others."""
        return [_text(batch_id) for batch_id in self._run("stale", older_ms, limit)]

    def read(self, batch_id: str) -> tuple[dict[str, str], dict[str, str]] | None:
        """The batch's fields and its running members' progress; None if there is no such batch."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.prefix + batch_id)
            pipe.hgetall(self.prefix + batch_id + ":p")
            meta, progress = pipe.execute()
        if not meta:
            return None
        return _texts(meta), _texts(progress)

    def members(self, batch_id: str) -> dict[str, str]:
        """Each member of ``batch_id`` and its state, read in steps: "p" sent, "r" running,
        or how it ended, "s", "f", "h" or "c" (``batch.lua`` keeps them as numbers)."""
        return {
            _text(member): member_state(_text(state))
            for member, state in self.client.hscan_iter(self.prefix + batch_id + ":m", count=1000)
        }

    def unended(self, batch_id: str) -> list[str]:
        """The members of ``batch_id`` that have not ended (sent, or running), read in steps."""
        return [member for member, state in self.members(batch_id).items() if state in ("p", "r")]

    def describe(self, batch_id: str, fields: Mapping[str, str]) -> None:
        """Set fields of the batch that only tell something (never a count), if it exists."""
        if self.client.exists(self.prefix + batch_id):
            self.client.hset(self.prefix + batch_id, mapping=dict(fields))  # type: ignore[arg-type]

    def ids(self, limit: int) -> list[str]:
        """The newest ``limit`` batches' ids, newest first; ids whose batch expired are dropped."""
        found = [_text(i) for i in self.client.zrevrange(self.index, 0, max(0, limit - 1))]  # type: ignore[arg-type]
        if not found:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for batch_id in found:
                pipe.exists(self.prefix + batch_id)
            exists = pipe.execute()
        gone = [batch_id for batch_id, there in zip(found, exists, strict=True) if not there]
        if gone:
            self.client.zrem(self.index, *gone)
        return [batch_id for batch_id, there in zip(found, exists, strict=True) if there]


class MemoryBatchState:
    """Batches in this process's memory, for eager mode: the steps of ``batch.lua`` in Python."""

    def __init__(self, *, ttl_ms: int) -> None:
        self.ttl_ms = ttl_ms
        self._lock = threading.Lock()
        #: id -> (fields, members, progress, expires at (monotonic s) or None)
        self._batches: dict[str, tuple[dict[str, Any], dict[str, str], dict[str, str], list[float | None]]] = {}

    def _get(self, batch_id: str) -> tuple[dict[str, Any], dict[str, str], dict[str, str], list[float | None]] | None:
        found = self._batches.get(batch_id)
        if found is not None:
            expires = found[3][0]
            if expires is not None and expires <= time.monotonic():
                del self._batches[batch_id]
                return None
        return found

    def create(self, batch_id: str, fields: Mapping[str, str]) -> None:
        meta: dict[str, Any] = {
            "sealed": "0",
            "total": 0,
            "running": 0,
            "succeeded": 0,
            "failed": 0,
            "held": 0,
            "cancelled": 0,
        }
        with self._lock:
            self._batches[batch_id] = ({**meta, **fields}, {}, {}, [None])

    def add(self, batch_id: str, member_ids: Sequence[str]) -> int:
        with self._lock:
            found = self._get(batch_id)
            if found is None:
                raise BatchNotFound(batch_id)
            meta, members, _, _ = found
            added = 0
            for member in member_ids:
                if member not in members:
                    members[member] = "p"
                    added += 1
            meta["total"] += added
            return added

    def seal(self, batch_id: str) -> list[str]:
        with self._lock:
            found = self._get(batch_id)
            if found is None:
                raise BatchNotFound(batch_id)
            found[0]["sealed"] = "1"
            return self._fire(found, repeated=False)

    def drop(self, batch_id: str, member_ids: Sequence[str]) -> list[str]:
        with self._lock:
            found = self._get(batch_id)
            if found is None:
                return []
            meta, members, _, _ = found
            for member in member_ids:
                if members.get(member) == "p":
                    del members[member]
                    meta["total"] -= 1
            return self._fire(found, repeated=False)

    def end(self, ends: Sequence[End], *, owned: bool = False) -> list[list[str]]:
        answers: list[list[str]] = []
        with self._lock:
            for batch_id, member, new in ends:
                found = self._get(batch_id)
                if found is None:
                    answers.append([])
                    continue
                meta, members, progress, _ = found
                old = members.get(member)
                # A member that had ended already: callbacks left firing go out again (batch.lua).
                repeated = old == new or old in ("s", "f", "h", "c")
                if old != new and old != "s":
                    if old is None:
                        meta["total"] += 1
                    elif old == "r":
                        meta["running"] -= 1
                    elif old in ("f", "h"):
                        meta["failed"] -= 1
                        meta["held"] -= old == "h"
                    elif old == "c":
                        meta["cancelled"] -= 1
                    members[member] = new
                    meta["succeeded" if new == "s" else "cancelled" if new == "c" else "failed"] += 1
                    meta["held"] += new == "h"
                    progress.pop(member, None)
                answers.append(self._fire(found, repeated=repeated))
        return answers

    def _fire(self, found: tuple[dict[str, Any], Any, Any, list[float | None]], *, repeated: bool) -> list[str]:
        meta = found[0]
        if meta["sealed"] != "1" or meta["succeeded"] + meta["failed"] + meta["cancelled"] < meta["total"]:
            return []
        events = []
        if "complete" not in meta:
            meta["complete"], meta["finished_at"] = "firing", str(_now_ms())
            found[3][0] = time.monotonic() + self.ttl_ms / 1000
            events.append("complete")
        elif meta["complete"] == "firing" and repeated:
            events.append("complete")
        if meta["succeeded"] == meta["total"]:
            if "success" not in meta:
                meta["success"] = "firing"
                events.append("success")
            elif meta["success"] == "firing" and repeated:
                events.append("success")
        return events

    def note(self, notes: Sequence[Note]) -> None:
        with self._lock:
            for batch_id, member, kind, value in notes:
                found = self._get(batch_id)
                if found is None:
                    continue
                meta, members, progress, _ = found
                state = members.get(member)
                if kind == "r" and state == "p":
                    members[member] = "r"
                    meta["running"] += 1
                elif kind == "w" and state == "r":
                    members[member] = "p"
                    meta["running"] -= 1
                    progress.pop(member, None)
                elif kind == "g" and state in ("r", "p"):
                    progress[member] = value

    def close(self) -> None:
        pass

    def task_progress(self, items: Sequence[tuple[str, str]]) -> None:
        pass  # eager mode keeps no task status

    def sent(self, batch_id: str, event: str) -> None:
        with self._lock:
            found = self._get(batch_id)
            if found is not None and found[0].get(event) == "firing":
                found[0][event] = "sent"

    def disown(self, batch_id: str) -> None:
        pass  # eager mode: nothing owns a firing callback (see stale)

    def stale(self, older_ms: int, limit: int) -> list[str]:
        """None: in eager mode a callback is published (run) by the send that fires it, and
        one that fails raises there."""
        return []

    def read(self, batch_id: str) -> tuple[dict[str, str], dict[str, str]] | None:
        with self._lock:
            found = self._get(batch_id)
            if found is None:
                return None
            return {k: str(v) for k, v in found[0].items()}, dict(found[2])

    def unended(self, batch_id: str) -> list[str]:
        with self._lock:
            found = self._get(batch_id)
            return [] if found is None else [m for m, state in found[1].items() if state in ("p", "r")]

    def describe(self, batch_id: str, fields: Mapping[str, str]) -> None:
        with self._lock:
            found = self._get(batch_id)
            if found is not None:
                found[0].update(fields)

    def ids(self, limit: int) -> list[str]:
        with self._lock:
            live = [(batch_id, found) for batch_id in list(self._batches) if (found := self._get(batch_id))]
            live.sort(key=lambda item: int(item[1][0]["created_at"]), reverse=True)
        return [batch_id for batch_id, _ in live[:limit]]


def progress_prefix(namespace: str) -> str:
    """The prefix of the keys that keep tasks' last progress (read by task status)."""
    return f"{namespace}:__progress__:"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _texts(mapping: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in mapping.items()}
