"""Where schedules' ledger is kept: Redis (every real broker), or memory (eager and stub).

Both answer the same steps with the same meaning:

- ``register``: the schedules a scheduler starts with become the registered ones (by id,
  with a digest of each definition); ids no longer among them are dropped, so a removed
  schedule stops firing, and a scheduler still running an older definition of a schedule
  fires it no more (its digest is not the registered one). A newly registered schedule
  starts from the store's now (less ``back_ms``): its past slots never fire;
- ``claim``: take one slot of a schedule, a compare-and-set on the newest slot claimed
  (``last``): a slot fires only if it is newer, so any number of schedulers, restarted
  ones and ones whose clocks disagree, fire each slot at most once. The claim leaves the
  slot *pending* under a lease (``lease_ms``, from the store's now) until ``sent`` says it was published. The
  slots it passes over are counted missed if ``last`` is still the one the caller saw
  (``seen_last``): a race leaves a few uncounted, never one counted that fired;
- ``recover``: the oldest pending slot whose lease ended (its scheduler died between
  claim and publish) is handed to the caller, which publishes it again with the same
  message id. Each claimed slot is pending on its own, so the slots claimed after it do
  not hide it;
- ``pause`` / ``resume``: a paused schedule claims nothing; on resume the slots that
  passed while it was paused (by the store's clock) are left out;
- ``outcome``: what became of the last firing when no task status says it (a drain's summary);
- ``read``: one schedule's ledger, for ``dramaturg schedule list``.

On Redis the keys are ``<namespace>:__schedule__:<id>`` (a hash per schedule),
``...:<id>:pending`` (its pending slots and their leases' ends) and
``<namespace>:__schedules__`` (the registry); each step is one call of ``schedule.lua``.
They do not expire: a schedule's ledger is a few fields, and it is what keeps a slot
from firing twice.

Clocks: leases, and where a registered or resumed schedule starts, are dated by the
store's clock (Redis's ``TIME``; this process's for the memory ledger), never the
caller's: schedulers whose clocks disagree by more than a lease still agree on whether a
claimant's lease has ended, so none takes a live one for abandoned and sends its slot a
second time. The callers' clocks only say which slots are due (``slot_ms``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import redis

__all__ = ["MemoryScheduleState", "RedisScheduleState", "ScheduleState"]

_SCRIPT = resources.files("dramaturg.schedules").joinpath("schedule.lua").read_text(encoding="utf-8")

#: Answers of ``claim``.
CLAIMED, TAKEN, PAUSED, STALE = 1, 0, -1, -2


class ScheduleState(Protocol):
    """The steps every ledger of schedules answers (see the module)."""

    def register(self, digests: Mapping[str, str], back_ms: int = 0, now_ms: int | None = None) -> int: ...
    def claim(
        self, schedule_id: str, digest: str, slot_ms: int, lease_ms: int, missed: int, seen_last: int = -1
    ) -> int: ...
    def sent(self, schedule_id: str, slot_ms: int, message_id: str, now_ms: int) -> None: ...
    def recover(self, schedule_id: str, digest: str, lease_ms: int) -> int | None: ...
    def outcome(self, schedule_id: str, slot_ms: int, text: str) -> None: ...
    def pause(self, schedule_id: str) -> None: ...
    def resume(self, schedule_id: str, now_ms: int | None = None) -> None: ...
    def read(self, schedule_id: str) -> dict[str, str]: ...
    def registered(self) -> dict[str, str]: ...


class RedisScheduleState:
    """The ledger in a Redis (the state store's): ``schedule.lua`` for every change."""

    def __init__(self, client: redis.Redis, *, namespace: str) -> None:
        self.client = client
        self.prefix = f"{namespace}:__schedule__:"
        self.registry = f"{namespace}:__schedules__"
        self._script = client.register_script(_SCRIPT)

    def _run(self, *args: Any) -> Any:
        return self._script(keys=[self.prefix, self.registry], args=list(args))

    def register(self, digests: Mapping[str, str], back_ms: int = 0, now_ms: int | None = None) -> int:
        args: list[Any] = ["register", back_ms, "" if now_ms is None else now_ms]
        for schedule_id, digest in digests.items():
            args += [schedule_id, digest]
        return int(self._run(*args))

    def claim(
        self, schedule_id: str, digest: str, slot_ms: int, lease_ms: int, missed: int, seen_last: int = -1
    ) -> int:
        return int(self._run("claim", schedule_id, digest, slot_ms, lease_ms, missed, seen_last))

    def sent(self, schedule_id: str, slot_ms: int, message_id: str, now_ms: int) -> None:
        self._run("sent", schedule_id, slot_ms, message_id, now_ms)

    def recover(self, schedule_id: str, digest: str, lease_ms: int) -> int | None:
        found = self._run("recover", schedule_id, digest, lease_ms)
        return None if found is None else int(found)

    def outcome(self, schedule_id: str, slot_ms: int, text: str) -> None:
        self._run("outcome", schedule_id, slot_ms, text)

    def pause(self, schedule_id: str) -> None:
        self._run("pause", schedule_id)

    def resume(self, schedule_id: str, now_ms: int | None = None) -> None:
        self._run("resume", schedule_id, "" if now_ms is None else now_ms)

    def read(self, schedule_id: str) -> dict[str, str]:
        """The schedule's fields; ``pending``: its pending slots, comma-separated, if any."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.prefix + schedule_id)
            pipe.hkeys(self.prefix + schedule_id + ":pending")
            fields, pending = pipe.execute()
        found = _texts(fields)
        if pending:
            found["pending"] = ",".join(sorted((_text(slot) for slot in pending), key=int))
        return found

    def registered(self) -> dict[str, str]:
        return _texts(self.client.hgetall(self.registry))


class MemoryScheduleState:
    """The ledger in this process's memory (eager and stub brokers): ``schedule.lua`` in Python.
    ``clock``: the store's clock, ms since the epoch (default: this process's; a seam for tests)."""

    def __init__(self, clock: Callable[[], int] | None = None) -> None:
        self.clock = clock or (lambda: int(time.time() * 1000))
        self._lock = threading.Lock()
        self._registry: dict[str, str] = {}
        self._schedules: dict[str, dict[str, str]] = {}
        #: id -> pending slot -> its lease's end (ms)
        self._pending: dict[str, dict[int, int]] = {}

    def _get(self, schedule_id: str) -> dict[str, str]:
        return self._schedules.setdefault(schedule_id, {})

    def register(self, digests: Mapping[str, str], back_ms: int = 0, now_ms: int | None = None) -> int:
        with self._lock:
            removed = len(set(self._registry) - set(digests))
            self._registry = dict(digests)
            start = self.clock() if now_ms is None else min(now_ms, self.clock())
            for schedule_id in digests:
                self._get(schedule_id).setdefault("last", str(start - back_ms))
            return removed

    def claim(
        self, schedule_id: str, digest: str, slot_ms: int, lease_ms: int, missed: int, seen_last: int = -1
    ) -> int:
        with self._lock:
            if self._registry.get(schedule_id) != digest:
                return STALE
            found = self._get(schedule_id)
            if found.get("paused") == "1":
                return PAUSED
            last = int(found.get("last", "-1"))
            if slot_ms <= last:
                return TAKEN
            found["last"] = str(slot_ms)
            self._pending.setdefault(schedule_id, {})[slot_ms] = self.clock() + lease_ms
            if missed > 0 and last == seen_last:
                found["missed"] = str(int(found.get("missed", "0")) + missed)
            return CLAIMED

    def sent(self, schedule_id: str, slot_ms: int, message_id: str, now_ms: int) -> None:
        with self._lock:
            found = self._get(schedule_id)
            self._pending.get(schedule_id, {}).pop(slot_ms, None)
            if message_id and (slot_ms == -1 or slot_ms >= int(found.get("last_slot", "-1"))):
                found.update(last_id=message_id, last_slot=str(slot_ms), last_at=str(now_ms))
                found.pop("last_outcome", None)

    def recover(self, schedule_id: str, digest: str, lease_ms: int) -> int | None:
        with self._lock:
            now_ms = self.clock()
            if self._registry.get(schedule_id) != digest:
                return None
            pending = self._pending.get(schedule_id, {})
            due = [slot for slot, until in pending.items() if until <= now_ms]
            if not due:
                return None
            pending[min(due)] = now_ms + lease_ms
            return min(due)

    def outcome(self, schedule_id: str, slot_ms: int, text: str) -> None:
        with self._lock:
            found = self._get(schedule_id)
            if found.get("last_slot") == str(slot_ms):
                found["last_outcome"] = text

    def pause(self, schedule_id: str) -> None:
        with self._lock:
            self._get(schedule_id)["paused"] = "1"

    def resume(self, schedule_id: str, now_ms: int | None = None) -> None:
        with self._lock:
            now_ms = self.clock() if now_ms is None else min(now_ms, self.clock())
            found = self._get(schedule_id)
            found.pop("paused", None)
            if now_ms > int(found.get("last", "-1")):
                found["last"] = str(now_ms)

    def read(self, schedule_id: str) -> dict[str, str]:
        with self._lock:
            found = dict(self._schedules.get(schedule_id, {}))
            if self._pending.get(schedule_id):
                found["pending"] = ",".join(str(slot) for slot in sorted(self._pending[schedule_id]))
            return found

    def registered(self) -> dict[str, str]:
        with self._lock:
            return dict(self._registry)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _texts(mapping: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in mapping.items()}
