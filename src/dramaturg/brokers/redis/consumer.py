"""The Redis consumer: :class:`RedisConsumer`, which holds poison messages instead of
stalling on them, and settles each message through the claims of its worker."""

from __future__ import annotations

import functools
import json
import logging
import operator
import threading
import time
from collections.abc import Callable, Iterable
from queue import Empty
from typing import Any

import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import _RedisConsumer
from dramatiq.common import compute_backoff
from dramatiq.errors import ConnectionClosed

from ... import envelope, suspension, unknown_actors
from ...batches.tracker import BATCH_END, tracker_of
from ...held import HeldTask, hold_poison
from ...queues import canonical_queue
from ...task import RunOutcome, outcome_of
from ..proxy import with_fields
from .claims import RedisClaims

#: The attribute of a delivered message whose acknowledgement enqueues a copy of it
#: (:meth:`~dramaturg.brokers.redis.RedisBroker.put_back_with_ack`): the copy, its delay,
#: the copy as placed, its Redis id and its body.
PUT_BACK = "_dramaturg_put_back"

__all__ = ["RedisConsumer"]

logger = logging.getLogger("dramaturg.recovery")


class RedisConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, holding poison messages instead of stalling on them.

    Dramatiq's own consumer lets a body it cannot decode (or a message whose fields it
    chokes on) escape as an exception: the consumer restarts, and the messages it had
    prefetched stay claimed by a worker that is still alive, so nothing moves them back
    until it restarts. Here each body is read by :func:`dramaturg.envelope.decode`: one
    that does not decode, has a field of the wrong type or names another queue is held
    with its reason and acknowledged, and the consumer goes on with the next message. A
    message for an actor this worker does not know is given back for a while, then held
    (:mod:`dramaturg.unknown_actors`).

    While its queue is suspended (:mod:`dramaturg.suspension`) it fetches nothing and
    pushes what it had prefetched back onto the queue.

    Closing gives back what it had prefetched and not handed out, and what its thread
    had put in its delay queue and dropped; a new consumer gives back, before its first
    fetch, every claim of the queue that no thread of the process holds (a consumer
    restarted after a connection error, a fetch whose reply was lost). See
    :mod:`dramaturg.brokers.redis.claims`, which explains why this never gives back a
    message a thread still holds. Once the worker may have been taken for dead (the
    claims' ``epoch`` moved on), it lets go of what it prefetched and what its thread
    delayed in the same way, before it hands out anything more.

    Acknowledging or rejecting a message whose claim another worker took away (it
    recovered this worker, taken for dead, while the message ran) changes nothing in Redis
    and logs that the message runs again. A message whose outcome could not be made
    durable because Redis could not be reached (:func:`~dramaturg.task.outcome_of` says "unsettled") is
    neither: it is let go, its claim stays, and the next reconciliation gives it back. Any
    Redis error of an acknowledgement is raised as Dramatiq's ``ConnectionClosed``, which
    its worker retries (it retries no other, and a timeout would strand the message).
    """

    def __init__(self, broker: Any, queue_name: str, prefetch: int, timeout: int) -> None:
        # ``broker`` is the RedisBroker whose consumer_class this is; its claims settle every message.
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        # Dramatiq's ConsumerThread makes its consumer in its own thread: the thread whose
        # delay queue holds this consumer's delayed messages.
        self._thread = threading.get_ident()
        self._claims: RedisClaims = broker.claims
        #: A delay queue's: the message id and move of the delayed message that its
        #: acknowledgement moves to its queue (see RedisBroker._move_with_ack).
        self.moving: tuple[str, tuple[Any, ...]] | None = None
        #: The claims' epoch this consumer was made in (see dramaturg.brokers.redis.claims).
        self.epoch = self._claims.epoch
        self._claims.consumer_started(queue_name)
        #: Set by an acknowledgement that made room in a full prefetch (see _wait_for_room).
        self._room = threading.Event()
        self._waiting_for_room = False

    def ack(self, message: Any) -> None:
        moving = self.moving
        if moving is not None and moving[0] == message.message_id and threading.get_ident() == self._thread:
            # A delayed message now due: moved by this ack, which Dramatiq's consumer thread
            # sends right after the move. Taken only there and only for that message: an ack
            # of another thread meanwhile must not clear it (the move would be lost).
            self.moving = None
            message.__dict__[PUT_BACK] = moving[1]
        put_back = message.__dict__.get(PUT_BACK)
        if put_back is None:
            self._settle(message, self.broker.do_ack, "ended")
            return
        if message.__dict__.get(BATCH_END) is not None:
            # Not made by dramaturg (a put-back is no batch member's end); should it be, the
            # copy is written first, as any copy, so that the end can go with the ack.
            message.__dict__.pop(PUT_BACK, None)
            self.broker.enqueue_copy(put_back[0], delay=put_back[1])
            self._settle(message, self.broker.do_ack, "ended")
            return
        self._settle(message, functools.partial(self.broker.do_put_back, put_back=put_back), "was put back")

    def nack(self, message: Any) -> None:
        self._settle(message, self.broker.do_nack, "was rejected")

    def _settle(self, message: Any, command: Callable[..., Any], what: str) -> None:
        # The current queue, not message.queue_name: a delayed message is acknowledged on
        # the delay queue it came from (as in Dramatiq's consumer).
        redis_id = message.options["redis_message_id"]
        try:
            if outcome_of(message) == RunOutcome.UNSETTLED:
                self._claims.let_go(self.queue_name, (redis_id,))
                return
            end = message.__dict__.get(BATCH_END)
            # Dramatiq's two-argument call when there is no end (code that wraps do_ack keeps working).
            result = command(self.queue_name, redis_id) if end is None else command(self.queue_name, redis_id, end)
            if isinstance(result, list):
                # The member's end (written) fired its batch's callbacks: published before
                # the message is settled, so a worker killed meanwhile runs it again and
                # its repeated end publishes them again (same message ids).
                try:
                    tracker_of(self.broker).fire(self.broker, end[2], result, strict=True)
                except redis.RedisError:
                    raise
                except Exception as error:
                    # Not published: the message stays claimed and Dramatiq tries its
                    # acknowledgement again (ConnectionClosed), whose repeated end fires them again.
                    raise ConnectionClosed(error) from None
                message.__dict__.pop(BATCH_END, None)
                result = command(self.queue_name, redis_id)
            if result == 1:
                return
            claims, unsure = self._claims, message.__dict__.get("_dramaturg_unsure")
            if result == 0 or unsure is None:
                logger.warning(
                    "%s (message %s) %s here, but runs again: this worker was taken for dead while it held it,"
                    " and another worker recovered it (its acknowledgement changed nothing)",
                    message.actor_name,
                    message.message_id,
                    what,
                )
            elif claims.suspected or unsure != claims.epoch or redis_id in claims.taken_ids:
                # Settled already, by an earlier try whose answer was lost or by the worker
                # that recovered it: Redis cannot tell which.
                logger.warning(
                    "%s (message %s) %s here while this worker may have been taken for dead; it may have run again"
                    " on a worker that recovered it (unless an earlier try of its acknowledgement went through)",
                    message.actor_name,
                    message.message_id,
                    what,
                )
        except redis.RedisError as error:
            # The command may have run (a timeout, a lost reply): its next try may find it
            # done. In which suspicion of being taken for dead the first try failed is noted.
            message.__dict__.setdefault("_dramaturg_unsure", self._claims.epoch)
            raise ConnectionClosed(error) from None
        finally:
            self.queued_message_ids.discard(message.message_id)
            self._made_room()

    def requeue(self, messages: Iterable[Any]) -> None:
        # Dramatiq's lets redis.ConnectionError out, which its ConsumerThread.close and
        # Worker.stop do not catch: the consumer thread died, or the stop went no further.
        try:
            super().requeue(messages)  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise ConnectionClosed(error) from None

    def close(self) -> None:
        try:
            cached, self.message_cache = self.message_cache, []
            self._claims.consumer_closed(self.queue_name, self._thread, cached)
        finally:
            super().close()

    def __next__(self) -> Any:
        while True:
            if self.epoch != self._claims.epoch:
                self._let_go_after_suspicion()
            wait = suspension.remaining_s(self._queue())
            if wait > 0 and not self.queue_name.endswith(".DQ"):  # delay queues only move messages on
                self._give_back_prefetched()
                time.sleep(min(wait, self.timeout / 1000))  # idle, as Dramatiq's consumer is between fetches
                return None
            body = self._next_body()
            if body is None:
                return None
            try:
                message = envelope.decode(body, self.queue_name)
            except envelope.Poison as poison:
                self._hold_poison(poison)
                continue
            if "redis_message_id" not in message.options:
                # Put here by another client; Dramatiq needs this id to acknowledge it.
                redis_id = self._claimed_id(functools.partial(_has_id, message.message_id))
                if redis_id is None:
                    continue
                message.options["redis_message_id"] = redis_id
            # A delayed one is met when it comes back to its queue (Dramatiq does not look its actor up before).
            if message.actor_name in self.broker.actors or message.options.get("eta") is not None:
                self.queued_message_ids.add(message.message_id)
                return with_fields(MessageProxy(message))
            if unknown_actors.settle(self.broker, message, self._queue()):  # given back, or held
                self.ack(with_fields(MessageProxy(message)))

    def _next_body(self) -> bytes | None:
        """The next body this consumer claimed, fetching more when it has none; None when
        the queue is idle. Dramatiq 2.x's ``__next__`` without its decoding, which
        :func:`dramaturg.envelope.decode` does instead (Dramatiq's raises on some bodies
        after taking them from the batch, and the batch stays claimed)."""
        try:
            while True:
                if self.message_cache:
                    body: bytes | None = self.message_cache.pop(0)
                    if body is not None:  # Dramatiq saw None once (its issue 266): skip it as it does
                        self.misses = 0
                        return body
                    continue
                bodies: list[bytes] = []
                if self.outstanding_message_count < self.prefetch:
                    self.message_cache = bodies = self.broker.do_fetch(
                        self.queue_name, self.prefetch - self.outstanding_message_count
                    )
                elif self._wait_for_room():
                    return None
                if not bodies:
                    # Nothing came: poll less often, up to the idle timeout. From 1 ms, where
                    # Dramatiq starts at 5: a task sent to an idle worker starts ~3 ms sooner
                    # (what it waits is the sleep it lands in), for a few more polls in the
                    # first 100 ms of idleness; the idle rate (the timeout) is the same.
                    self.misses, backoff_ms = compute_backoff(self.misses, factor=1, max_backoff=self.timeout)
                    time.sleep(backoff_ms / 1000)
                    return None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise ConnectionClosed(e) from None

    def _wait_for_room(self) -> bool:
        """The prefetch is full: wait until the worker threads' acknowledgements have made
        room for a quarter of it (or the idle timeout), instead of polling with a backoff
        that grows while it stays full (Dramatiq's: up to the idle timeout, while the
        threads empty the work queue and then wait for messages). False for a delay queue, whose
        prefetch holds messages waiting for their time: this thread moves them, between
        polls, and must not sleep through their time."""
        if self.queue_name.endswith(".DQ"):
            return False
        self._room.clear()
        self._waiting_for_room = True
        if self.outstanding_message_count >= self.prefetch:  # again, now that an ack would wake it
            self._room.wait(self.timeout / 1000)
        self._waiting_for_room = False
        return True

    def _made_room(self) -> None:
        """After an acknowledgement: wake the consumer thread waiting for room, once a
        quarter of the prefetch is free (one wake-up per quarter of a prefetch, not one per
        message: 16 acknowledgements with the default prefetch of 64; the first one for a
        prefetch under 8, which long tasks use)."""
        if self._waiting_for_room and self.outstanding_message_count <= self.prefetch - max(1, self.prefetch // 4):
            self._waiting_for_room = False
            self._room.set()

    def _let_go_after_suspicion(self) -> None:
        """The worker may have been taken for dead since this consumer was made: give back
        what it prefetched and what its thread holds in its delay queue. The give-back
        script moves back only what is still this worker's; what another worker recovered
        is another worker's now (see :mod:`dramaturg.brokers.redis.claims`)."""
        self.epoch = self._claims.epoch
        delayed = getattr(threading.current_thread(), "delay_queue", None)
        while delayed is not None:
            try:
                item = delayed.get_nowait()
            except Empty:
                break
            delayed.task_done()
            self.queued_message_ids.discard(item.message.message_id)
        cached, self.message_cache = self.message_cache, []
        # What the thread delayed is still noted as its own: let go of it with the cache.
        self._claims.consumer_closed(self.queue_name, self._thread, cached)

    def _queue(self) -> str:
        return canonical_queue(self.queue_name)

    def _give_back_prefetched(self) -> None:
        if not self.message_cache:
            return
        cached, self.message_cache = self.message_cache, []
        redis_ids = []
        for body in cached:
            redis_id = _redis_id(body) or self._claimed_id(functools.partial(operator.eq, body))
            if redis_id is not None:
                redis_ids.append(redis_id)
        if redis_ids:
            self.broker.do_requeue(self.queue_name, *redis_ids)

    def _claimed_id(self, matches: Callable[[bytes], bool]) -> str | None:
        """The Redis id of a message this consumer has claimed, found by its body.

        The fetch script returns bodies without their ids, so look among the ids this
        consumer has claimed (at most its prefetch). Only poison messages come here.
        """
        broker = self.broker
        claimed = f"{broker.namespace}:__acks__.{broker.broker_id}.{self.queue_name}"
        bodies = f"{broker.namespace}:{self.queue_name}.msgs"
        for redis_id in broker.client.smembers(claimed):
            body = broker.client.hget(bodies, redis_id)
            if body is not None and matches(body):
                return str(redis_id.decode())
        return None

    def _hold_poison(self, poison: envelope.Poison) -> None:
        body = poison.body
        # The id a Dramatiq client wrote into the body, if the body under it is this one;
        # else look among the claimed ones.
        redis_id = _redis_id(body)
        if (
            redis_id is None
            or self.broker.client.hget(f"{self.broker.namespace}:{self.queue_name}.msgs", redis_id) != body
        ):
            redis_id = self._claimed_id(functools.partial(operator.eq, body))
        if redis_id is None:
            return
        if hold_poison(self.broker, HeldTask.from_poison(poison, self._queue(), redis_id)):
            self.broker.do_ack(self.queue_name, redis_id)


def _redis_id(body: bytes) -> str | None:
    try:
        return str(json.loads(body)["options"]["redis_message_id"])
    except (ValueError, KeyError, TypeError):
        return None


def _has_id(message_id: str, body: bytes) -> bool:
    try:
        return bool(json.loads(body)["message_id"] == message_id)
    except (ValueError, KeyError, TypeError):
        return False
