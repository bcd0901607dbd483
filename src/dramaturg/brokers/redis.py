"""Redis through redis-py: Dramatiq's Redis broker, keys under ``broker.namespace``."""

from __future__ import annotations

import builtins
import functools
import json
import logging
import operator
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from queue import Empty
from typing import TYPE_CHECKING, Any

import redis
from dramatiq import Message, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker as _DramatiqRedisBroker
from dramatiq.brokers.redis import _RedisConsumer
from dramatiq.common import compute_backoff, current_millis, dq_name
from dramatiq.errors import BrokerConnectionError, ConnectionClosed, DecodeError
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import envelope, suspension, unknown_actors
from ..bulk import new_ids
from ..config import BrokerSettings
from ..errors import BrokerUnreachable, ConfigError
from ..held import LEASE_LOST, HeldStore, HeldTask
from ..masking import mask_url
from ..middleware.outcomes import hold_poison
from ..middleware.priority import message_priority
from ..queues import canonical_queue, lane_queue, lanes
from .redis_claims import RedisClaims

if TYPE_CHECKING:
    from ..bulk import EnqueueHooks
    from .redis_stats import RedisStatsReader

__all__ = [
    "MAX_READ_TIMEOUT_MS",
    "DeadWorker",
    "RecoveredWorker",
    "RedisBroker",
    "RedisConsumer",
    "RedisHeldStore",
    "RedisRecoverer",
    "copy_id",
    "create_broker",
    "ping",
    "read_timeout_ms",
]


# Enqueues many messages as Dramatiq's dispatch script enqueues one: the body in
# <ns>:<queue>.msgs, the id at the tail of <ns>:<queue>. The messages of a queue come as
# one argument of netstrings ("<length>:<bytes>"), Redis id then body for each: one
# argument per message costs the client more to pack than building the message.
# KEYS: namespace; ARGV: (queue name, framed ids and bodies) per queue.
_ENQUEUE_MANY = """
local count = 0
for a = 1, #ARGV, 2 do
    local queue = KEYS[1] .. ":" .. ARGV[a]
    local blob = ARGV[a + 1]
    local pos, size = 1, #blob
    local fields, ids = {}, {}
    while pos <= size do
        local colon = string.find(blob, ":", pos, true)
        local stop = colon + tonumber(string.sub(blob, pos, colon - 1))
        local id = string.sub(blob, colon + 1, stop)
        colon = string.find(blob, ":", stop + 1, true)
        pos = colon + tonumber(string.sub(blob, stop + 1, colon - 1)) + 1
        fields[#fields + 1] = id
        fields[#fields + 1] = string.sub(blob, colon + 1, pos - 1)
        ids[#ids + 1] = id
        if #ids == 500 or pos > size then
            redis.call("hset", queue .. ".msgs", unpack(fields))
            redis.call("rpush", queue, unpack(ids))
            count = count + #ids
            fields, ids = {}, {}
        end
    end
end
return count
"""

# Enqueues a copy of an enqueued message (a retry, a release, a delayed message now due)
# under a Redis id derived from its source (see copy_id): a write run again, after its
# reply was lost or timed out, finds its body there and queues nothing.
# KEYS: queue list, queue bodies; ARGV: Redis id, body. Returns 1 if it was queued.
_ENQUEUE_ONCE = """
if redis.call("hsetnx", KEYS[2], ARGV[1], ARGV[2]) == 1 then
    redis.call("rpush", KEYS[1], ARGV[1])
    return 1
end
return 0
"""

# Acknowledges a claimed message, as Dramatiq's ack command does, and says whether it was
# still claimed: 1 if so; else nothing changes (the body is another holder's), and it
# returns 0 while the body is there (another worker recovered the message while this one
# was taken for dead: it runs again), -1 once it is gone (acknowledged already: by an
# earlier try of this one whose reply was lost, or by the worker that ran it again).
# KEYS: claim set, queue bodies; ARGV: Redis id
_ACK = """
if redis.call("srem", KEYS[1], ARGV[1]) == 1 then
    redis.call("hdel", KEYS[2], ARGV[1])
    return 1
end
if redis.call("hexists", KEYS[2], ARGV[1]) == 1 then
    return 0
end
return -1
"""

# Rejects a claimed message into the dead-letter queue, as Dramatiq's nack command does;
# the same answers as _ACK.
# KEYS: claim set, queue bodies, dead letters (zset), their bodies; ARGV: Redis id, now (ms)
_NACK = """
if redis.call("srem", KEYS[1], ARGV[1]) == 1 then
    local body = redis.call("hget", KEYS[2], ARGV[1])
    if body then
        redis.call("zadd", KEYS[3], ARGV[2], ARGV[1])
        redis.call("hset", KEYS[4], ARGV[1], body)
        redis.call("hdel", KEYS[2], ARGV[1])
    end
    return 1
end
if redis.call("hexists", KEYS[2], ARGV[1]) == 1 then
    return 0
end
return -1
"""

#: The UUID namespace of copy_id().
_COPIES = uuid.UUID("6f1d3c52-6b0e-4f43-9a57-3d2b9c1e8a40")

