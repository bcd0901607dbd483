"""Queue administration on the Redis and embedded brokers (see :mod:`dramaturg.queue_admin`).

For a queue ``q`` (``<ns>`` is ``broker.namespace``), each of its priority lanes ``q``,
``q.P1``, ``q.P2`` keeps the ids waiting in the list ``<ns>:<lane>`` and every body not
yet acknowledged in the hash ``<ns>:<lane>.msgs``; its delay queue is the same pair under
``<lane>.DQ``, its dead letters ``<lane>.XQ`` (a sorted set) and ``<lane>.XQ.msgs``.

- peek reads the lists from their head (where a worker's fetch takes from) and the
  bodies: a plain read, no side effect;
- purge runs ``queue_purge.lua`` until the lists are empty (at most what they held when it
  began), each call an atomic step over up to ``PURGE_CHUNK`` ids from the lists' heads
  and their bodies; a running task's id is in its worker's claim set, not in a list, so it
  stays. A step whose records cannot be written (the state store stopped answering) is
  given back to the lists' heads (``queue_give_back.lua``), and the purge stops;
- delete removes every key above, the held store's keys of the queue
  (:class:`~dramaturg.brokers.redis.RedisHeldStore`) and the queue's worker heartbeats.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import redis
from dramatiq import Message

from ...errors import BrokerUnreachable
from ...held import durable_write
from ...masking import mask_text, mask_url
from ...queue_admin import OnPurged, QueueAdmin, purge_stopped
from ...queues import lanes
from .connection import script
from .stats import RedisStatsReader

if TYPE_CHECKING:
    from .broker import RedisBroker

__all__ = ["RedisQueueAdmin"]

logger = logging.getLogger("dramaturg.queue_admin")

_PURGE = script("queue_purge")
_GIVE_BACK = script("queue_give_back")
#: Ids one call of queue_purge.lua takes: ~10 ms of Redis time, so a purge of millions
#: never blocks other clients for long.
PURGE_CHUNK = 5000


class RedisQueueAdmin(QueueAdmin):
    """Queue administration of a dramaturg Redis (or embedded) broker."""

    def __init__(self, broker: RedisBroker) -> None:
        super().__init__(broker)
        self.redis_broker = broker
        self.client: redis.Redis = broker.client
        self.namespace: str = broker.namespace
        self._purge = self.client.register_script(_PURGE)
        self._give_back = self.client.register_script(_GIVE_BACK)

    def _key(self, name: str) -> str:
        return f"{self.namespace}:{name}"

    def _unreachable(self, error: redis.RedisError) -> BrokerUnreachable:
        return BrokerUnreachable(f"cannot reach Redis at {mask_url(self.redis_broker.settings.url)}: {error}")

    def exists(self, queue: str) -> bool:
        names = [self._key(f"{lane}{suffix}") for lane in lanes(queue) for suffix in (".msgs", ".DQ.msgs", ".XQ")]
        names.append(self._key(f"__workers__:{queue}"))
        try:
            return bool(self.client.exists(*names))
        except redis.RedisError as error:
            raise self._unreachable(error) from None

    def peek(self, queue: str, limit: int) -> list[bytes]:
        try:
            found = self._peek([self._key(lane) for lane in lanes(queue)], limit)
            if len(found) < limit:
                delayed = self._peek([self._key(f"{lane}.DQ") for lane in lanes(queue)], limit - len(found))
                found += sorted(delayed, key=_eta)
            return found
        except redis.RedisError as error:
            raise self._unreachable(error) from None

    def _peek(self, lists: list[str], limit: int) -> list[bytes]:
        bodies: list[bytes] = []
        for name in lists:
            if len(bodies) >= limit:
                break
            ids = self.client.lrange(name, 0, limit - len(bodies) - 1)
            if ids:
                # An id taken between the two reads has no body any more: left out.
                found: list[Any] = self.client.hmget(f"{name}.msgs", ids)
                bodies += [body for body in found if body is not None]
        return bodies

    def purge(self, queue: str, *, delayed: bool, on_purged: OnPurged) -> int:
        lists = [name for lane in lanes(queue) for name in ([lane, f"{lane}.DQ"] if delayed else [lane])]
        keys = [key for name in lists for key in (self._key(name), self._key(f"{name}.msgs"))]
        purged = 0
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for name in lists:
                    pipe.llen(self._key(name))
                # At most what waited when the purge began: a sender cannot keep it going.
                left = sum(int(n) for n in pipe.execute())
            while left > 0:
                answer: list[Any] = self._purge(keys=keys, args=[min(PURGE_CHUNK, left)])
                taken, found = int(answer[0]), answer[1:]
                if taken == 0:
                    break
                left -= taken
                bodies = found[2::3]
                try:
                    on_purged(bodies)
                except BaseException as error:  # their records were not written (or ^C): back they go
                    lost = durable_write(functools.partial(self._give_back, keys=keys, args=found))
                    if lost is not None:
                        logger.error(
                            "purge of %s: %d task(s) taken off the queue could not be recorded nor given back;"
                            " ids and bodies: %r",
                            queue,
                            len(bodies),
                            [(_text(i), mask_text(_text(b))) for i, b in zip(found[1::3], bodies, strict=True)],
                        )
                    if not isinstance(error, Exception):
                        raise  # interrupted: the step is given back, and the interrupt goes on
                    raise purge_stopped(error, purged, len(bodies), lost) from None
                purged += len(bodies)
        except redis.RedisError as error:
            raise self._unreachable(error) from None
        return purged

    def usage(self, queue: str) -> tuple[int, int, int]:
        row = RedisStatsReader(self.redis_broker, self.redis_broker.settings).read([queue])[0]
        return row.workers or 0, row.in_flight or 0, row.held or 0

    def parts(self, queue: str) -> list[str]:
        """Each lane, delay and dead-letter queue that has keys, and ``<queue> (held)`` when
        the held store has tasks of it."""
        names = [f"{lane}{suffix}" for lane in lanes(queue) for suffix in ("", ".DQ", ".XQ")]
        held = self.redis_broker.held
        try:
            with self.client.pipeline(transaction=True) as pipe:
                for name in names:
                    pipe.exists(self._key(name), self._key(f"{name}.msgs"))
                pipe.exists(f"{held.prefix}:{queue}")
                replies: list[Any] = pipe.execute()
        except redis.RedisError as error:
            raise self._unreachable(error) from None
        found = [name for name, present in zip(names, replies, strict=False) if present]
        return found + ([f"{queue} (held)"] if replies[-1] else [])

    def remove(self, queue: str) -> None:
        names = [f"{lane}{suffix}" for lane in lanes(queue) for suffix in _QUEUE_SUFFIXES]
        held = self.redis_broker.held
        held_keys = [f"{held.prefix}:{queue}{suffix}" for suffix in _HELD_SUFFIXES]
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(*[self._key(name) for name in names], *held_keys, self._key(f"__workers__:{queue}"))
                pipe.srem(f"{held.prefix}:#queues", queue)
                pipe.execute()
        except redis.RedisError as error:
            raise self._unreachable(error) from None


#: The keys of a lane, after ``<ns>:<lane>``.
_QUEUE_SUFFIXES = ("", ".msgs", ".DQ", ".DQ.msgs", ".XQ", ".XQ.msgs")
#: The held store's keys of a queue, after ``<prefix>:<queue>`` (see RedisHeldStore._keys).
_HELD_SUFFIXES = ("", "#order", "#kicking", "#kicking-order", "#kicking-token")


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _eta(body: bytes) -> int:
    try:
        return int(Message.decode(body).options.get("eta") or 0)
    except Exception:  # an undecodable body sorts first
        return 0
