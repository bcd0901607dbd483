"""Recovering the messages of workers that died, on the Redis and embedded brokers.

A Redis worker claims each message it fetches in a set,
``<namespace>:__acks__.<worker id>.<queue>``, until it acknowledges it, and shows it is
alive with a heartbeat: its id, scored by the time, in ``<namespace>:__heartbeats__``.
A worker that stops cleanly puts back what it claimed. One that dies (``kill -9``, the
OOM killer, a lost machine) leaves its claims behind, and Dramatiq moves them back only
in its "maintenance", which runs on one random Redis call in a thousand and only for the
queue of that call: with idle workers that takes minutes to tens of minutes
(``benchmarks/recovery.py``).

:class:`RedisRecovery` runs a thread in each worker process that, every tick
(``broker.heartbeat_timeout`` / 5, at least 100 ms; the first one at boot):

1. writes this worker's heartbeat, also under each queue it consumes
   (``<namespace>:__workers__:<queue>``, which ``dramaturg stats`` counts);
2. takes every worker whose heartbeat is ``heartbeat_timeout`` old for dead, finds its
   claim sets with SCAN, and moves the claimed messages whose bodies still exist back to
   the queue each set names (a lane such as ``imports.P1`` or a delay queue such as
   ``imports.DQ`` included), one Lua script per set, so two workers recovering at once
   never push a message twice; then forgets the dead worker. Each dead worker that had
   messages gets one WARNING: how many, on which queues, how long since its last heartbeat;
3. gives back the claims of this worker that no thread of it holds any more (a fetch
   whose reply was lost, messages a consumer dropped after a connection error), with one
   WARNING naming them: see :mod:`dramaturg.brokers.redis.claims`, which also does it
   when a consumer restarts and explains why a message a thread holds is never given back;
4. finishes what a purge that died left behind (``dramaturg queue purge`` killed between
   taking tasks off a queue and recording them; see :mod:`dramaturg.brokers.redis.admin`):
   at most every ``LEFT_STEP_MS`` / 6 (10 s), a thread of its own takes over one step a
   minute old and records its tasks as purged, so that their batch completes and their
   unique keys are free without waiting for the next purge. Its own thread, because one
   step is up to 3,000 records and batch ends (a second or more), which must not hold the
   heartbeat up; one step a time, and the step's compare-and-delete, so that workers
   finishing at once each finish a different step and no task is counted twice;
5. on a Redis error, logs it and tries again at the next tick.

**Taken for dead.** A live worker is taken for dead by the others when its heartbeat is
``heartbeat_timeout`` old: cut off from Redis that long (or Redis unreachable, or paused),
or its process paused. When this thread's heartbeat fails, or comes more than
``heartbeat_timeout`` after the last one, or finds its entry gone, the worker *may* have
been: it starts nothing it holds in memory (its consumers give back what they prefetched
and delayed) until Redis answers again and it has checked which of its claims are still
its own; the messages another worker recovered are then dropped from its work queue, with
one WARNING (see :mod:`dramaturg.brokers.redis.claims`). The broker's client gives up on a
Redis that does not answer after ``heartbeat_timeout`` / 2 (at most 10 s; see
:func:`dramaturg.brokers.redis.connection.read_timeout_ms`), so a failed heartbeat is noticed within
0.7 x ``heartbeat_timeout``, before anyone can take this worker for dead. And a worker
that could not reach Redis itself takes nobody for dead until it has been reaching it
again for ``heartbeat_timeout``: after an outage every worker's heartbeat is old, and each
would otherwise take the others for dead.

When the worker stops, after its threads and consumers are done, it gives back whatever
it still claims and nothing holds, so a clean stop leaves no claim but those of tasks
still running past ``worker.shutdown_timeout``. If none is left, it takes its own entry
out of the heartbeats (``depart.lua``, which checks its claim sets are empty in the same
step), so that nobody takes it for dead later and SCANs the keyspace for its claims. A
process that only sends writes no heartbeat (Dramatiq's enqueue did, through its dispatch
script; see ``enqueue.lua``). Each stale heartbeat costs the workers a SCAN of the whole
keyspace (about 1 ms of Redis per 1,000 keys, and the keyspace holds a status record per
task of the day).

**Bound.** A dead worker's last heartbeat is at most one tick before it died. Its
messages are back on their queues within ``heartbeat_timeout`` + one tick
(<= 1.2 x ``heartbeat_timeout``) after that heartbeat, and are taken at the next fetch
(an idle worker polls at least once per ``worker_timeout``, 1 s), whatever the traffic,
provided one dramaturg worker on the namespace is alive. A replacement worker recovers
its dead predecessor at boot, once the predecessor's heartbeat is stale.

**Head, not tail.** Dramatiq fetches from the head of a queue's list (``lpop``) and
enqueues at its tail (``rpush``). Recovered messages go back to the head, oldest first:
they had already waited their turn, and behind a backlog the tail could mean hours, which
would undo the bound above. RabbitMQ does the same with a message whose consumer died (it
returns to its original position). Delay queues are ordered by ``eta`` in the worker, so
their order is not kept. A message that kills every worker that runs it (a crash, not an
exception) comes back at once either way.

**Heartbeats.** Dramatiq writes a worker's heartbeat only when one of its consumers calls
Redis. A consumer whose prefetch is full makes no call, so a worker whose tasks all run
long lives on the idle polling of its other consumers (delay queues, other lanes), once
every 0.5-1 s (``worker_timeout``): not at all while consumers are paused or restarting
after a connection error, and too rarely for a ``heartbeat_timeout`` near a second. Then
another worker takes it for dead and its messages run twice. The heartbeat written every
tick here does not depend on the consumers: only a process that cannot run this thread
for ``heartbeat_timeout`` (stopped, swapping, a C extension holding the GIL, cut off from
Redis) can be taken for dead, and the recovery script leaves alone a worker whose
heartbeat moved after it was found dead. As in Dramatiq, the clocks of the machines must
agree to well within ``heartbeat_timeout``.

**Dramatiq's maintenance is off** (``maintenance_chance=0``). It did the same on one Redis
call in a thousand, for that call's queue only, to the tail and without a word; left on,
it raced this recovery, and a message it took back was never logged. Its other job,
dropping dead-lettered messages older than a week, is done at each tick here, for the
queues the worker consumes. A namespace with no dramaturg worker alive recovers nothing
until one boots; the first tick at boot recovers then.

**Cost.** On the message path, a dict write per delayed message (which thread's delay
queue holds it); one round trip per tick per worker process (a small script per lane for
the dead letters), one SMEMBERS per queue it fetched from, and a SCAN only when a worker
died (``kill -9``, a lost machine) or is not dramaturg's; every 10 s a short-lived thread
and one small script call (a range of a sorted set that is empty unless a purge died).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import dramatiq

from ..queues import canonical_queue

if TYPE_CHECKING:
    from ..brokers.redis.claims import RedisClaims
    from ..brokers.redis.recovery import RecoveredWorker, RedisRecoverer

__all__ = ["MIN_TICK_MS", "RedisRecovery"]

logger = logging.getLogger("dramaturg.recovery")

#: The shortest tick: heartbeats and recovery at most ten times a second.
MIN_TICK_MS = 100
#: How many recovered message ids the WARNING names (the rest are counted).
SHOWN_IDS = 20
#: A stopping worker waits this long for a tick in progress (the thread is a daemon).
_JOIN_TIMEOUT_S = 5.0


class RedisRecovery(dramatiq.Middleware):
    """Heartbeats and dead-worker recovery in each worker process (see the module docstring).

    ``heartbeat_timeout_ms`` is the broker's (``broker.heartbeat_timeout``, which
    Dramatiq's own maintenance uses too).

    >>> RedisRecovery(heartbeat_timeout_ms=60_000).tick_ms
    12000
    """

    def __init__(self, heartbeat_timeout_ms: int) -> None:
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self._threads: dict[int, _RecoveryThread] = {}
        self._lock = threading.Lock()

    @property
    def tick_ms(self) -> int:
        """Milliseconds between ticks: a fifth of the heartbeat timeout, at least :data:`MIN_TICK_MS`."""
        return max(self.heartbeat_timeout_ms // 5, MIN_TICK_MS)

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        from ..brokers.redis.recovery import RedisRecoverer

        if self.heartbeat_timeout_ms < 5 * MIN_TICK_MS:
            logger.warning(
                "broker.heartbeat_timeout is %d ms: under %d ms a live worker can be taken for dead"
                " between two heartbeats (one every %d ms); raise it",
                self.heartbeat_timeout_ms,
                5 * MIN_TICK_MS,
                MIN_TICK_MS,
            )

        def queues() -> list[str]:
            # Consumers are added while the worker runs (actors declared late); list() copies at once.
            return sorted({canonical_queue(name) for name in list(getattr(worker, "consumers", {}))})

        recoverer = RedisRecoverer(broker, self.heartbeat_timeout_ms, queues)  # type: ignore[arg-type]
        thread = _RecoveryThread(recoverer, self.tick_ms / 1000, worker, broker)
        with self._lock:
            self._threads[id(worker)] = thread
        thread.start()

    def before_delay_message(self, broker: dramatiq.Broker, message: Any) -> None:
        # Called by the consumer thread as it puts the message in its delay queue, which
        # Dramatiq throws away after a connection error: the claims must know.
        claims = getattr(broker, "claims", None)
        redis_id = message.options.get("redis_message_id")
        if claims is not None and redis_id is not None:
            claims.delayed(redis_id)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        # Not before_worker_shutdown: running tasks may take worker.shutdown_timeout to
        # finish, and their worker must not look dead meanwhile.
        with self._lock:
            thread = self._threads.pop(id(worker), None)
        if thread is not None:
            thread.stop()
            try:
                thread.recoverer.leave()
            except Exception as error:  # its entries expire after 2 x heartbeat_timeout anyway
                logger.debug("could not leave the workers of its queues: %s", error)
        # Its consumers are closed: what it still claims and no thread holds goes back now,
        # not when its heartbeat has timed out.
        claims = getattr(broker, "claims", None)
        if claims is not None:
            try:
                claims.reconcile()
            except Exception as error:
                logger.warning(
                    "could not give back what this worker claimed and no longer holds (%s); another"
                    " worker recovers it once this one's heartbeat is %d ms old",
                    error,
                    self.heartbeat_timeout_ms,
                )
                return
        # Claiming nothing now, it leaves the heartbeats: otherwise the others take it for
        # dead once its heartbeat is old, and SCAN the keyspace for its claims. Not while
        # another worker of this process beats under the same id (the lock: none boots
        # meanwhile; one that boots after writes its heartbeat again).
        if thread is None:
            return
        with self._lock:
            if any(other.recoverer.worker_id == thread.recoverer.worker_id for other in self._threads.values()):
                return
            try:
                thread.recoverer.depart()
            except Exception as error:
                logger.debug("could not leave the heartbeats: %s", error)


class _RecoveryThread(threading.Thread):
    def __init__(
        self, recoverer: RedisRecoverer, tick_s: float, worker: Any = None, broker: dramatiq.Broker | None = None
    ) -> None:
        super().__init__(name="dramaturg-recovery", daemon=True)
        self.recoverer = recoverer
        self.tick_s = tick_s
        self.worker = worker
        #: The broker whose left purge steps this worker finishes (None: it does not).
        self.broker = broker
        self.finisher: threading.Thread | None = None
        self.next_finish_ms = 0
        self.stopped = threading.Event()
        self.failing = False
        #: When this worker's heartbeat was last written (ms since the epoch).
        self.last_beat_ms: int | None = None
        #: When it was written again after failing to be (ms): nobody is taken for dead by
        #: this worker for heartbeat_timeout after that.
        self.regained_ms: int | None = None

    def stop(self) -> None:
        self.stopped.set()
        if self is not threading.current_thread():
            self.join(_JOIN_TIMEOUT_S)
        finisher = self.finisher
        if finisher is not None:
            finisher.join(_JOIN_TIMEOUT_S)  # a step it did not finish is taken over again later

    def run(self) -> None:
        while True:
            self.tick()
            if self.stopped.wait(self.tick_s):
                return

    def tick(self) -> None:
        claims: RedisClaims | None = getattr(self.recoverer, "claims", None)
        timeout_ms: int | None = getattr(self.recoverer, "heartbeat_timeout_ms", None)
        now_ms = int(time.time() * 1000)  # the clock Dramatiq's heartbeats use
        last = self.last_beat_ms
        if claims is not None and timeout_ms is not None and last is not None and now_ms - last > timeout_ms:
            claims.suspect()  # this process or this thread was held up: others may have taken it for dead
        try:
            dead = self.recoverer.beat(now_ms)
        except Exception as error:
            if claims is not None:
                claims.suspect()
            self._failed(error)
            return
        self.last_beat_ms = now_ms
        if self.failing:
            self.regained_ms = now_ms
        try:
            if claims is not None and getattr(self.recoverer, "missing", False):
                claims.suspect()  # another worker took it for dead, and forgot it
            if claims is not None and claims.suspected:
                self._check(claims, now_ms - last if last is not None else 0)
            regained = self.regained_ms
            if dead and timeout_ms is not None and regained is not None and now_ms - regained < timeout_ms:
                logger.debug(
                    "not taking %d silent workers for dead yet: this worker reached Redis again %.1f s ago",
                    len(dead),
                    (now_ms - regained) / 1000,
                )
            else:
                for recovered in self.recoverer.recover(dead, now_ms) if dead else []:
                    _report(recovered, now_ms)
            self.recoverer.reconcile()
        except Exception as error:
            self._failed(error)
            return
        self._finish_left_purges(now_ms)
        if self.failing:
            logger.info("heartbeat and recovery work again")
            self.failing = False

    def _finish_left_purges(self, now_ms: int) -> None:
        """Start a thread that finishes one purge step left behind, if it is time and none runs."""
        from ..brokers.redis import admin

        if self.broker is None or now_ms < self.next_finish_ms:
            return
        if self.finisher is not None and self.finisher.is_alive():
            return
        self.next_finish_ms = now_ms + admin.LEFT_STEP_MS // 6
        self.finisher = threading.Thread(
            target=_finish_left_purges, args=(self.broker,), name="dramaturg-purge-finisher", daemon=True
        )
        self.finisher.start()

    def _failed(self, error: Exception) -> None:
        from redis import RedisError

        # Logged once per outage (with a traceback if it is not Redis's): the next
        # ticks try again quietly.
        level = logging.DEBUG if self.failing else logging.WARNING
        logger.log(
            level,
            "heartbeat and recovery failed (%s); trying again every %.1f s",
            error,
            self.tick_s,
            exc_info=not isinstance(error, RedisError),
        )
        self.failing = True

    def _check(self, claims: RedisClaims, silent_ms: int) -> None:
        """This worker may have been taken for dead: drop from its work queue what another
        worker recovered meanwhile, then let it start messages again."""
        taken = claims.taken()
        gone = {redis_id for ids in taken.values() for redis_id in ids}
        claims.taken_ids = gone  # for the acknowledgements still being tried
        if gone:
            dropped = _drop_from_work_queue(self.worker, gone)
            shown = [message.message_id for message in dropped[:SHOWN_IDS]]
            more = len(dropped) - len(shown)
            logger.warning(
                "this worker was taken for dead (its heartbeat was %.1f s old) and another worker recovered %d"
                " of the messages it held; any running here is run a second time there (each is logged as it"
                " ends here); the %d waiting here are dropped, not run: %s%s",
                silent_ms / 1000,
                len(gone),
                len(dropped),
                ", ".join(shown) or "none",
                f" and {more} more" if more else "",
            )
        claims.trust()


def _finish_left_purges(broker: dramatiq.Broker) -> None:
    from ..queue_admin import finish_left_purges

    try:
        finish_left_purges(broker, limit=1)
    except Exception as error:  # taken over again once it is LEFT_STEP_MS old
        logger.warning("could not finish a purge that stopped midway (%s); trying again later", error)


def _drop_from_work_queue(worker: Any, redis_ids: set[str]) -> list[Any]:
    """Take the messages whose Redis ids are ``redis_ids`` out of ``worker``'s work queue
    (and out of their consumers' counts); return them."""
    work_queue = getattr(worker, "work_queue", None)
    if work_queue is None:
        return []
    with work_queue.mutex:
        items = work_queue.queue
        dropped = [item for item in items if item.message.options.get("redis_message_id") in redis_ids]
        if dropped:
            items[:] = [item for item in items if item.message.options.get("redis_message_id") not in redis_ids]
            heapq.heapify(items)
    consumers = getattr(worker, "consumers", {})
    for item in dropped:
        work_queue.task_done()
        thread = consumers.get(item.message.queue_name)
        consumer = getattr(thread, "consumer", None)
        if consumer is not None:
            consumer.queued_message_ids.discard(item.message.message_id)  # it holds one less
    return [item.message for item in dropped]


def _report(recovered: RecoveredWorker, now_ms: int) -> None:
    worker = recovered.worker
    silent_s = (now_ms - worker.last_heartbeat_ms) / 1000
    if recovered.total:
        shown = recovered.message_ids[:SHOWN_IDS]
        more = len(recovered.message_ids) - len(shown)
        logger.warning(
            "recovered %d message%s of dead worker %s (no heartbeat for %.1f s), back at the head of %s,"
            " started or not (those it had started run again): %s%s",
            recovered.total,
            "" if recovered.total == 1 else "s",
            worker.worker_id,
            silent_s,
            ", ".join(f"{queue} ({count})" for queue, count in sorted(recovered.messages.items())),
            ", ".join(shown),
            f" and {more} more" if more else "",
        )
    if recovered.revived:
        logger.warning(
            "worker %s wrote a heartbeat after %.1f s of silence: alive, left alone", worker.worker_id, silent_s
        )
    elif not recovered.total:
        logger.debug("forgot worker %s: no heartbeat for %.1f s and no messages claimed", worker.worker_id, silent_s)