#: The longest read timeout of the broker's client (see read_timeout_ms).
MAX_READ_TIMEOUT_MS = 10_000

logger = logging.getLogger("dramaturg.recovery")


def copy_id(source_redis_id: str, retries: int) -> str:
    """The Redis id of a copy of the message enqueued under ``source_redis_id``, with
    ``retries`` failed attempts: the same for every run of the same write, so that it is
    queued once. A retry copy counts one more failed attempt than its source; a release or
    a delayed message's move counts as many; a copy of a copy has another source."""
    return str(uuid.uuid5(_COPIES, f"{source_redis_id}:{retries}"))


class RedisBroker(_DramatiqRedisBroker):
    """Dramatiq's Redis broker, built from :class:`BrokerSettings`.

    ``client`` is the redis-py client every dramaturg component shares; the embedded
    broker passes one connected to its own server's socket. Neither retries a command by
    itself (see :func:`no_retry`).

    ``claims`` knows which of the messages this process claimed it still holds, and gives
    back the others (:mod:`dramaturg.brokers.redis_claims`): fetching, acknowledging,
    rejecting and requeueing go through it.

    A copy of a message enqueued before (a retry, a release, a delayed message now due) is
    enqueued under a Redis id derived from its source (:func:`copy_id`) and only if that id
    is not there yet (:meth:`enqueue_copy`): running the same write twice, as
    :class:`~dramaturg.middleware.outcomes.Outcomes` does after an error whose write may
    well have run (a timeout, a lost reply), queues it once. Any other ``enqueue`` of a
    message is a new one, as in Dramatiq (a handler may enqueue copies of its own message).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        middleware: list[Middleware],
        client: redis.Redis | None = None,
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            middleware=middleware,
            namespace=settings.namespace,
            heartbeat_timeout=settings.heartbeat_timeout,
            client=client or make_client(settings),
            # Dramatiq's maintenance (dead workers' messages back at the tail, silently, on
            # one call in a thousand) is replaced by dramaturg.middleware.recovery.
            maintenance_chance=0,
        )
        self.settings = settings
        self.held = RedisHeldStore(self)
        self._enqueue_script = self.client.register_script(_ENQUEUE_MANY)
        self._enqueue_once = self.client.register_script(_ENQUEUE_ONCE)
        self._ack = self.client.register_script(_ACK)
        self._nack = self.client.register_script(_NACK)
        self.claims = RedisClaims(self)
        self._requeue = self._dispatch("requeue")  # type: ignore[no-untyped-call]

    @functools.cached_property
    def stats(self) -> RedisStatsReader:
        """Queue statistics (see :mod:`dramaturg.stats`)."""
        from .redis_stats import RedisStatsReader

        return RedisStatsReader(self)

    @property
    def consumer_class(self) -> type[RedisConsumer]:
        return RedisConsumer

    def declare_queue(self, queue_name: str) -> None:
        """Declare a queue with its priority lanes (see :mod:`dramaturg.queues`)."""
        if not self.settings.priorities or queue_name.endswith(".DQ") or canonical_queue(queue_name) != queue_name:
            super().declare_queue(queue_name)
            return
        for lane in lanes(queue_name):
            super().declare_queue(lane)

    def pending(self, queue_name: str) -> int:
        """Messages of a queue not yet acknowledged: ready, delayed or being processed."""
        # Dramatiq keeps a body in <queue>.msgs until it is acknowledged, for every lane.
        names = lanes(queue_name) if self.settings.priorities else [queue_name]
        with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hlen(f"{self.namespace}:{name}.msgs")
                pipe.hlen(f"{self.namespace}:{name}.DQ.msgs")
            return sum(int(n) for n in pipe.execute())

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        """Enqueue on the lane of the message's priority, as Dramatiq's broker does otherwise,
        except that a new message's Redis id is its own id (see :meth:`find_message`), and
        that a delayed message now due is moved as a copy (:meth:`enqueue_copy`)."""
        if "redis_message_id" in message.options:
            consumer = getattr(threading.current_thread(), "consumer", None)
            if isinstance(consumer, RedisConsumer) and consumer.queue_name.endswith(".DQ"):
                # Dramatiq's consumer thread moves a delayed message that is due to its queue.
                if consumer.epoch != self.claims.epoch:
                    raise ConnectionClosed(
                        f"this worker may have been taken for dead: delayed message {message.message_id} is not"
                        " moved; the consumer gives back what it holds (what is still this worker's) and restarts"
                    )
                return self.enqueue_copy(message, delay=delay)
        message, redis_id = self.placed(message, delay)
        self.emit_before("enqueue", message, delay)
        self.do_enqueue(message.queue_name, redis_id, message.encode())
        self.emit_after("enqueue", message, delay)
        return message

    def enqueue_copy(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        """Enqueue a copy of a message enqueued before (a retry, a release, a delayed message
        now due), once: under a Redis id derived from its source's and the failed attempts
        it counts (:func:`copy_id`), and only if that id is not there yet. Running the same
        write again (after a timeout or a lost reply, when it may well have run) queues
        nothing more. Used by :class:`~dramaturg.middleware.outcomes.Outcomes`."""
        if "redis_message_id" not in message.options:
            return self.enqueue(message, delay=delay)
        message, redis_id = self.placed(message, delay, copy=True)
        self.emit_before("enqueue", message, delay)
        base = f"{self.namespace}:{message.queue_name}"
        self._enqueue_once(keys=[base, base + ".msgs"], args=[redis_id, message.encode()])
        self.emit_after("enqueue", message, delay)
        return message

    def placed(self, message: Message[Any], delay: int | None, *, copy: bool = False) -> tuple[Message[Any], str]:
        """``message`` as :meth:`enqueue` stores it (on its priority lane or delay queue,
        with its ``eta``), and its Redis id (for a ``copy``, derived from its source's:
        :func:`copy_id`)."""
        queue_name = message.queue_name
        if self.settings.priorities:
            queue_name = lane_queue(canonical_queue(queue_name), message_priority(self, message))
        # A message enqueued before (a retry, a release, a kick) may still have a body
        # under its id until its first delivery is acknowledged: it gets another one.
        if copy:
            redis_id = copy_id(str(message.options["redis_message_id"]), int(message.options.get("retries") or 0))
        else:
            redis_id = message.message_id if _is_new(message) else new_ids(1)[0]
        options: dict[str, Any] = {"redis_message_id": redis_id}
        if delay is not None:
            queue_name = dq_name(queue_name)
            options["eta"] = current_millis() + delay
        return message.copy(queue_name=queue_name, options=options), redis_id

    def enqueue_many(self, messages: Sequence[Message[Any]], *, delay: int | None = None) -> list[Message[Any]]:
        """Enqueue ``messages`` with one script call: all of them, or none.

        The same steps as :meth:`enqueue` for each (priority lane, Redis id, delay queue,
        the enqueue hooks) and the same keys as Dramatiq's enqueue command, in one Lua
        script per call (Dramatiq's dispatch script takes 14 arguments per message, and
        packing them was a third of the time). Used by :func:`dramaturg.bulk.send_many`.

        The script is run once, never retried by the client: a retry after a lost reply
        would enqueue the chunk twice. A failure before the request was written (no
        connection) raises :class:`~dramaturg.bulk.BulkSendError` with the messages as not
        sent; one after it (a timeout, a connection reset while reading the answer) with
        them as unknown, since Redis may have run the script.
        """
        from ..bulk import BulkSendError, EnqueueHooks, message_encoder

        hooks = EnqueueHooks(self)
        encode = message_encoder()
        eta = current_millis() + delay if delay is not None else None
        try:
            prepared, args = self._prepare_many(messages, hooks, encode, eta, delay)
        except Exception as error:  # a refusing middleware, a message that does not encode: nothing was sent
            raise BulkSendError(f"{type(error).__name__}: {error}", 0, list(messages)) from error
        try:
            self._run_once(self._enqueue_script, [self.namespace], args)
        except _NotSent as error:
            raise BulkSendError(error.reason, 0, list(messages)) from error.__cause__
        except redis.RedisError as error:
            raise BulkSendError(f"{type(error).__name__}: {error}", 0, unknown=list(messages)) from error
        hooks.emit_after(prepared, delay)
        return prepared

    def _prepare_many(
        self,
        messages: Sequence[Message[Any]],
        hooks: EnqueueHooks,
        encode: Callable[[Message[Any]], bytes],
        eta: int | None,
        delay: int | None,
    ) -> tuple[list[Message[Any]], list[Any]]:
        """The messages as :meth:`enqueue_many` enqueues them, and the script's arguments."""
        priorities = self.settings.priorities
        prepared = []
        framed: dict[str, list[bytes]] = {}
        fresh_ids = iter(new_ids(sum(1 for message in messages if not _is_new(message))))
        for message in messages:
            # A new message's Redis id is its own id, so that find_message() finds it by
            # that (its state store record is left out); a message enqueued before (a
            # retry, a release, a kick) may still have a body under its id: a fresh one.
            redis_id = message.message_id if _is_new(message) else next(fresh_ids)
            queue_name = message.queue_name
            if priorities:
                queue_name = lane_queue(canonical_queue(queue_name), message_priority(self, message))
            options = {**message.options, "redis_message_id": redis_id}
            if eta is not None:
                queue_name = dq_name(queue_name)
                options["eta"] = eta
            message = Message(
                queue_name=queue_name,
                actor_name=message.actor_name,
                args=message.args,
                kwargs=message.kwargs,
                options=options,
                message_id=message.message_id,
                message_timestamp=message.message_timestamp,
            )
            hooks.emit_before(message, delay)
            body = encode(message)
            parts = framed.get(queue_name)
            if parts is None:
                parts = framed[queue_name] = []
            rid = redis_id.encode()
            parts.append(b"%d:%s%d:%s" % (len(rid), rid, len(body), body))
            prepared.append(message)
        args: list[Any] = []
        for queue_name, parts in framed.items():
            args += (queue_name, b"".join(parts))
        return prepared, args

    def _run_once(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run ``script`` once on a connection of the client's pool, without its retries.

        Raises :class:`_NotSent` when Redis certainly did not run it (no connection could
        be made, or Redis refused the command before running it), else the client's error.
        """
        pool = self.client.connection_pool
        try:
            connection = pool.get_connection()  # connects if need be: a failure here sent nothing
        except redis.RedisError as error:
            raise _NotSent(f"{type(error).__name__}: {error}") from error
        try:
            try:
                connection.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                return self.client.parse_response(connection, "EVALSHA")
            except redis.exceptions.NoScriptError:  # not run: load it and run it
                connection.send_command("EVAL", script.script, len(keys), *keys, *args)
                return self.client.parse_response(connection, "EVAL")
        except redis.ResponseError as error:
            if str(error).split(" ", 1)[0] in _REFUSED_BEFORE_RUNNING:
                raise _NotSent(f"{type(error).__name__}: {error}") from error
            raise
        finally:
            pool.release(connection)

    # Dramatiq reaches these through __getattr__ (its dispatch script); the claims of this
    # process are noted on the way (see dramaturg.brokers.redis_claims).

    def do_fetch(self, queue_name: str, count: int) -> list[bytes]:
        """Claim up to ``count`` messages of ``queue_name``; their bodies."""
        return self.claims.fetch(queue_name, count)

    def do_ack(self, queue_name: str, redis_id: str) -> int:
        """Acknowledge a message: its body is deleted and its claim released. 1 if it was
        claimed by this worker; else nothing changed, and 0 if its body is there (another
        worker recovered it), -1 if not (see :data:`_ACK`)."""
        base = f"{self.namespace}:{queue_name}"
        claims = f"{self.namespace}:__acks__.{self.broker_id}.{queue_name}"
        result = int(self._ack(keys=[claims, base + ".msgs"], args=[redis_id]))
        self.claims.release(queue_name, (redis_id,))  # only now: until Redis did it, it is held
        return result

    def do_nack(self, queue_name: str, redis_id: str) -> int:
        """Reject a message into the dead-letter queue and release its claim; the same
        answer as :meth:`do_ack`."""
        base = f"{self.namespace}:{queue_name}"
        claims = f"{self.namespace}:__acks__.{self.broker_id}.{queue_name}"
        dead = f"{self.namespace}:{queue_name.removesuffix('.DQ')}.XQ"
        result = int(self._nack(keys=[claims, base + ".msgs", dead, dead + ".msgs"], args=[redis_id, current_millis()]))
        self.claims.release(queue_name, (redis_id,))
        return result

    @staticmethod
    def unreachable(error: BaseException) -> bool:
        """True if ``error`` says Redis could not be reached or did not answer in time: what
        was asked may or may not have been done, and the message it was for must stay
        unsettled (see :mod:`dramaturg.middleware.outcomes`)."""
        return isinstance(error, redis.ConnectionError | redis.TimeoutError | BrokerConnectionError)

    def do_requeue(self, queue_name: str, *redis_ids: str) -> Any:
        """Put claimed messages back at the tail of their queue."""
        try:
            return self._requeue(queue_name, *redis_ids)
        finally:
            # Whatever Redis answered: the caller lets go of them, and the next
            # reconciliation gives back any the script did not reach.
            self.claims.release(queue_name, redis_ids)

    #: find_message() finds a new message by its id (see dramaturg.status).
    finds_messages = True

    def find_message(self, message_id: str) -> tuple[Message[Any], bool] | None:
        """A new message (its Redis id is its own) waiting in a declared queue: the message,
        and whether it is in a delay queue. None when it is not there (any more)."""
        names = sorted(self.get_declared_queues())
        with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hget(f"{self.namespace}:{name}.msgs", message_id)
                pipe.hget(f"{self.namespace}:{dq_name(name)}.msgs", message_id)
            replies = pipe.execute()
        for n, body in enumerate(replies):
            if body is not None:
                try:
                    return Message.decode(body), n % 2 == 1
                except DecodeError:
                    return None
        return None

    def close(self) -> None:
        super().close()
        self.client.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {mask_url(self.settings.url)}>"


class _NotSent(Exception):
    """Redis certainly did not run the command (raised before it was written, or refused)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: Error replies Redis gives before it runs a command (or, for a script, before its first
#: write): the command did nothing.
_REFUSED_BEFORE_RUNNING = frozenset(
    {"NOSCRIPT", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "NOAUTH", "NOPERM", "WRONGPASS", "OOM", "MISCONF"}
)


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
    :mod:`dramaturg.brokers.redis_claims`, which explains why this never gives back a
    message a thread still holds. Once the worker may have been taken for dead (the
    claims' ``epoch`` moved on), it lets go of what it prefetched and what its thread
    delayed in the same way, before it hands out anything more.

    Acknowledging or rejecting a message whose claim another worker took away (it
    recovered this worker, taken for dead, while the message ran) changes nothing in Redis
    and logs that the message runs again. A message whose outcome could not be made
    durable because Redis could not be reached (``_dramaturg_outcome`` "unsettled") is
    neither: it is let go, its claim stays, and the next reconciliation gives it back. Any
    Redis error of an acknowledgement is raised as Dramatiq's ``ConnectionClosed``, which
    its worker retries (it retries no other, and a timeout would strand the message).
    """

    def __init__(self, broker: RedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        # Dramatiq's ConsumerThread makes its consumer in its own thread: the thread whose
        # delay queue holds this consumer's delayed messages.
        self._thread = threading.get_ident()
        self._claims = broker.claims
        #: The claims' epoch this consumer was made in (see dramaturg.brokers.redis_claims).
        self.epoch = broker.claims.epoch
        broker.claims.consumer_started(queue_name)

    def ack(self, message: Any) -> None:
        self._settle(message, self.broker.do_ack, "ended")

    def nack(self, message: Any) -> None:
        self._settle(message, self.broker.do_nack, "was rejected")

    def _settle(self, message: Any, command: Callable[[str, str], int], what: str) -> None:
        # The current queue, not message.queue_name: a delayed message is acknowledged on
        # the delay queue it came from (as in Dramatiq's consumer).
        redis_id = message.options["redis_message_id"]
        try:
            if message.__dict__.get("_dramaturg_outcome") == "unsettled":
                self._claims.let_go(self.queue_name, (redis_id,))
                return
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
            self.broker.claims.consumer_closed(self.queue_name, self._thread, cached)
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
                return MessageProxy(message)
            if unknown_actors.settle(self.broker, message, self._queue()):  # given back, or held
                self.ack(MessageProxy(message))

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
                if not bodies:
                    # Nothing came: poll less often, up to the idle timeout.
                    self.misses, backoff_ms = compute_backoff(self.misses, max_backoff=self.timeout)
                    time.sleep(backoff_ms / 1000)
                    return None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise ConnectionClosed(e) from None

    def _let_go_after_suspicion(self) -> None:
        """The worker may have been taken for dead since this consumer was made: give back
        what it prefetched and what its thread holds in its delay queue. The give-back
        script moves back only what is still this worker's; what another worker recovered
        is another worker's now (see :mod:`dramaturg.brokers.redis_claims`)."""
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


def _is_new(message: Message[Any]) -> bool:
    """Never enqueued before: no Redis id yet, never held and kicked."""
    options = message.options
    return "redis_message_id" not in options and "dramaturg_kicks" not in options and not options.get("retries")


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


def no_retry() -> Retry:
    """The retry policy of the broker's clients: none, whatever redis-py's default.

    redis-py 6 and later retry a command that failed with a connection error or a timeout
    (10 times, with backoff, on a client made with ``redis.Redis(...)``; none on one made
    with ``Redis.from_url``, nor in Dramatiq's own ``RedisBroker(url=...)``). A script that
    ran in Redis and whose reply was lost then runs again: a fetch claims a second batch
    over the first, which nobody holds; an enqueue enqueues twice. So no command is
    retried blindly, and each caller copes with the error: a consumer restarts and gives
    back what it claimed (:mod:`dramaturg.brokers.redis_claims`), Dramatiq retries an
    acknowledgement (idempotent), the recovery thread tries again at its next tick, a
    sender gets the error (the message may have been enqueued). A connection that broke
    while idle is still replaced before use: the pool checks it when it hands it out.
    """
    return Retry(NoBackoff(), 0)


def read_timeout_ms(settings: BrokerSettings) -> int:
    """How long the broker's client waits for an answer: half of ``broker.heartbeat_timeout``,
    at most :data:`MAX_READ_TIMEOUT_MS` (10 s, so 10 s with the default 60 s; 500 ms with 1 s).

    A Redis that stops answering without closing the connection (a network black hole, a
    paused server) would otherwise hold a consumer, a sender and the heartbeat thread until
    TCP gives up (many minutes). With this timeout the heartbeat thread's next tick fails
    within ``heartbeat_timeout`` / 5 + this, before another worker can take this one for
    dead (``heartbeat_timeout``), and the worker stops starting what it holds until it has
    checked its claims (see :mod:`dramaturg.brokers.redis_claims`). No command dramaturg
    or Dramatiq sends blocks in Redis; the longest are scripts over a few thousand messages,
    well under a second.
    """
    return min(settings.heartbeat_timeout // 2, MAX_READ_TIMEOUT_MS)


def socket_options(settings: BrokerSettings) -> dict[str, Any]:
    """redis-py connection options of the broker's client: the connect timeout, the read
    timeout (:func:`read_timeout_ms`), and for TCP keepalive probes after as many idle
    seconds, every third of it, three of them (a dead idle connection is dropped, not
    handed out), where the platform has them."""
    timeout_s = read_timeout_ms(settings) / 1000
    options: dict[str, Any] = {
        "socket_connect_timeout": settings.connect_timeout / 1000,
        "socket_timeout": timeout_s,
    }
    if not (settings.url or "").startswith("unix:"):
        idle = max(1, round(timeout_s))
        probes = {"TCP_KEEPIDLE": idle, "TCP_KEEPINTVL": max(1, idle // 3), "TCP_KEEPCNT": 3}
        options["socket_keepalive"] = True
        options["socket_keepalive_options"] = {
            getattr(socket, name): value for name, value in probes.items() if hasattr(socket, name)
        }
    return options


def make_client(settings: BrokerSettings) -> redis.Redis:
    """A redis-py client for ``broker.url`` with the configured connect timeout, a read
    timeout and TCP keepalive (:func:`socket_options`), which retries nothing by itself
    (:func:`no_retry`)."""
    assert settings.url is not None
    try:
        return redis.Redis.from_url(settings.url, retry=no_retry(), **socket_options(settings))
    except ValueError as error:
        raise ConfigError(
            f"broker.url: not a valid Redis URL: {error}",
            key="broker.url",  # never quote a URL that did not parse
        ) from None


def create_broker(settings: BrokerSettings, middleware: list[Middleware]) -> RedisBroker:
    return RedisBroker(settings, middleware=middleware)


def ping(settings: BrokerSettings) -> float:
    client = make_client(settings)
    try:
        return ping_client(client, f"Redis at {mask_url(settings.url)}")
    finally:
        client.close()


def ping_client(client: redis.Redis, what: str) -> float:
    """Round trip of one PING in ms, or :class:`BrokerUnreachable` naming ``what``."""
    start = time.perf_counter()
    try:
        client.ping()
    except redis.AuthenticationError:
        raise BrokerUnreachable(f"cannot reach {what}: authentication failed (check the password)") from None
    except redis.RedisError as error:
        raise BrokerUnreachable(f"cannot reach {what}: {error}") from None
    return (time.perf_counter() - start) * 1000


# -- held tasks -------------------------------------------------------------------------

# Keys, under <namespace>:__held__: (queue names cannot contain ':' or '#', so none of
# these can collide with Dramatiq's own keys or with another queue's):
#   <q>                  hash  message id -> HeldTask JSON
#   <q>#order            zset  message id, scored by held_at (listing order)
#   <q>#kicking          hash  tasks taken by a kicker that has not requeued them yet
#   <q>#kicking-order    zset  scored by when their kicker's lease runs out (ms)
#   <q>#kicking-token    hash  message id -> the token of the kicker that took it
#   #queues              set   queues that have held tasks
# Every script below takes these five keys as KEYS[1..5], in this order. A kick's lease
# is its token: a task moves to the queue, or back, only for the kicker whose token it
# still has; a lease that ran out gives the task back and drops the token.

# give_back(id, now): a taken task back in the held hash, in its listing place (its
# held_at; an entry that does not decode, which must not fail the script, goes last).
_GIVE_BACK_FUNCTIONS = """
local function held_at(task, fallback)
    local ok, decoded = pcall(cjson.decode, task)
    if ok and type(decoded) == "table" and type(decoded["held_at"]) == "number" then
        return decoded["held_at"]
    end
    return fallback
end
local function give_back(id, now)
    local task = redis.call("hget", KEYS[3], id)
    redis.call("hdel", KEYS[3], id)
    redis.call("zrem", KEYS[4], id)
    redis.call("hdel", KEYS[5], id)
    if task then
        redis.call("hset", KEYS[1], id, task)
        redis.call("zadd", KEYS[2], held_at(task, now), id)
    end
end
"""
# Gives back the tasks whose lease ran out (at or before ARGV[1], now): every script
# that takes or deletes held tasks runs this first, so none stays hidden for long. Each
# kicker sets its own lease's length; the store only compares its end with now.
_GIVE_BACK_STALE = (
    _GIVE_BACK_FUNCTIONS
    + """
for _, id in ipairs(redis.call("zrangebyscore", KEYS[4], "-inf", ARGV[1])) do
    give_back(id, ARGV[1])
end
"""
)

# ARGV: now, when the lease runs out, token, "all" or "ids", the ids...
# Returns id, stored entry, id, stored entry... of what was taken.
_TAKE = (
    _GIVE_BACK_STALE
    + """
local ids = {}
if ARGV[4] == "all" then
    ids = redis.call("zrange", KEYS[2], 0, -1)
else
    for i = 5, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local taken = {}
for _, id in ipairs(ids) do
    local task = redis.call("hget", KEYS[1], id)
    if task then
        redis.call("hdel", KEYS[1], id)
        redis.call("zrem", KEYS[2], id)
        redis.call("hset", KEYS[3], id, task)
        redis.call("zadd", KEYS[4], ARGV[2], id)
        redis.call("hset", KEYS[5], id, ARGV[3])
        taken[#taken + 1] = id
        taken[#taken + 1] = task
    end
end
return taken
"""
)

# Ends the lease on tasks still taken with token ARGV[2]: "back" gives them back,
# "forget" drops them, "renew" moves the end of their lease to ARGV[4]. Returns how many.
# ARGV: now, token, "back" | "forget" | "renew", when the lease runs out, the ids...
_SETTLE = (
    _GIVE_BACK_FUNCTIONS
    + """
local count = 0
for i = 5, #ARGV do
    local id = ARGV[i]
    if redis.call("hget", KEYS[5], id) == ARGV[2] then
        count = count + 1
        if ARGV[3] == "back" then
            give_back(id, ARGV[1])
        elseif ARGV[3] == "renew" then
            redis.call("zadd", KEYS[4], ARGV[4], id)
        else
            redis.call("hdel", KEYS[3], id)
            redis.call("zrem", KEYS[4], id)
            redis.call("hdel", KEYS[5], id)
        end
    end
end
return count
"""
)

# Moves kicked tasks to their queue as Dramatiq's enqueue does (the body in
# <ns>:<queue>.msgs, the Redis id at the tail of <ns>:<queue>) and forgets them, each
# only if it is still taken with the kicker's token: a kicker that stalled past its
# lease enqueues nothing that was given back (and maybe kicked by another) meanwhile.
# KEYS[6]: the broker's namespace. ARGV: token, then per task: message id, queue (lane or
# delay queue), Redis id, body. Returns the message ids moved.
_KICK = """
local moved = {}
for a = 2, #ARGV, 4 do
    local id = ARGV[a]
    if redis.call("hget", KEYS[5], id) == ARGV[1] then
        local queue = KEYS[6] .. ":" .. ARGV[a + 1]
        redis.call("hset", queue .. ".msgs", ARGV[a + 2], ARGV[a + 3])
        redis.call("rpush", queue, ARGV[a + 2])
        redis.call("hdel", KEYS[3], id)
        redis.call("zrem", KEYS[4], id)
        redis.call("hdel", KEYS[5], id)
        moved[#moved + 1] = id
    end
end
return moved
"""

# ARGV: now, "all" or "ids", the ids... Returns how many were deleted.
_PURGE = (
    _GIVE_BACK_STALE
    + """
if ARGV[2] == "all" then
    local count = redis.call("hlen", KEYS[1])
    redis.call("del", KEYS[1], KEYS[2])
    return count
end
local count = 0
for i = 3, #ARGV do
    count = count + redis.call("hdel", KEYS[1], ARGV[i])
    redis.call("zrem", KEYS[2], ARGV[i])
end
return count
"""
)

# Read only: one page of a queue's held tasks, those whose kicker's lease ran out after
# them (they are held again for every purpose but have not been given back yet).
# ARGV: now, offset, limit. Returns the total, then id, entry, id, entry...
_LIST = """
local held = redis.call("zcard", KEYS[2])
local stale = redis.call("zcount", KEYS[4], "-inf", ARGV[1])
local offset, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local found = {held + stale}
local function add(hash, ids)
    for _, id in ipairs(ids) do
        local task = redis.call("hget", hash, id)
        if task then
            found[#found + 1] = id
            found[#found + 1] = task
        end
    end
end
if limit > 0 and offset < held then
    add(KEYS[1], redis.call("zrange", KEYS[2], offset, offset + limit - 1))
end
local room = limit - math.floor((#found - 1) / 2)
if room > 0 and stale > 0 and offset + limit > held then
    local skip = math.max(offset - held, 0)
    add(KEYS[3], redis.call("zrangebyscore", KEYS[4], "-inf", ARGV[1], "LIMIT", skip, room))
end
return found
"""

#: How long a kicker's take lasts unless it renews it (a kick renews it as it goes): a
#: kicker that stalls longer (a paused process, a long GC) has its tasks given back, and
#: requeues none of them afterwards.
KICK_LEASE_MS = 60_000
#: The former name of :data:`KICK_LEASE_MS`.
STALE_KICK_MS = KICK_LEASE_MS


class RedisHeldStore(HeldStore):
    """Held tasks in Redis hashes beside the broker's keys (see the key layout above).

    Taking is one Lua script, so two kickers never requeue the same task; tasks taken by
    a kicker that died or stalled are given back once its lease runs out (``lease_ms``
    after the take or its last renewal; default :data:`KICK_LEASE_MS`), and the script
    that moves a task to its queue checks the kicker's token, so a stalled kicker never
    queues a task twice.
    """

    def __init__(self, broker: RedisBroker, *, lease_ms: int = KICK_LEASE_MS) -> None:
        super().__init__(broker)
        self.broker: RedisBroker = broker
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
        placed: builtins.list[Message[Any]] = []
        args: builtins.list[Any] = [lease.token]
        for message, (message_id, _) in batch:
            stored, redis_id = self.broker.placed(message, delay_ms)
            # before_enqueue runs even for a task whose lease turns out to be lost: the
            # same hooks then ran for the kicker that requeued it; nothing is counted twice.
            self.broker.emit_before("enqueue", stored, delay_ms)
            args += [message_id, stored.queue_name, redis_id, stored.encode()]
            placed.append(stored)
        moved = {m.decode() for m in self._kick(keys=[*lease.keys, self.broker.namespace], args=args)}
        lease.settled(moved)
        for stored in placed:
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


# -- recovering the messages of dead workers --------------------------------------------

# Dramatiq's keys (see dramatiq/brokers/redis/dispatch.lua):
#   __heartbeats__               zset  worker (broker) id, scored by its last heartbeat (ms);
#                                      a process that only sends writes one too
#   __acks__.<worker id>.<queue> set   ids that worker fetched and has not acknowledged
#   <queue>                      list  ids ready to run: rpush to enqueue, lpop to fetch
#   <queue>.msgs                 hash  id -> body, until acknowledged
# and dramaturg's:
#   __workers__:<queue>          zset  the worker processes consuming a (canonical) queue,
#                                      scored by their last heartbeat (ms); see dramaturg.stats
#
# Moves the ids of one claim set whose bodies still exist back to the head of the queue,
# oldest first, and deletes the set. One script, so a claim set is taken whole by one
# recoverer (this one on another worker, or Dramatiq's maintenance): no id is pushed twice.
# KEYS: heartbeats, claim set, queue list, queue bodies
# ARGV: worker id, cutoff (ms: dead while its heartbeat is at or before it), "1" to keep order
# Returns {-1} if the worker has beaten since it was found dead, else the message ids
# (Dramatiq's, for the log) of what went back, "?" for a body that does not decode.
_RECOVER_CLAIMS = """
local beat = redis.call("zscore", KEYS[1], ARGV[1])
if beat and tonumber(beat) > tonumber(ARGV[2]) then
    return {-1}
end
local found = {}
for _, id in ipairs(redis.call("smembers", KEYS[2])) do
    local body = redis.call("hget", KEYS[4], id)
    if body then
        local sent = math.huge  -- undecodable bodies go behind the others
        local message_id = "?"
        local ok, message = pcall(cjson.decode, body)
        if ok and type(message) == "table" then
            if type(message["message_timestamp"]) == "number" then
                sent = message["message_timestamp"]
            end
            if type(message["message_id"]) == "string" then
                message_id = message["message_id"]
            end
        end
        if ARGV[3] ~= "1" then
            sent = 0
        end
        found[#found + 1] = {id, sent, message_id}
    end
end
-- Newest first: each lpush goes in front of the last, so the oldest ends at the head.
table.sort(found, function(a, b) return a[2] > b[2] end)
local moved = {}
for _, entry in ipairs(found) do
    redis.call("lpush", KEYS[3], entry[1])
    moved[#moved + 1] = entry[3]
end
redis.call("del", KEYS[2])
return moved
"""

# Drops a queue's dead-lettered messages older than the cutoff (Dramatiq's maintenance did).
# KEYS: <queue>.XQ, <queue>.XQ.msgs; ARGV: cutoff (ms), at most how many
_EXPIRE_DEAD = """
local ids = redis.call("zrangebyscore", KEYS[1], 0, ARGV[1], "LIMIT", 0, ARGV[2])
if #ids > 0 then
    redis.call("zrem", KEYS[1], unpack(ids))
    redis.call("hdel", KEYS[2], unpack(ids))
end
return #ids
"""

# Forgets a dead worker, unless it has beaten since it was found dead.
# KEYS: heartbeats; ARGV: worker id, cutoff (ms)
_FORGET_WORKER = """
local beat = redis.call("zscore", KEYS[1], ARGV[1])
if beat and tonumber(beat) <= tonumber(ARGV[2]) then
    redis.call("zrem", KEYS[1], ARGV[1])
end
return 0
"""


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
        dead = [DeadWorker(_text(member), int(score)) for member, score in stale]
        return [worker for worker in dead if worker.worker_id != self.worker_id]

    def leave(self) -> None:
        """Stop counting as a worker of its queues (a clean shutdown)."""
        queues = list(self.queues())
        if queues:
            with self.client.pipeline(transaction=False) as pipe:
                for queue in queues:
                    pipe.zrem(self.workers_prefix + queue, self.worker_id)
                pipe.execute()

    def reconcile(self) -> int:
        """Give back this worker's claims that no thread of it holds (see
        :mod:`dramaturg.brokers.redis_claims`); return how many went back."""
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
                    result.messages[_text(queue)] = len(moved)
                    result.message_ids.extend(_text(message_id) for message_id in moved)
            if not result.revived:
                self._forget_worker(keys=[self.heartbeats], args=[worker.worker_id, cutoff])
            recovered.append(result)
        return recovered

    def _claim_sets(self, worker_ids: Sequence[str]) -> dict[str, list[bytes]]:
        """The claim sets of ``worker_ids``, found with SCAN (never KEYS, which blocks Redis)."""
        wanted = {f"{self.claims_prefix}{worker_id}.".encode(): worker_id for worker_id in worker_ids}
        # One worker: a pattern naming it; several: one pass over every claim set.
        only = f"{worker_ids[0]}." if len(worker_ids) == 1 else ""
        pattern = _glob_escape(f"{self.claims_prefix}{only}") + "*"
        found: dict[str, list[bytes]] = {}
        for key in self.client.scan_iter(match=pattern, count=1000):
            for prefix, worker_id in wanted.items():
                if key.startswith(prefix) and len(key) > len(prefix):
                    found.setdefault(worker_id, []).append(key)
        return found


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis MATCH pattern (namespaces may hold ``*?[]``)."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)
