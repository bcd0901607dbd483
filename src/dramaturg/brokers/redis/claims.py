"""What a live Redis worker holds of what it claimed, and giving back the rest.

A worker claims each message it fetches: the fetch script moves the message's id from
its queue's list into ``<namespace>:__acks__.<worker id>.<queue>`` and returns the body;
acknowledging (or rejecting) removes the id. In between, the message is somewhere in the
process: in its consumer's prefetch (``message_cache``), in the worker's work queue, in a
consumer thread's delay queue (waiting for its ``eta``), running, or waiting for its
acknowledgement to go through. A claim in none of those places is *stranded*: nothing
runs it and nothing releases it; before this module, only the recovery of a dead worker
moved it back, once the whole process had gone. Faults stranded claims in live workers:

- a fetch whose reply was lost (the script ran, the connection dropped before the answer
  came): the messages are claimed and no thread ever sees them; a client that retries
  the call claims a second batch on top (see :func:`dramaturg.brokers.redis.connection.no_retry`);
- a connection error in a consumer: Dramatiq's ``ConsumerThread`` replaces the consumer
  and forgets what it had prefetched, and a delay-queue consumer's thread throws its
  whole delay queue away (``self.delay_queue = PriorityQueue()``, nothing requeued);
- a clean stop: Dramatiq requeues its work queue and delay queues, not what a consumer had
  fetched and not handed out yet.

:class:`RedisClaims` keeps, per queue, the ids the process fetched and still holds (the
*ledger*) and gives back every claim of this worker that is not in it:

- the fetch (:meth:`~RedisClaims.fetch`, the broker's ``do_fetch``) adds the ids it
  claimed before it returns;
- acknowledging or rejecting removes an id once Redis has done it, not before: until then
  the message is still held while Dramatiq retries the acknowledgement. Requeueing removes
  them whatever the outcome: the caller has let go of the messages either way;
- a consumer that closes lets go of what it still had prefetched, and of the delayed
  messages its thread held (:meth:`~RedisClaims.delayed` marks them as they go into the
  delay queue). Dramatiq empties the thread's delay queue before it closes the consumer
  (requeued, or thrown away after a connection error), so whatever of those is still in
  the ledger then is held by nobody;
- the stray claims (in the claim set, not in the ledger) go back to the head of their
  queue, oldest first, like a dead worker's (:mod:`dramaturg.middleware.recovery`), by a
  script that takes each id out of the claim set first: an id acknowledged or given back
  meanwhile is not pushed again. One WARNING names them.

It reconciles before the first fetch of each new consumer (a consumer restarted after a
connection error gives back what its predecessor stranded), at each tick of the recovery
thread, and when the worker stops.

**Taken for dead.** Another worker takes this one for dead once its heartbeat is
``heartbeat_timeout`` old, and moves its claims back to their queues (deleting its claim
sets): a worker cut off from Redis for that long, or paused, or after a Redis outage that
long. It is alive, and still holds those messages in memory: started when it comes
back, each would run twice. So when the recovery thread notices that this worker *may*
have been taken for dead (its heartbeat failed, or was late by more than
``heartbeat_timeout``, or its entry was gone), it calls :meth:`~RedisClaims.suspect`:

- :attr:`~RedisClaims.suspected` is set: the worker's work queue
  (:class:`~dramaturg.middleware.priority.MessagePriorityQueue`) starts nothing and its
  consumers fetch nothing until it is cleared. A flag read per message, nothing more;
- :attr:`~RedisClaims.epoch` moves on: at its next turn, every consumer lets go of what it
  had prefetched and what its thread had delayed, as a closing consumer does (a due
  delayed message is not moved meanwhile); the give-back script moves back only the ids
  still in this worker's claim set, so what another worker recovered is never pushed
  twice, and what is still this worker's is not dropped;
- once Redis answers, :meth:`~RedisClaims.taken` compares the ledger with the claim sets in
  one SMISMEMBER per queue: the ids in the ledger and no longer claimed were recovered by
  another worker. They leave the ledger, the recovery thread drops those waiting in the
  work queue (never one still claimed: that would lose it), and the flag is cleared.
  (A fetch this worker sent before the cut and Redis ran after it may have claimed some
  of them again: then they are this worker's again, and run here once.)

A message that was running meanwhile may run twice: its acknowledgement finds its claim
gone (the acknowledgement script says so), changes nothing in Redis (the new holder's
body and claim stay), and is logged as running again.

**Why it never gives back what a thread holds** (which would run it twice). A message is
held from the moment its fetch returns until Redis has released its claim or its holder
let go of it, and its id is in the ledger at least that long: the fetch adds it under the
queue's lock before returning, and the release removes it only afterwards. Reconciling
reads the claim set and then the ledger under that same lock, so no fetch can claim an id
between the two reads without the ledger having it. An id that leaves the ledger between
the two reads was released in Redis first, and the give-back script skips ids no longer in
the claim set. So the strays are exactly the ids of fetches whose reply never came and the
ids the process let go of. This holds with any number of consumers per queue in the
process; it assumes one process per worker id (Dramatiq draws a new id for each broker).

**Cost.** Per message: its id added to a set at the fetch, removed at the acknowledgement
(well under a microsecond), and two flag reads (work queue, consumer). Per fetch: an
uncontended lock. Per tick: one SMEMBERS per queue the process fetched from, and an
SMISMEMBER per queue only after a heartbeat failed or came late. A fetch's reply carries
the ids beside the bodies (Dramatiq's returns bodies only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterable
from typing import Any

import redis
from dramatiq.common import current_millis

from .connection import OwnConnection, script

__all__ = ["FetchedBodies", "RedisClaims"]

logger = logging.getLogger("dramaturg.recovery")

#: How many given-back message ids a WARNING names (the rest are counted).
SHOWN_IDS = 20

_FETCH = script("fetch")
_FETCH_SHA = hashlib.sha1(_FETCH.encode()).hexdigest()
_GIVE_BACK = script("give_back_claims")


def _ids_in(bodies: list[bytes]) -> list[str]:
    """The Redis ids written in ``bodies`` (bodies without one are left out)."""
    found = []
    for body in bodies:
        try:
            found.append(str(json.loads(body)["options"]["redis_message_id"]))
        except (ValueError, KeyError, TypeError):
            continue
    return found


class FetchedBodies(list[bytes]):
    """The bodies a fetch returned, as Dramatiq's consumer expects them, with their Redis
    ids in ``ids``. The consumer pops bodies from the front only, so the bodies left are
    those of the last ``len(self)`` ids."""

    def __init__(self, bodies: Iterable[bytes], ids: list[str]) -> None:
        super().__init__(bodies)
        self.ids = ids

    def remaining_ids(self) -> list[str]:
        return self.ids[len(self.ids) - len(self) :] if len(self) else []


class RedisClaims:
    """The ledger of one broker's claims: what its process holds (see the module docstring).

    ``broker`` is a Dramatiq Redis broker (its ``client``, ``namespace`` and ``broker_id``
    are read). Thread-safe.

    >>> claims = RedisClaims(broker)
    >>> bodies = claims.fetch("imports", 64)   # claim and note up to 64 messages
    >>> claims.release("imports", [redis_id])  # once Redis acknowledged one
    >>> claims.reconcile()                     # give back every claim nobody holds
    """

    def __init__(self, broker: Any) -> None:
        self.client: redis.Redis = broker.client
        self.namespace: str = broker.namespace
        self.worker_id: str = broker.broker_id
        self._held: dict[str, set[str]] = {}
        self._locks: dict[str, threading.Lock] = {}
        #: Redis id -> the thread whose delay queue took it (see delayed()).
        self._delayed: dict[str, int] = {}
        #: Queues to reconcile before their next fetch (a consumer started on them).
        self._unchecked: set[str] = set()
        self._setup = threading.Lock()
        #: Per queue, the connection its fetches use (under the queue's lock).
        self._connections: dict[str, OwnConnection] = {}
        self._give_back = self.client.register_script(_GIVE_BACK)
        #: True while this worker may have been taken for dead and has not checked its
        #: claims yet: its work queue starts nothing meanwhile. Read for every message.
        self.suspected = False
        #: Set while not :attr:`suspected`: what worker threads wait on.
        self.trusted = threading.Event()
        self.trusted.set()
        #: Moves on each time the worker comes under suspicion: a consumer made before
        #: gives back what it holds and restarts (see RedisConsumer).
        self.epoch = 0
        #: The Redis ids the last check found taken (see taken()): an acknowledgement tried
        #: again after a timeout tells by them whether the task may have run elsewhere.
        self.taken_ids: set[str] = set()

    # -- the message path ---------------------------------------------------------------

    def fetch(self, queue: str, count: int) -> FetchedBodies:
        """Claim up to ``count`` messages of ``queue`` (exact name) and note them as held.

        A new consumer's first fetch on ``queue`` gives back its stray claims first. Redis
        errors are raised: Dramatiq's consumer restarts on a connection error. Nothing is
        fetched while the worker may have been taken for dead (:attr:`suspected`): a message
        another worker recovered could come back here beside this process's own copy, and
        look like one still claimed.
        """
        if self.suspected:
            return FetchedBodies((), [])
        lock, held = self._queue(queue)
        with lock:
            if queue in self._unchecked:
                self._reconcile(queue, held)
                self._unchecked.discard(queue)
            connection = self._connections.get(queue)
            if connection is None:
                connection = self._connections[queue] = OwnConnection(self.client)
            args = [queue, self.worker_id, current_millis(), count]
            reply = connection.run(_FETCH_SHA, _FETCH, [self.namespace], args)
            ids = [redis_id.decode() for redis_id in reply[0::2]]
            held.update(ids)
        return FetchedBodies(reply[1::2], ids)

    def release(self, queue: str, redis_ids: Iterable[str]) -> None:
        """Forget ``redis_ids`` of ``queue``: Redis released their claims, or their holder
        let go of them."""
        held = self._held.get(queue)
        delayed = self._delayed
        for redis_id in redis_ids:
            if held is not None:
                held.discard(redis_id)
            if delayed:
                delayed.pop(redis_id, None)

    def delayed(self, redis_id: str) -> None:
        """Note that the calling consumer thread put this message in its delay queue."""
        self._delayed[redis_id] = threading.get_ident()

    def let_go(self, queue: str, redis_ids: Iterable[str]) -> None:
        """Let go of messages this process will not settle (their outcome could not be made
        durable): their claims stay in Redis, and the next reconciliation gives them back
        to the head of their queue (or another worker recovers them, if this one dies)."""
        self.release(queue, redis_ids)

    # -- taken for dead -------------------------------------------------------------------

    def suspect(self) -> None:
        """This worker may have been taken for dead: start nothing it holds until
        :meth:`taken` has been checked and :meth:`trust` called (see the module docstring)."""
        if not self.suspected:
            self.trusted.clear()
            self.epoch += 1
            self.suspected = True

    def trust(self) -> None:
        """Its claims are checked: the work queue starts messages again."""
        self.suspected = False
        self.trusted.set()

    def taken(self) -> dict[str, list[str]]:
        """The ids this process holds whose claims are gone: queue -> Redis ids.

        One SMISMEMBER per queue, against its claim set; the ids found are forgotten here
        (they are another worker's now). An id released meanwhile (acknowledged) is not
        counted. Redis errors are raised (the recovery thread tries again at its next tick).
        """
        found: dict[str, list[str]] = {}
        for queue in sorted(self._held):
            lock, held = self._queue(queue)
            with lock:
                ids = list(held)
            if not ids:
                continue
            members = self._members(queue, ids)
            gone = [redis_id for redis_id, member in zip(ids, members, strict=True) if not member]
            if not gone:
                continue
            with lock:
                gone = [redis_id for redis_id in gone if redis_id in held]
                held.difference_update(gone)
            for redis_id in gone:
                self._delayed.pop(redis_id, None)
            if gone:
                found[queue] = gone
        return found

    def _members(self, queue: str, ids: list[str]) -> list[bool]:
        """Whether each of ``ids`` is in ``queue``'s claim set (SMISMEMBER, Redis 6.2; one
        SMEMBERS on an older server)."""
        key = self._claims_key(queue)
        try:
            return [bool(flag) for flag in self.client.smismember(key, ids)]
        except redis.ResponseError as error:
            if "unknown command" not in str(error).lower():
                raise
        claimed = {member.decode() for member in self.client.smembers(key)}  # type: ignore[union-attr]
        return [redis_id in claimed for redis_id in ids]

    # -- consumers ------------------------------------------------------------------------

    def consumer_started(self, queue: str) -> None:
        """A consumer of ``queue`` was made: reconcile the queue before its next fetch."""
        with self._setup:
            self._unchecked.add(queue)

    def consumer_closed(self, queue: str, thread: int, cached: list[bytes]) -> None:
        """A consumer of ``queue``, run by ``thread``, closed with ``cached`` still prefetched.

        Lets go of those, and of the messages ``thread`` had put in its delay queue and not
        released (Dramatiq has emptied that queue by now), and gives them back. Never
        raises: what cannot be given back now is given back by the next reconciliation.
        """
        held = self._held.get(queue)
        if held is None:
            return
        let_go = cached.remaining_ids() if isinstance(cached, FetchedBodies) else _ids_in(cached)
        let_go += [redis_id for redis_id, owner in self._delayed.copy().items() if owner == thread and redis_id in held]
        if not let_go:
            return
        self.release(queue, let_go)
        try:
            moved = self._give_back_ids(queue, let_go)
        except redis.RedisError as error:
            logger.debug("could not give back %d messages of %s yet (%s)", len(let_go), queue, error)
            return
        logger.debug("gave back %d messages of %s its closing consumer held", len(moved), queue)

    # -- reconciliation -------------------------------------------------------------------

    def reconcile(self) -> int:
        """Give back every claim of this worker that no thread of it holds; return how many.

        Redis errors are raised (the recovery thread tries again at its next tick).
        """
        total = 0
        for queue in sorted(self._held):
            lock, held = self._queue(queue)
            with lock:
                total += self._reconcile(queue, held)
        return total

    def _reconcile(self, queue: str, held: set[str]) -> int:
        """Give back the claims of ``queue`` not in ``held``; the queue's lock is held."""
        claimed: set[bytes] = self.client.smembers(self._claims_key(queue))  # type: ignore[assignment]
        stray = [redis_id.decode() for redis_id in claimed]
        stray = [redis_id for redis_id in stray if redis_id not in held]
        if not stray:
            return 0
        moved = self._give_back_ids(queue, stray)
        if moved:
            shown = moved[:SHOWN_IDS]
            more = len(moved) - len(shown)
            logger.warning(
                "gave back %d message%s this worker had claimed but no thread of it holds"
                " (a fetch whose reply was lost, or messages dropped after a connection error),"
                " to the head of %s: %s%s",
                len(moved),
                "" if len(moved) == 1 else "s",
                queue,
                ", ".join(shown),
                f" and {more} more" if more else "",
            )
        return len(moved)

    def _give_back_ids(self, queue: str, redis_ids: list[str]) -> list[str]:
        base = f"{self.namespace}:{queue}"
        keep_order = "0" if queue.endswith(".DQ") else "1"  # delayed ones run by eta anyway
        moved = self._give_back(keys=[self._claims_key(queue), base, base + ".msgs"], args=[keep_order, *redis_ids])
        return [message_id.decode(errors="replace") for message_id in moved]

    def claim_sets(self) -> list[str]:
        """The claim sets this worker may have: one per queue it fetched from (see
        :meth:`no_new_queues`)."""
        return [self._claims_key(queue) for queue in sorted(self._held)]

    def no_new_queues(self) -> threading.Lock:
        """Held, no fetch from a queue not fetched from before starts (a queue is noted,
        under this lock, before its first fetch is sent): :meth:`claim_sets` stays whole."""
        return self._setup

    def _claims_key(self, queue: str) -> str:
        return f"{self.namespace}:__acks__.{self.worker_id}.{queue}"

    def close(self) -> None:
        """Close the connections of the fetches (the broker closes)."""
        for connection in list(self._connections.values()):
            connection.close()

    def _queue(self, queue: str) -> tuple[threading.Lock, set[str]]:
        try:
            return self._locks[queue], self._held[queue]
        except KeyError:
            with self._setup:
                return self._locks.setdefault(queue, threading.Lock()), self._held.setdefault(queue, set())
