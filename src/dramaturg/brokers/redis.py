"""Redis through redis-py: Dramatiq's Redis broker, keys under ``broker.namespace``."""

from __future__ import annotations

import builtins
import functools
import json
import operator
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from dramatiq import Message, Middleware
from dramatiq.brokers.redis import RedisBroker as _DramatiqRedisBroker
from dramatiq.brokers.redis import _RedisConsumer
from dramatiq.common import current_millis, dq_name
from dramatiq.errors import DecodeError

from .. import suspension
from ..bulk import new_ids
from ..config import BrokerSettings
from ..errors import BrokerUnreachable, ConfigError
from ..held import HeldStore, HeldTask
from ..masking import mask_url
from ..middleware.outcomes import hold_poison, unknown_actor_reason
from ..middleware.priority import message_priority
from ..queues import canonical_queue, lane_queue, lanes

if TYPE_CHECKING:
    from ..bulk import EnqueueHooks
    from .redis_stats import RedisStatsReader

__all__ = [
    "DeadWorker",
    "RecoveredWorker",
    "RedisBroker",
    "RedisConsumer",
    "RedisHeldStore",
    "RedisRecoverer",
    "create_broker",
    "ping",
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


class RedisBroker(_DramatiqRedisBroker):
    """Dramatiq's Redis broker, built from :class:`BrokerSettings`.

    ``client`` is the redis-py client every dramaturg component shares; the embedded
    broker passes one connected to its own server's socket.
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
        except that a new message's Redis id is its own id (see :meth:`find_message`)."""
        queue_name = message.queue_name
        if self.settings.priorities:
            queue_name = lane_queue(canonical_queue(queue_name), message_priority(self, message))
        # A message enqueued before (a retry, a release, a kick) may still have a body
        # under its id until its first delivery is acknowledged: it gets a fresh one.
        redis_id = message.message_id if _is_new(message) else new_ids(1)[0]
        options: dict[str, Any] = {"redis_message_id": redis_id}
        if delay is not None:
            queue_name = dq_name(queue_name)
            options["eta"] = current_millis() + delay
        message = message.copy(queue_name=queue_name, options=options)
        self.emit_before("enqueue", message, delay)
        self.do_enqueue(queue_name, redis_id, message.encode())
        self.emit_after("enqueue", message, delay)
        return message

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

    #: find_message() finds a new message by its id (see dramaturg.state).
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

    Dramatiq's own consumer lets a body it cannot decode escape as an exception: the
    consumer restarts, and the messages it had prefetched stay claimed by a worker that
    is still alive, so nothing moves them back until it restarts. Here an undecodable
    body, or a message for an actor this worker does not know, is held with its reason
    and acknowledged, and the consumer goes on with the next message.

    While its queue is suspended (:mod:`dramaturg.suspension`) it fetches nothing and
    pushes what it had prefetched back onto the queue.
    """

    def __next__(self) -> Any:
        while True:
            wait = suspension.remaining_s(self._queue())
            if wait > 0 and not self.queue_name.endswith(".DQ"):  # delay queues only move messages on
                self._give_back_prefetched()
                time.sleep(min(wait, self.timeout / 1000))  # idle, as Dramatiq's consumer is between fetches
                return None
            try:
                message = super().__next__()  # type: ignore[no-untyped-call]
            except DecodeError as error:
                self._hold_undecodable(error)
                continue
            if message is None:
                return None
            if "redis_message_id" not in message.options:
                # Put here by another client; Dramatiq needs this id to acknowledge it.
                redis_id = self._claimed_id(functools.partial(_has_id, message.message_id))
                if redis_id is None:
                    continue
                message.options["redis_message_id"] = redis_id
            if message.actor_name in self.broker.actors:
                return message
            reason = unknown_actor_reason(message.actor_name, self.broker)
            if hold_poison(self.broker, HeldTask.from_message(message._message, reason, queue_name=self._queue())):
                self.ack(message)  # type: ignore[no-untyped-call]

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

    def _hold_undecodable(self, error: DecodeError) -> None:
        redis_id = self._claimed_id(lambda body: body == error.data)
        if redis_id is None:
            return
        reason = f"undecodable message: {error.error!r}"
        task = HeldTask.from_raw(error.data, reason, queue_name=self._queue(), message_id=redis_id)
        if hold_poison(self.broker, task):
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


def make_client(settings: BrokerSettings) -> redis.Redis:
    """A redis-py client for ``broker.url`` with the configured connect timeout."""
    assert settings.url is not None
    try:
        return redis.Redis.from_url(settings.url, socket_connect_timeout=settings.connect_timeout / 1000)
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
#   <q>#kicking-order    zset  scored by when they were taken (stale ones go back)
#   #queues              set   queues that have held tasks
_TAKE = """
local now = ARGV[1]
local ids = {}
if ARGV[2] == "*" then
    ids = redis.call("zrange", KEYS[2], 0, -1)
else
    for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local taken = {}
for _, id in ipairs(ids) do
    local task = redis.call("hget", KEYS[1], id)
    if task then
        redis.call("hdel", KEYS[1], id)
        redis.call("zrem", KEYS[2], id)
        redis.call("hset", KEYS[3], id, task)
        redis.call("zadd", KEYS[4], now, id)
        taken[#taken + 1] = task
    end
end
return taken
"""

_GIVE_BACK = """
local ids = {}
if ARGV[1] == "stale" then
    ids = redis.call("zrangebyscore", KEYS[4], 0, ARGV[2])
else
    for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
end
for _, id in ipairs(ids) do
    local task = redis.call("hget", KEYS[3], id)
    redis.call("hdel", KEYS[3], id)
    redis.call("zrem", KEYS[4], id)
    if task then
        redis.call("hset", KEYS[1], id, task)
        redis.call("zadd", KEYS[2], cjson.decode(task)["held_at"], id)
    end
end
return #ids
"""

_PURGE = """
if ARGV[1] == "*" then
    local count = redis.call("hlen", KEYS[1])
    redis.call("del", KEYS[1], KEYS[2])
    return count
end
local count = 0
for i = 1, #ARGV do
    count = count + redis.call("hdel", KEYS[1], ARGV[i])
    redis.call("zrem", KEYS[2], ARGV[i])
end
return count
"""

#: A kicker that took tasks this long ago and did not finish is presumed dead.
STALE_KICK_MS = 60_000


class RedisHeldStore(HeldStore):
    """Held tasks in Redis hashes beside the broker's keys (see the key layout above).

    Taking is one Lua script, so two kickers never requeue the same task; tasks taken by
    a kicker that died are given back after :data:`STALE_KICK_MS`.
    """

    def __init__(self, broker: RedisBroker) -> None:
        super().__init__(broker)
        self.client = broker.client
        self.prefix = f"{broker.namespace}:__held__"
        self._take = self.client.register_script(_TAKE)
        self._give_back = self.client.register_script(_GIVE_BACK)
        self._purge = self.client.register_script(_PURGE)

    def _keys(self, queue: str) -> list[str]:
        base = f"{self.prefix}:{queue}"
        return [base, f"{base}#order", f"{base}#kicking", f"{base}#kicking-order"]

    def hold(self, task: HeldTask) -> None:
        held, order, _, _ = self._keys(task.queue_name)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(held, task.message_id, task.to_json())
            pipe.zadd(order, {task.message_id: task.held_at})
            pipe.sadd(f"{self.prefix}:#queues", task.queue_name)
            pipe.execute()

    def list(self, queue: str | None = None, *, offset: int = 0, limit: int = 50) -> list[HeldTask]:
        found: list[HeldTask] = []
        for name in [queue] if queue else self.queues():
            self._recover(name)
            held, order, _, _ = self._keys(name)
            total = self.client.zcard(order)
            if offset >= total:
                offset -= total
                continue
            ids: builtins.list[bytes] = self.client.zrange(order, offset, offset + limit - len(found) - 1)  # type: ignore[assignment]
            offset = 0
            if ids:
                found += [HeldTask.from_json(data) for data in self.client.hmget(held, ids) if data]
            if len(found) >= limit:
                break
        return found

    def count(self, queue: str | None = None) -> int:
        return sum(int(self.client.hlen(self._keys(name)[0])) for name in ([queue] if queue else self.queues()))

    def get(self, message_id: str, queue: str | None = None) -> HeldTask | None:
        for name in [queue] if queue else self.queues():
            data = self.client.hget(self._keys(name)[0], message_id)
            if data:
                return HeldTask.from_json(data)
        return None

    @contextmanager
    def taking(self, queue: str, message_ids: Sequence[str] | None) -> Iterator[Iterator[tuple[HeldTask, Any]]]:
        self._recover(queue)
        keys = self._keys(queue)
        now = int(time.time() * 1000)
        taken = [HeldTask.from_json(data) for data in self._take(keys=keys, args=[now, *(message_ids or ["*"])])]
        try:
            yield ((task, task.message_id) for task in taken)
        finally:
            leftover = [task.message_id for task in taken]
            if leftover:
                self._give_back(keys=keys, args=["ids", *leftover])

    def forget(self, queue: str, receipt: Any) -> None:
        _, _, kicking, kicking_order = self._keys(queue)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(kicking, receipt)
            pipe.zrem(kicking_order, receipt)
            pipe.execute()

    def purge(self, queue: str, message_ids: Sequence[str] | None = None) -> int:
        return int(self._purge(keys=self._keys(queue)[:2], args=list(message_ids) if message_ids else ["*"]))

    def queues(self) -> builtins.list[str]:
        members: set[bytes] = self.client.smembers(f"{self.prefix}:#queues")  # type: ignore[assignment]
        stored = {name.decode() for name in members}
        declared = {canonical_queue(name) for name in self.broker.get_declared_queues()}
        return sorted(stored | declared)

    def _recover(self, queue: str) -> None:
        cutoff = int(time.time() * 1000) - STALE_KICK_MS
        self._give_back(keys=self._keys(queue), args=["stale", cutoff])


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

    def beat(self, now_ms: int) -> list[DeadWorker]:
        """Write this broker's heartbeat, for itself and for each of its queues (dropping
        the dead workers' entries there), drop those queues' dead letters older than
        Dramatiq's ``dead_message_ttl`` (a week); return the other workers that are dead
        at ``now_ms``."""
        cutoff = now_ms - self.heartbeat_timeout_ms
        with self.client.pipeline(transaction=False) as pipe:
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
            stale = pipe.execute()[1]
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
