"""Held tasks in Redis hashes beside the broker's keys: :class:`RedisHeldStore`.

Keys, under ``<namespace>:__held__:`` (queue names cannot contain ``:`` or ``#``, so none
of these can collide with Dramatiq's own keys or with another queue's)::

    <q>                  hash  message id -> HeldTask JSON
    <q>#order            zset  message id, scored by held_at (listing order)
    <q>#kicking          hash  tasks taken by a kicker that has not requeued them yet
    <q>#kicking-order    zset  scored by when their kicker's lease runs out (ms)
    <q>#kicking-token    hash  message id -> the token of the kicker that took it
    #queues              set   queues that have held tasks

Every script (``held_*.lua``) takes these five keys as ``KEYS[1..5]``, in this order. A
kick's lease is its token: a task moves to the queue, or back, only for the kicker whose
token it still has; a lease that ran out gives the task back and drops the token.
"""

from __future__ import annotations

import builtins
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker as _DramatiqRedisBroker

from ...held import LEASE_LOST, HeldStore, HeldTask
from ...queues import canonical_queue
from .connection import script
from .placement import placed

if TYPE_CHECKING:
    from ...config import BrokerSettings

__all__ = ["KICK_LEASE_MS", "STALE_KICK_MS", "RedisHeldStore"]

# Scripts that give tasks back run after the functions they share.
_FUNCTIONS = script("held_functions")
_TAKE = _FUNCTIONS + script("held_take")
_SETTLE = _FUNCTIONS + script("held_settle")
_PURGE = _FUNCTIONS + script("held_purge")
_KICK = script("held_kick")
_LIST = script("held_list")

#: How long a kicker's take lasts unless it renews it (a kick renews it as it goes): a
#: kicker that stalls longer (a paused process, a long GC) has its tasks given back, and
#: requeues none of them afterwards.
KICK_LEASE_MS = 60_000
#: The former name of :data:`KICK_LEASE_MS`.
STALE_KICK_MS = KICK_LEASE_MS


