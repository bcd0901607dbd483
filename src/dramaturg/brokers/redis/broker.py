"""The Redis broker: :class:`RedisBroker`, Dramatiq's, with keys under ``broker.namespace``.

It enqueues a new message under its own id, a copy of one enqueued before once
(:func:`~.placement.copy_id`), many at once in one script call, each on the lane of its
priority (:mod:`.placement`);
and it fetches, acknowledges and rejects through the claims of its worker
(:mod:`dramaturg.brokers.redis.claims`), the acknowledgements and rejections of its
threads sent together (:mod:`dramaturg.brokers.redis.settling`). Its scripts:
``enqueue.lua`` (one message, as Dramatiq's dispatch script but without a heartbeat for
the sender), ``enqueue_many.lua``, ``enqueue_once.lua``, and ``enqueue_joined.lua`` (a new
batch member joined and enqueued in one step).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis
from dramatiq import Message, Middleware
from dramatiq.brokers.redis import RedisBroker as _DramatiqRedisBroker
from dramatiq.common import current_millis, dq_name
from dramatiq.errors import BrokerConnectionError, ConnectionClosed, DecodeError

from ...batches.state import _SCRIPT as _BATCH
from ...batches.tracker import BATCH_JOIN
from ...bulk import new_ids
from ...errors import BatchSendError
from ...masking import mask_url
from ...queues import canonical_queue, lanes
from ..hooks import HookDispatch
from .claims import RedisClaims
from .connection import make_client, script
from .consumer import PUT_BACK, RedisConsumer
from .held import RedisHeldStore
from .placement import is_new, lane_of, placed
from .settling import Settler
from .stats import RedisStatsReader

if TYPE_CHECKING:
    from ...bulk import EnqueueHooks
    from ...config import BrokerSettings
    from .admin import RedisQueueAdmin

__all__ = ["RedisBroker", "create_broker"]

_ENQUEUE = script("enqueue")
_ENQUEUE_MANY = script("enqueue_many")
_ENQUEUE_ONCE = script("enqueue_once")
#: enqueue_joined.lua, with batch.lua as the function ``batch`` before it (as settle.lua's).
_ENQUEUE_JOINED = "local function batch(KEYS, ARGV)\n" + _BATCH + "\nend\n" + script("enqueue_joined")


class RedisBroker(HookDispatch, _DramatiqRedisBroker):
    """Dramatiq's Redis broker, built from :class:`BrokerSettings`.

    ``client`` is the redis-py client every dramaturg component shares; the embedded
    broker passes one connected to its own server's socket. Neither retries a command by
    itself (see :func:`~dramaturg.brokers.redis.connection.no_retry`).

    ``claims`` knows which of the messages this process claimed it still holds, and gives
    back the others (:mod:`dramaturg.brokers.redis.claims`): fetching, acknowledging,
    rejecting and requeueing go through it.

    A copy of a message enqueued before (a retry, a release, a delayed message now due) is
    enqueued under a Redis id derived from its source (:func:`~.placement.copy_id`) and only if that id
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
        self.held = RedisHeldStore(self, settings)
        self._enqueue_one = self.client.register_script(_ENQUEUE)
        self._enqueue_script = self.client.register_script(_ENQUEUE_MANY)
        self._enqueue_once = self.client.register_script(_ENQUEUE_ONCE)
        self._enqueue_joined = self.client.register_script(_ENQUEUE_JOINED)
        self.settler = Settler(self.client, self.namespace, self.broker_id)
        self.claims = RedisClaims(self)
        self._requeue = self._dispatch("requeue")  # type: ignore[no-untyped-call]

    @functools.cached_property
    def stats(self) -> RedisStatsReader:
        """Queue statistics (see :mod:`dramaturg.stats`)."""
        return RedisStatsReader(self, self.settings)

    @functools.cached_property
    def queue_admin(self) -> RedisQueueAdmin:
        """Queue administration (see :mod:`dramaturg.queue_admin`)."""
        from .admin import RedisQueueAdmin

        return RedisQueueAdmin(self)

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
        that a delayed message now due is moved as a copy (:meth:`enqueue_copy`).

        A new member of a batch kept in this Redis joins it in the script call that enqueues
        it (the batch tracker leaves the join on the message, :data:`BATCH_JOIN`, instead of
        a call of its own): both or neither. A batch that is gone raises
        :class:`~dramaturg.BatchSendError`, and nothing is enqueued."""
        if "redis_message_id" in message.options:
            consumer = getattr(threading.current_thread(), "consumer", None)
            if isinstance(consumer, RedisConsumer) and consumer.queue_name.endswith(".DQ"):
                # Dramatiq's consumer thread moves a delayed message that is due to its queue.
                if consumer.epoch != self.claims.epoch:
                    raise ConnectionClosed(
                        f"this worker may have been taken for dead: delayed message {message.message_id} is not"
                        " moved; the consumer gives back what it holds (what is still this worker's) and restarts"
                    )
                if delay is None:
                    return self._move_with_ack(consumer, message)
                return self.enqueue_copy(message, delay=delay)
        message, redis_id = placed(self, message, delay, priorities=self.settings.priorities)
        message.__dict__[BATCH_JOIN] = None  # here, a batch member's join may be left for the enqueue
        self.emit_before("enqueue", message, delay)
        join = message.__dict__.pop(BATCH_JOIN, None)
        if join is None:
            self.do_enqueue(message.queue_name, redis_id, message.encode())
        else:
            try:
                self._enqueue_with_join(message, redis_id, join)
            except BatchSendError:
                # Certainly not sent: what the before-hooks claimed for it goes back (a unique
                # key: Actor.send does this too, a send through the broker alone did not).
                for middleware in self.middleware:
                    forget = getattr(middleware, "forget_unsent", None)
                    if forget is not None:
                        forget(self)
                raise
        self.emit_after("enqueue", message, delay)
        return message

    def do_enqueue(self, queue_name: str, redis_id: str, body: bytes) -> None:
        """Enqueue one message as Dramatiq's dispatch script does, but without writing a
        heartbeat for this process (enqueue.lua): a process that only sends is no worker,
        and a heartbeat that stops when it falls quiet would have the workers take it for
        dead and look for its claims (:mod:`dramaturg.middleware.recovery`)."""
        base = f"{self.namespace}:{queue_name}"
        self._enqueue_one(keys=[base, base + ".msgs"], args=[redis_id, body])

    def _enqueue_with_join(self, message: Message[Any], redis_id: str, join: tuple[str, str]) -> None:
        """Enqueue a new batch member and add it to its batch (``join``: the batch keys'
        prefix, the batch id) in one script call (enqueue_joined.lua). Any other error is
        the enqueue's own, as :meth:`do_enqueue`'s: the message may or may not be sent."""
        prefix, batch_id = join
        base = f"{self.namespace}:{message.queue_name}"
        args: list[Any] = [redis_id, message.encode(), prefix, batch_id, message.message_id]
        if self._enqueue_joined(keys=[base, base + ".msgs"], args=args) == -1:
            raise BatchSendError(f"batch {batch_id!r} is gone (expired); the message was not sent")

    def enqueue_copy(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        """Enqueue a copy of a message enqueued before (a retry, a release, a delayed message
        now due), once: under a Redis id derived from its source's and the failed attempts
        it counts (:func:`~.placement.copy_id`), and only if that id is not there yet. Running the same
        write again (after a timeout or a lost reply, when it may well have run) queues
        nothing more. Used by :class:`~dramaturg.middleware.outcomes.Outcomes`."""
        if "redis_message_id" not in message.options:
            return self.enqueue(message, delay=delay)
        message, redis_id = placed(self, message, delay, priorities=self.settings.priorities, copy=True)
        self.emit_before("enqueue", message, delay)
        base = f"{self.namespace}:{message.queue_name}"
        self._enqueue_once(keys=[base, base + ".msgs"], args=[redis_id, message.encode()])
        self.emit_after("enqueue", message, delay)
        return message

    def _move_with_ack(self, consumer: RedisConsumer, message: Message[Any]) -> Message[Any]:
        """A delayed message now due, moved to its queue by the acknowledgement of its
        delivery from the delay queue, in the same step (see settle.lua), instead of a copy
        enqueued and then that acknowledgement: Dramatiq's consumer thread acknowledges it
        right after this returns (its ``handle_delayed_messages``), and a worker killed in
        between leaves it claimed on the delay queue, to be recovered as it was."""
        copy, redis_id = placed(self, message, None, priorities=self.settings.priorities, copy=True)
        self.emit_before("enqueue", copy, None)
        consumer.moving = (message.message_id, (message, None, copy, redis_id, copy.encode()))
        return copy

    def put_back_with_ack(self, message: Any, copy: Message[Any], *, delay: int | None = None) -> bool:
        """Have the acknowledgement of ``message`` (a delivery of this worker) enqueue
        ``copy`` in the same step: a task put back to wait for a limit (:mod:`dramaturg.flow`).

        Cheaper than :meth:`enqueue_copy` then the acknowledgement (one call, shared with the
        other threads' acknowledgements, instead of two), and never two copies: the copy is
        written only if the message was still this worker's to settle (see settle.lua). A
        worker killed before the acknowledgement leaves the message claimed, to be recovered
        as it was. False when the message did not come from this broker's consumer: then
        enqueue the copy yourself."""
        if "redis_message_id" not in getattr(message, "options", {}) or "redis_message_id" not in copy.options:
            return False
        placed_copy, redis_id = placed(self, copy, delay, priorities=self.settings.priorities, copy=True)
        self.emit_before("enqueue", placed_copy, delay)
        message.__dict__[PUT_BACK] = (copy, delay, placed_copy, redis_id, placed_copy.encode())
        return True

    def do_put_back(self, queue_name: str, redis_id: str, put_back: tuple[Any, ...]) -> int:
        """Acknowledge a message and enqueue the copy :meth:`put_back_with_ack` made of it, in
        one step (the answer as :meth:`do_ack`'s)."""
        _, delay, copy, copy_id, body = put_back
        result = self.settler.put_back(queue_name, redis_id, copy.queue_name, copy_id, body)
        self.claims.release(queue_name, (redis_id,))
        if result == 2:  # an earlier try, whose reply was lost, settled it: its copy waits
            result = 1
        if result == 1:
            self.emit_after("enqueue", copy, delay)
        return result

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
        from ...bulk import BulkSendError, EnqueueHooks, message_encoder

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
        fresh_ids = iter(new_ids(sum(1 for message in messages if not is_new(message))))
        for message in messages:
            # A new message's Redis id is its own id, so that find_message() finds it by
            # that (its state store record is left out); a message enqueued before (a
            # retry, a release, a kick) may still have a body under its id: a fresh one.
            redis_id = message.message_id if is_new(message) else next(fresh_ids)
            queue_name = lane_of(self, message, priorities=priorities)
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
    # process are noted on the way (see dramaturg.brokers.redis.claims).

    def do_fetch(self, queue_name: str, count: int) -> list[bytes]:
        """Claim up to ``count`` messages of ``queue_name``; their bodies."""
        return self.claims.fetch(queue_name, count)

    def do_ack(self, queue_name: str, redis_id: str, end: tuple[Any, ...] | None = None) -> int | list[str]:
        """Acknowledge a message: its body is deleted and its claim released. 1 if it was
        claimed by this worker; else nothing changed, and 0 if its body is there (another
        worker recovered it), -1 if not (see settle.lua). Sent with those of the other
        threads (:mod:`dramaturg.brokers.redis.settling`). With ``end`` (a batch member's),
        the end is written in the same call; if it fires callbacks the message stays claimed
        and their events are the answer (see :meth:`Settler.settle`)."""
        result = self.settler.settle("a", queue_name, redis_id, end)
        if isinstance(result, list):
            return result  # still claimed: the callbacks are published first
        self.claims.release(queue_name, (redis_id,))  # only now: until Redis did it, it is held
        return result

    def do_nack(self, queue_name: str, redis_id: str, end: tuple[Any, ...] | None = None) -> int | list[str]:
        """Reject a message into the dead-letter queue and release its claim; the same
        answer as :meth:`do_ack`."""
        result = self.settler.settle("n", queue_name, redis_id, end)
        if isinstance(result, list):
            return result
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
        self.settler.close()
        self.claims.close()
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


def create_broker(settings: BrokerSettings, middleware: list[Middleware]) -> RedisBroker:
    return RedisBroker(settings, middleware=middleware)
