"""Heartbeats, and the messages of dead workers put back on their queues.

Used by :class:`dramaturg.middleware.recovery.RedisRecovery`, which explains why and when.

Dramatiq's keys (see dramatiq/brokers/redis/dispatch.lua)::

    __heartbeats__               zset  worker (broker) id, scored by its last heartbeat (ms);
                                       with Dramatiq, a process that only sends writes one
                                       too (dramaturg's enqueue does not; a clean stop
                                       takes its own out: see depart())
    __acks__.<worker id>.<queue> set   ids that worker fetched and has not acknowledged
    <queue>                      list  ids ready to run: rpush to enqueue, lpop to fetch
    <queue>.msgs                 hash  id -> body, until acknowledged

and dramaturg's::

    __workers__:<queue>          zset  the worker processes consuming a (canonical) queue,
                                       scored by their last heartbeat (ms); see dramaturg.stats

Its scripts: ``recover_claims.lua``, ``expire_dead.lua``, ``forget_worker.lua``, ``depart.lua``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis
from dramatiq.brokers.redis import RedisBroker as _DramatiqRedisBroker

from ...queues import lanes
from .connection import glob_escape, script, text

if TYPE_CHECKING:
    from .claims import RedisClaims

__all__ = ["DeadWorker", "RecoveredWorker", "RedisRecoverer"]

_RECOVER_CLAIMS = script("recover_claims")
_EXPIRE_DEAD = script("expire_dead")
_FORGET_WORKER = script("forget_worker")
_DEPART = script("depart")


@dataclass(frozen=True)
class DeadWorker:
    """A worker whose last heartbeat (ms since the epoch) is older than the heartbeat timeout."""

    worker_id: str
    last_heartbeat_ms: int


@dataclass(frozen=True)
class RecoveredWorker:
    """What :meth:`RedisRecoverer.recover` did for one dead worker.

    ``messages`` maps each queue (exact name: lane or delay queue) to how many of the
    worker's claimed messages went back on it; ``revived`` is true when the worker wrote
    a heartbeat while it was being recovered (it is alive, and was left alone from then on).
    """

    worker: DeadWorker
    messages: dict[str, int] = field(default_factory=dict)
    revived: bool = False
    #: The Dramatiq message ids of what went back ("?" where a body did not decode).
    message_ids: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.messages.values())


class RedisRecoverer:
    """Writes one broker's heartbeat and puts back what dead workers had claimed.

    Used by :class:`dramaturg.middleware.recovery.RedisRecovery`, which explains why.
    ``broker`` is any Dramatiq Redis broker (its ``client``, ``namespace``, ``broker_id``
    and ``heartbeat_timeout`` in ms are read).

    >>> recoverer = RedisRecoverer(broker)
    >>> dead = recoverer.beat(now_ms)          # one round trip
    >>> recovered = recoverer.recover(dead, now_ms) if dead else []
    """

    def __init__(
        self,
        broker: _DramatiqRedisBroker,
        heartbeat_timeout_ms: int | None = None,
        queues: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.client: redis.Redis = broker.client
        #: The queues this worker consumes (canonical names), read at each heartbeat.
        self.queues = queues
        self.workers_prefix = f"{broker.namespace}:__workers__:"
        self.namespace: str = broker.namespace
        self.worker_id: str = broker.broker_id
        self.heartbeat_timeout_ms = int(
            broker.heartbeat_timeout if heartbeat_timeout_ms is None else heartbeat_timeout_ms
        )
        self.heartbeats = f"{self.namespace}:__heartbeats__"
        self.claims_prefix = f"{self.namespace}:__acks__."
        self._recover_claims = self.client.register_script(_RECOVER_CLAIMS)
        self._forget_worker = self.client.register_script(_FORGET_WORKER)
        self._depart = self.client.register_script(_DEPART)
        self._expire_dead = self.client.register_script(_EXPIRE_DEAD)
        self.dead_message_ttl_ms = int(getattr(broker, "dead_message_ttl", 7 * 86_400_000))
        #: This worker's own claims (None for a broker that is not dramaturg's).
        self.claims: RedisClaims | None = getattr(broker, "claims", None)
        #: The last beat found this worker's heartbeat gone (another worker took it for
        #: dead and forgot it) though it had written one before.
        self.missing = False
        self._beaten = False

    def beat(self, now_ms: int) -> list[DeadWorker]:
        """Write this broker's heartbeat, for itself and for each of its queues (dropping
        the dead workers' entries there), drop those queues' dead letters older than
        Dramatiq's ``dead_message_ttl`` (a week); return the other workers that are dead
        at ``now_ms``."""
        cutoff = now_ms - self.heartbeat_timeout_ms
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zscore(self.heartbeats, self.worker_id)
            pipe.zadd(self.heartbeats, {self.worker_id: now_ms})
            pipe.zrangebyscore(self.heartbeats, 0, cutoff, withscores=True)
            for queue in self.queues():
                workers = self.workers_prefix + queue
                pipe.zadd(workers, {self.worker_id: now_ms})
                pipe.zremrangebyscore(workers, 0, cutoff)
                pipe.pexpire(workers, 2 * self.heartbeat_timeout_ms)  # gone once no worker beats there
                for lane in lanes(queue):
                    dead_letters = f"{self.namespace}:{lane}.XQ"
                    keys = [dead_letters, dead_letters + ".msgs"]
                    self._expire_dead(keys=keys, args=[now_ms - self.dead_message_ttl_ms, 1_000], client=pipe)
            own, _, stale, *_ = pipe.execute()
        self.missing, self._beaten = own is None and self._beaten, True
        dead = [DeadWorker(text(member), int(score)) for member, score in stale]
        return [worker for worker in dead if worker.worker_id != self.worker_id]

    def leave(self) -> None:
        """Stop counting as a worker of its queues (a clean shutdown)."""
        queues = list(self.queues())
        if queues:
            with self.client.pipeline(transaction=False) as pipe:
                for queue in queues:
                    pipe.zrem(self.workers_prefix + queue, self.worker_id)
                pipe.execute()

    def depart(self) -> bool:
        """A clean stop: forget this worker's heartbeat if none of its claim sets holds a
        claim any more (depart.lua), so that no other worker takes it for dead later and
        SCANs the keyspace for its claims. Returns whether it was forgotten (not while a
        task still runs past the shutdown timeout: the others recover it once it is old)."""
        if self.claims is None:
            return False  # not dramaturg's broker: its claim sets are not known here
        # No queue's first fetch meanwhile (its claim set would not be checked here): one
        # that waits for this runs fetch.lua after, which writes the heartbeat again.
        with self.claims.no_new_queues():
            keys = [self.heartbeats, *self.claims.claim_sets()]
            return bool(self._depart(keys=keys, args=[self.worker_id]))

    def reconcile(self) -> int:
        """Give back this worker's claims that no thread of it holds (see
        :mod:`dramaturg.brokers.redis.claims`); return how many went back."""
        return self.claims.reconcile() if self.claims is not None else 0

    def recover(self, dead: Sequence[DeadWorker], now_ms: int) -> list[RecoveredWorker]:
        """Move each dead worker's claimed messages back to their queues, then forget it.

        ``now_ms`` must be the time ``dead`` was found at (the cutoff is derived from it).
        """
        cutoff = now_ms - self.heartbeat_timeout_ms
        claims = self._claim_sets([worker.worker_id for worker in dead])
        recovered = []
        for worker in dead:
            result = RecoveredWorker(worker)
            prefix = f"{self.claims_prefix}{worker.worker_id}.".encode()
            for key in sorted(claims.get(worker.worker_id, ())):
                queue = key[len(prefix) :]
                base = self.namespace.encode() + b":" + queue
                keep_order = "0" if queue.endswith(b".DQ") else "1"  # delayed ones are run by eta anyway
                moved = self._recover_claims(
                    keys=[self.heartbeats, key, base, base + b".msgs"],
                    args=[worker.worker_id, cutoff, keep_order],
                )
                if moved and moved[0] == -1:
                    result = RecoveredWorker(worker, result.messages, revived=True, message_ids=result.message_ids)
                    break
                if moved:
                    result.messages[text(queue)] = len(moved)
                    result.message_ids.extend(text(message_id) for message_id in moved)
            if not result.revived:
                self._forget_worker(keys=[self.heartbeats], args=[worker.worker_id, cutoff])
            recovered.append(result)
        return recovered

    def _claim_sets(self, worker_ids: Sequence[str]) -> dict[str, list[bytes]]:
        """The claim sets of ``worker_ids``, found with SCAN (never KEYS, which blocks Redis)."""
        wanted = {f"{self.claims_prefix}{worker_id}.".encode(): worker_id for worker_id in worker_ids}
        # One worker: a pattern naming it; several: one pass over every claim set.
        only = f"{worker_ids[0]}." if len(worker_ids) == 1 else ""
        pattern = glob_escape(f"{self.claims_prefix}{only}") + "*"
        found: dict[str, list[bytes]] = {}
        for key in self.client.scan_iter(match=pattern, count=1000):
            for prefix, worker_id in wanted.items():
                if key.startswith(prefix) and len(key) > len(prefix):
                    found.setdefault(worker_id, []).append(key)
        return found