class RedisHeldStore(HeldStore):
    """Held tasks in Redis hashes beside the broker's keys (see the module docstring).

    Taking is one Lua script, so two kickers never requeue the same task; tasks taken by
    a kicker that died or stalled are given back once its lease runs out (``lease_ms``
    after the take or its last renewal; default :data:`KICK_LEASE_MS`), and the script
    that moves a task to its queue checks the kicker's token, so a stalled kicker never
    queues a task twice.

    ``broker`` is any Dramatiq Redis broker (its ``client`` and ``namespace`` are used);
    ``settings`` are its settings (``priorities``: whether a kicked task goes to the lane
    of its priority).
    """

    def __init__(
        self, broker: _DramatiqRedisBroker, settings: BrokerSettings, *, lease_ms: int = KICK_LEASE_MS
    ) -> None:
        super().__init__(broker)
        self.broker: _DramatiqRedisBroker = broker
        #: Kicked tasks go to the lane of their priority (see :mod:`.placement`).
        self.priorities = settings.priorities
        self.client = broker.client
        self.prefix = f"{broker.namespace}:__held__"
        self.lease_ms = lease_ms
        self._take = self.client.register_script(_TAKE)
        self._settle = self.client.register_script(_SETTLE)
        self._kick = self.client.register_script(_KICK)
        self._purge = self.client.register_script(_PURGE)
        self._list = self.client.register_script(_LIST)

    def _keys(self, queue: str) -> list[str]:
        base = f"{self.prefix}:{queue}"
        return [base, f"{base}#order", f"{base}#kicking", f"{base}#kicking-order", f"{base}#kicking-token"]

    @staticmethod
    def _read(message_id: bytes | str, data: bytes, queue: str) -> HeldTask:
        message_id = message_id.decode(errors="replace") if isinstance(message_id, bytes) else message_id
        try:
            return HeldTask.from_json(data)
        except ValueError as error:
            return HeldTask.unreadable(message_id, queue, data, str(error))

    def hold(self, task: HeldTask) -> None:
        held, order, *_ = self._keys(task.queue_name)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(held, task.message_id, task.to_json())
            pipe.zadd(order, {task.message_id: task.held_at})
            pipe.sadd(f"{self.prefix}:#queues", task.queue_name)
            pipe.execute()

    def list(self, queue: str | None = None, *, offset: int = 0, limit: int = 50) -> list[HeldTask]:
        found: list[HeldTask] = []
        for name in [self.check_queue(queue)] if queue is not None else self.queues():
            total, *page = self._list(keys=self._keys(name), args=[_now_ms(), offset, limit - len(found)])
            offset = max(offset - int(total), 0)
            found += [self._read(page[i], page[i + 1], name) for i in range(0, len(page), 2)]
            if len(found) >= limit:
                break
        return found

    def count(self, queue: str | None = None) -> int:
        now = _now_ms()
        with self.client.pipeline(transaction=False) as pipe:
            for name in [self.check_queue(queue)] if queue is not None else self.queues():
                held, _, _, kicking_order, _ = self._keys(name)
                pipe.hlen(held)
                pipe.zcount(kicking_order, "-inf", now)
            return sum(int(n) for n in pipe.execute())

    def get(self, message_id: str, queue: str | None = None) -> HeldTask | None:
        now = _now_ms()
        for name in [self.check_queue(queue)] if queue is not None else self.queues():
            held, _, kicking, kicking_order, _ = self._keys(name)
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hget(held, message_id)
                pipe.hget(kicking, message_id)
                pipe.zscore(kicking_order, message_id)
                data, taken, until = pipe.execute()
            if data is None and until is not None and until <= now:
                data = taken  # its kicker's lease ran out: it is held again
            if data:
                return self._read(message_id, data, name)
        return None

    @contextmanager
    def taking(self, queue: str, message_ids: Sequence[str] | None) -> Iterator[Iterator[tuple[HeldTask, Any]]]:
        keys = self._keys(self.check_queue(queue))
        token = uuid.uuid4().hex
        now = _now_ms()
        if message_ids is not None and not message_ids:
            yield iter(())
            return
        mode = ["all"] if message_ids is None else ["ids", *message_ids]
        reply = self._take(keys=keys, args=[now, now + self.lease_ms, token, *mode])
        lease = _Lease(self, keys, token, [reply[i] for i in range(0, len(reply), 2)], now)
        try:
            # Decoded here, inside the try: an entry that does not decode is still given back.
            tasks = [self._read(reply[i], reply[i + 1], queue) for i in range(0, len(reply), 2)]
            yield ((task, (task.message_id, lease)) for task in tasks)
        finally:
            lease.give_back()

    def requeue(
        self, queue: str, batch: Sequence[tuple[Message[Any], Any]], delay_ms: int | None
    ) -> builtins.list[tuple[str, str]]:
        """Enqueue the batch and forget it in one script that checks the kicker's lease."""
        if not batch:
            return []
        lease: _Lease = batch[0][1][1]
        lease.renew_if_due()
        prepared: builtins.list[Message[Any]] = []
        args: builtins.list[Any] = [lease.token]
        for message, (message_id, _) in batch:
            stored, redis_id = placed(self.broker, message, delay_ms, priorities=self.priorities)
            # before_enqueue runs even for a task whose lease turns out to be lost: the
            # same hooks then ran for the kicker that requeued it; nothing is counted twice.
            self.broker.emit_before("enqueue", stored, delay_ms)
            args += [message_id, stored.queue_name, redis_id, stored.encode()]
            prepared.append(stored)
        moved = {m.decode() for m in self._kick(keys=[*lease.keys, self.broker.namespace], args=args)}
        lease.settled(moved)
        for stored in prepared:
            if stored.message_id in moved:
                self.broker.emit_after("enqueue", stored, delay_ms)
        return [(message.message_id, LEASE_LOST) for message, _ in batch if message.message_id not in moved]

    def forget(self, queue: str, receipt: Any) -> None:
        message_id, lease = receipt
        lease.forget(message_id)

    def purge(self, queue: str, message_ids: Sequence[str] | None = None) -> int:
        keys = self._keys(self.check_queue(queue))
        if message_ids is not None and not message_ids:
            return 0
        mode = ["all"] if message_ids is None else ["ids", *message_ids]
        return int(self._purge(keys=keys, args=[_now_ms(), *mode]))

    def queues(self) -> builtins.list[str]:
        members: set[bytes] = self.client.smembers(f"{self.prefix}:#queues")  # type: ignore[assignment]
        stored = {name.decode() for name in members}
        declared = {canonical_queue(name) for name in self.broker.get_declared_queues()}
        return sorted(stored | declared)


class _Lease:
    """The tasks one :meth:`RedisHeldStore.taking` took, under its token."""

    def __init__(self, store: RedisHeldStore, keys: list[str], token: str, ids: list[bytes], now: int) -> None:
        self.store = store
        self.keys = keys
        self.token = token
        self.open = {i.decode() if isinstance(i, bytes) else i for i in ids}
        self.renewed_at = now

    def settled(self, message_ids: Iterable[str]) -> None:
        self.open.difference_update(message_ids)

    def forget(self, message_id: str) -> None:
        if message_id in self.open:
            self.store._settle(keys=self.keys, args=[_now_ms(), self.token, "forget", 0, message_id])
            self.open.discard(message_id)

    def renew_if_due(self) -> None:
        """Move the lease of what is still taken to now, once a third of it has passed (a
        long kick keeps its lease; a kicker that stalls does not)."""
        now = _now_ms()
        if self.open and now - self.renewed_at >= self.store.lease_ms / 3:
            self.store._settle(keys=self.keys, args=[now, self.token, "renew", now + self.store.lease_ms, *self.open])
            self.renewed_at = now

    def give_back(self) -> None:
        """Give back what is still taken under this token (what another kicker took after
        this lease ran out is not this one's to give back)."""
        if self.open:
            self.store._settle(keys=self.keys, args=[_now_ms(), self.token, "back", 0, *self.open])
            self.open.clear()


def _now_ms() -> int:
    return int(time.time() * 1000)
