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
- a step is not dropped but kept until its records are written: the script moves its
  bodies into the hash ``<ns>:__purge_steps__:<token>:<n>`` (with the queue, the purge's
  token as ``owner``, and when it was taken), listed in the sorted set
  ``<ns>:__purge_steps__`` by that time, and the purge deletes it once the tasks' records
  and batch ends are written (``queue_purge_done.lua``, only while it is still the
  purge's). A purge killed in between (SIGKILL, the OOM killer, a lost SSH session)
  leaves it there, not lost: a step older than ``LEFT_STEP_MS`` is taken over
  (``queue_purge_claim.lua``: its owner becomes the taker, its time now) and *finished*
  (records ``purged``, batch ends, unique keys released, then deleted) by the next purge
  or ``queue list`` of any queue of the broker, and by a worker's recovery thread
  (:class:`~dramaturg.middleware.RedisRecovery`), so that a batch does not wait for an
  operator. The writes are idempotent (records by message id, batch ends counted by
  message id, unique keys released only by their holder), so a step finished twice (its
  taker died too, or its purge was only slow) counts once; a step another process took
  over is never given back (the tasks are purged, never run). Why not write the records
  first, then take the tasks? A worker could take a task between the two: it would run
  with a record saying purged, the batch counting it twice;
- delete removes every key above, the held store's keys of the queue
  (:class:`~dramaturg.brokers.redis.RedisHeldStore`) and the queue's worker heartbeats.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
from dramatiq import Message

from ...errors import BrokerUnreachable
from ...held import durable_write
from ...masking import mask_text, mask_url
from ...queue_admin import LeftStep, OnPurged, QueueAdmin, purge_stopped
from ...queues import lanes
from .connection import script
from .stats import RedisStatsReader

if TYPE_CHECKING:
    from .broker import RedisBroker

__all__ = ["RedisQueueAdmin"]

logger = logging.getLogger("dramaturg.queue_admin")

_PURGE = script("queue_purge")
_GIVE_BACK = script("queue_give_back")
_DONE = script("queue_purge_done")
_CLAIM = script("queue_purge_claim")
#: Ids one call of queue_purge.lua takes: ~10 ms of Redis time, so a purge of millions
#: never blocks other clients for long (3,000 since each step keeps its bodies in its
#: record: 5,000 took 14-22 ms so, 9-12 ms before).
PURGE_CHUNK = 3000
#: A purge step this old (ms) is taken for left behind by a purge that died: its writes
#: take well under a second (one pipeline of records, a round trip per batch member), so a
#: minute means its purge is gone, or cannot reach the state store (then another process
#: finishing the step writes what it would have: nothing counts twice).
LEFT_STEP_MS = 60_000
#: The sorted set of purge steps, and the prefix of their hashes (after ``<ns>:``).
STEPS = "__purge_steps__"


class RedisQueueAdmin(QueueAdmin):
    """Queue administration of a dramaturg Redis (or embedded) broker."""

    def __init__(self, broker: RedisBroker) -> None:
        super().__init__(broker)
        self.redis_broker = broker
        self.client: redis.Redis = broker.client
        self.namespace: str = broker.namespace
        self._purge = self.client.register_script(_PURGE)
        self._give_back = self.client.register_script(_GIVE_BACK)
        self._done = self.client.register_script(_DONE)
        self._claim = self.client.register_script(_CLAIM)

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
        token = uuid.uuid4().hex
        purged = 0
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for name in lists:
                    pipe.llen(self._key(name))
                # At most what waited when the purge began: a sender cannot keep it going.
                left = sum(int(n) for n in pipe.execute())
            number = 0
            while left > 0:
                number += 1
                step = f"{token}:{number}"
                step_keys = [self._key(STEPS), self._key(f"{STEPS}:{step}")]
                answer: list[Any] = self._purge(
                    keys=[*step_keys, *keys], args=[min(PURGE_CHUNK, left), step, queue, token]
                )
                taken, found = int(answer[0]), answer[1:]
                if taken == 0:
                    break
                left -= taken
                bodies = found[2::3]
                if not bodies:
                    continue  # ids whose bodies were gone: nothing to record, no step kept
                try:
                    on_purged(bodies)
                except BaseException as error:  # their records were not written (or ^C): back they go
                    given: list[int] = []
                    give_back = functools.partial(self._give_back, keys=[*step_keys, *keys], args=[step, token, *found])
                    lost = durable_write(lambda: given.append(give_back()))  # noqa: B023 (called at once)
                    taken_over = lost is None and given[-1] == -1
                    if lost is not None:
                        logger.error(
                            "purge of %s: %d task(s) taken off the queue could not be recorded nor given back;"
                            " their bodies stay in %s, recorded as purged by a later purge or a worker;"
                            " ids and bodies: %r",
                            queue,
                            len(bodies),
                            step_keys[1],
                            [(_text(i), mask_text(_text(b))) for i, b in zip(found[1::3], bodies, strict=True)],
                        )
                    if not isinstance(error, Exception):
                        raise  # interrupted: the step is given back, and the interrupt goes on
                    # Taken over: slower than LEFT_STEP_MS, another process took the step for
                    # left behind and records its tasks as purged. Never given back, never run.
                    raise purge_stopped(error, purged, len(bodies), lost, taken_over=taken_over) from None
                # Recorded: the step goes (had another process taken it over meanwhile, it
                # deletes it once it has written the same records).
                self._done(keys=step_keys, args=[step, token])
                purged += len(bodies)
        except redis.RedisError as error:
            raise self._unreachable(error) from None
        return purged

    def finish_left(self, recorder: Callable[[str], OnPurged], *, limit: int | None = None) -> list[LeftStep]:
        """Finish the purge steps older than ``LEFT_STEP_MS`` (left by purges that died):
        each is taken over, its tasks recorded by ``recorder(queue)``, then deleted; at
        most ``limit`` steps. What ``recorder`` raises goes on: the step is left to be
        taken over again once it is ``LEFT_STEP_MS`` old."""
        token = uuid.uuid4().hex
        finished: list[LeftStep] = []
        try:
            while limit is None or len(finished) < limit:
                answer: list[Any] = self._claim(
                    keys=[self._key(STEPS)], args=[self._key(f"{STEPS}:"), LEFT_STEP_MS, token]
                )
                if not answer:
                    break
                step, flat = _text(answer[0]), answer[1]
                fields = {_text(flat[n]): flat[n + 1] for n in range(0, len(flat), 2)}
                queue = _text(fields.get("queue", b"?"))
                bodies = [body for field, body in fields.items() if field.startswith("m:")]
                recorder(queue)(bodies)
                self._done(keys=[self._key(STEPS), self._key(f"{STEPS}:{step}")], args=[step, token])
                finished.append(LeftStep(queue=queue, tasks=len(bodies), taken_at=int(fields.get("taken_at") or 0)))
        except redis.RedisError as error:
            raise self._unreachable(error) from None
        return finished

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
