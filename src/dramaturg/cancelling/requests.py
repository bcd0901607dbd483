"""Where cancel requests are kept: the state store, a key per message id and one feed.

- ``<namespace>:__cancel__:<message id>``: the request, ``{"by": ..., "at": ms}`` as
  JSON, set only where there is none (the first request stands), expiring ``[state]
  ttl`` after it was made, as the task's status record does;
- ``<namespace>:__cancels__``: the feed, a stream of the ids of the requests of the last
  ``[state] ttl`` (an entry per script call), written in the same atomic step
  (``cancel.lua``), and of the requests withdrawn (``withdraw.lua``: a held task that is
  kicked runs again, though a request made before it ended held is kept).

Workers never look a request up per task: each worker process reads the feed from where
it last read (one round trip for every request made since, however many tasks it runs;
see :mod:`dramaturg.cancelling.watch`) and checks the ids of the tasks it takes and runs
against what it read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

__all__ = ["CancelRequests", "Request"]

_SCRIPT = resources.files("dramaturg.cancelling").joinpath("cancel.lua").read_text(encoding="utf-8")
_WITHDRAW = resources.files("dramaturg.cancelling").joinpath("withdraw.lua").read_text(encoding="utf-8")
#: Ids per script call (a batch's members are asked for in chunks).
CHUNK = 1000


class Request:
    """One cancel request: who asked (``by``) and when (``at``, ms since the epoch)."""

    __slots__ = ("at", "by")

    def __init__(self, by: str, at: int) -> None:
        self.by = by
        self.at = at

    def __repr__(self) -> str:
        return f"<Request by {self.by!r} at {self.at}>"


class CancelRequests:
    """The cancel requests of one namespace in a Redis (the state store's client)."""

    def __init__(self, client: redis.Redis, *, namespace: str, ttl_ms: int) -> None:
        self.client = client
        self.prefix = f"{namespace}:__cancel__:"
        self.feed_key = f"{namespace}:__cancels__"
        self.ttl_ms = ttl_ms
        self._script = client.register_script(_SCRIPT)
        self._withdraw = client.register_script(_WITHDRAW)

    def request(self, message_ids: Sequence[str], by: str) -> list[str]:
        """Ask for ``message_ids`` to be cancelled; returns those that had no request yet."""
        value = json.dumps({"by": by, "at": int(time.time() * 1000)}, separators=(",", ":"))
        new: list[str] = []
        for start in range(0, len(message_ids), CHUNK):
            chunk = list(message_ids[start : start + CHUNK])
            answers = self._script(keys=[self.prefix, self.feed_key], args=[self.ttl_ms, value, *chunk])
            new += [message_id for message_id, answer in zip(chunk, answers, strict=True) if int(answer)]
        return new

    def withdraw(self, held_at: Mapping[str, int]) -> list[str]:
        """Withdraw the requests for the message ids of ``held_at`` that were made before
        each was held (its value, ms: a held task about to be kicked); returns those
        withdrawn. Workers forget them at their next read of the feed, and one that takes
        such a task before then looks its request up (:meth:`get`)."""
        withdrawn: list[str] = []
        items = list(held_at.items())
        for start in range(0, len(items), CHUNK):
            chunk = items[start : start + CHUNK]
            args = [self.ttl_ms, *(part for message_id, at in chunk for part in (message_id, at))]
            answers = self._withdraw(keys=[self.prefix, self.feed_key], args=args)
            withdrawn += [message_id for (message_id, _), answer in zip(chunk, answers, strict=True) if int(answer)]
        return withdrawn

    def get(self, message_id: str) -> Request | None:
        """The request for ``message_id``, or None."""
        return _decode(self.client.get(self.prefix + message_id))

    def feed(self, after: str | None) -> tuple[list[tuple[str, float, bool]], str | None]:
        """``(message id, when: ms, the store's clock, withdrawn)`` for every request
        written (``withdrawn`` False) or withdrawn (True) after the feed's entry ``after``
        (None: all that are kept), in the order they were, and the last entry read
        (``after`` again when there is none)."""
        found: list[tuple[Any, dict[Any, Any]]] = self.client.xrange(  # type: ignore[assignment]
            self.feed_key, "-" if after is None else f"({after}", "+"
        )
        requests = []
        for entry, fields in found:
            at = float(_text(entry).partition("-")[0])
            requests += [(_text(message_id), at, _text(field).startswith("w")) for field, message_id in fields.items()]
        return requests, _text(found[-1][0]) if found else after


def _decode(raw: Any) -> Request | None:
    if raw is None:
        return None
    try:
        stored = json.loads(raw)
        return Request(str(stored["by"]), int(stored["at"]))
    except (ValueError, KeyError, TypeError):
        return Request("?", 0)  # written by a newer version: a request all the same


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
