"""Checkpoints: a long task keeps its place across crashes, interrupts, retries and kicks
(Drupal's batch "sandbox").

::

    @dramaturg.actor(queue_name="imports", ttr="2m")
    def import_file(path: str) -> None:
        task = dramaturg.current_task()
        offset = (task.checkpoint_state or {}).get("offset", 0)   # None on a first run
        for offset, row in rows_from(path, start=offset):
            import_row(row)
            if offset % 500 == 0:
                task.checkpoint({"offset": offset + 1})            # durable before it returns
                task.progress(offset / total, f"row {offset:,}")
                task.touch()

``task.checkpoint(state)`` saves a small JSON value under the task's message id, which
stays the same for every run of the task (retries, redeliveries after a crash or a lost
connection, kicks). The next run reads it as ``task.checkpoint_state``; a first run reads
None. The value is written before ``checkpoint()`` returns (one round trip to the state
store), so a worker killed the next instant loses nothing written before.

What ends it: a run that succeeds, or is rejected into the dead-letter queue or
cancelled, leaves its task's checkpoint to expire :data:`KEPT_AFTER_END_MS` (an hour)
later: a copy of the task delivered again because the run's acknowledgement was lost (a
worker killed or cut off after the handler returned) goes on from the last checkpoint,
rather than from the start. A held task keeps it, so a kick goes on from there. Otherwise
it expires ``[tasks] checkpoint_ttl`` (default seven days) after it was last written.

Where it is kept: the state store (``[state] url``, else the broker's own Redis on the
Redis and embedded brokers; in memory in eager mode and on the stub broker). On RabbitMQ
without ``[state] url``, ``checkpoint()`` raises :class:`~dramaturg.StateUnavailable`
naming the setting: a task that asks to keep its place is never let on to think it did.

Cost: nothing measurable for a task that never checkpoints (the middleware has no hook
before the handler, and its after-hook reads one attribute); one round trip per
``checkpoint()``, one for the first ``checkpoint_state``, and one at the end of a run
that used either.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

import dramatiq

from .state_redis import state_redis
from .task import RunOutcome, run_of

if TYPE_CHECKING:
    import redis

__all__ = [
    "MAX_CHECKPOINT_BYTES",
    "CheckpointStore",
    "Checkpoints",
    "MemoryCheckpointStore",
    "RedisCheckpointStore",
    "RunCheckpoint",
]

#: The largest checkpoint, as JSON: a place to resume from, not the task's data.
MAX_CHECKPOINT_BYTES = 64 * 1024
#: How long a task's checkpoint is kept once a run of it ended for good (ms): long enough
#: for a copy delivered again after a lost acknowledgement (a broker outage, a worker
#: killed after its handler returned) to go on from it; never longer than the ttl.
KEPT_AFTER_END_MS = 3_600_000


class CheckpointStore(Protocol):
    """Where checkpoints are kept, by message id, as JSON text."""

    def save(self, message_id: str, text: str) -> None: ...
    def load(self, message_id: str) -> str | None: ...
    def forget(self, message_id: str, after_ms: int) -> None: ...


class RedisCheckpointStore:
    """Checkpoints in Redis: ``<namespace>:__checkpoint__:<message id>``, expiring ``ttl_ms``
    after the last write."""

    def __init__(self, client: redis.Redis, *, namespace: str, ttl_ms: int) -> None:
        self.client = client
        self.prefix = f"{namespace}:__checkpoint__:"
        self.ttl_ms = ttl_ms
        # PEXPIRE ... LT needs Redis 7: the same, for 6.2 as well.
        self._shorten = client.register_script(
            "local left = redis.call('PTTL', KEYS[1])"
            " if left > tonumber(ARGV[1]) then return redis.call('PEXPIRE', KEYS[1], ARGV[1]) end return 0"
        )

    def save(self, message_id: str, text: str) -> None:
        self.client.set(self.prefix + message_id, text, px=self.ttl_ms)

    def load(self, message_id: str) -> str | None:
        value = self.client.get(self.prefix + message_id)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def forget(self, message_id: str, after_ms: int) -> None:
        """Let the checkpoint expire ``after_ms`` from now, or sooner if it was due sooner."""
        self._shorten(keys=[self.prefix + message_id], args=[after_ms])


class MemoryCheckpointStore:
    """Checkpoints in this process (eager mode and the stub broker), expiring as in Redis."""

    def __init__(self, *, ttl_ms: int) -> None:
        self.ttl_ms = ttl_ms
        self._values: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def save(self, message_id: str, text: str) -> None:
        with self._lock:
            self._values[message_id] = (text, time.monotonic() + self.ttl_ms / 1000)

    def load(self, message_id: str) -> str | None:
        with self._lock:
            found = self._values.get(message_id)
            if found is None:
                return None
            if found[1] <= time.monotonic():
                del self._values[message_id]
                return None
            return found[0]

    def forget(self, message_id: str, after_ms: int) -> None:
        with self._lock:
            found = self._values.get(message_id)
            if found is not None:
                self._values[message_id] = (found[0], min(found[1], time.monotonic() + after_ms / 1000))


class RunCheckpoint:
    """One run's view of its task's checkpoint: read once, written through.

    Made on the first ``checkpoint()`` or ``checkpoint_state`` of a run (see
    :meth:`dramaturg.Task.checkpoint`); what the middleware reads at the run's end.
    """

    __slots__ = ("_loaded", "_state", "message_id", "middleware", "used")

    def __init__(self, middleware: Checkpoints, message_id: str) -> None:
        self.middleware = middleware
        self.message_id = message_id
        #: Whether this run read or wrote the checkpoint (its end then lets it expire on success).
        self.used = False
        self._loaded = False
        self._state: Any = None

    @property
    def state(self) -> Any:
        if not self._loaded:
            text = self.middleware.store().load(self.message_id)
            self._state = None if text is None else json.loads(text)
            self._loaded = True
            self.used = True
        return self._state

    def save(self, state: Any) -> None:
        try:
            text = json.dumps(state, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"checkpoint: the state must be JSON (dicts, lists, strings, numbers, booleans, None): {error}"
            ) from None
        size = len(text.encode())
        if size > MAX_CHECKPOINT_BYTES:
            raise ValueError(
                f"checkpoint: the state is {size:,} bytes as JSON, over the {MAX_CHECKPOINT_BYTES:,}-byte limit;"
                " keep a place to resume from (an offset, a last id), not the data"
            )
        self.middleware.store().save(self.message_id, text)
        # What the next read in this run sees is what a new run would: the value as stored.
        self._state = json.loads(text)
        self._loaded = True
        self.used = True


#: The outcomes after which a task never runs again: its checkpoint goes with it.
_ENDED = frozenset({RunOutcome.SUCCEEDED, RunOutcome.REJECTED, RunOutcome.CANCELLED})


class Checkpoints(dramatiq.Middleware):
    """Keeps the checkpoints of the broker's tasks (a handler reaches it through
    :meth:`dramaturg.Task.checkpoint`), and lets the checkpoint of a task that ended for
    good (succeeded, was rejected, or was cancelled) expire :data:`KEPT_AFTER_END_MS` later."""

    def __init__(self, url: str | None, ttl_ms: int, namespace: str = "dramaturg") -> None:
        self.url = url
        self.ttl_ms = ttl_ms
        self.namespace = namespace
        self._broker: dramatiq.Broker | None = None
        self._store: CheckpointStore | None = None
        self._lock = threading.Lock()

    def store(self) -> CheckpointStore:
        """The store, made on first use; raises :class:`~dramaturg.StateUnavailable` without one."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = self._make_store()
        return self._store

    def _make_store(self) -> CheckpointStore:
        broker = self._broker
        from dramatiq.brokers.stub import StubBroker

        if broker is None or isinstance(broker, StubBroker):  # eager mode's broker is a stub broker too
            return MemoryCheckpointStore(ttl_ms=self.ttl_ms)
        client = state_redis(broker, self.url, needs="checkpoints need")
        return RedisCheckpointStore(client, namespace=self.namespace, ttl_ms=self.ttl_ms)

    def for_run(self, broker: dramatiq.Broker, message_id: str) -> RunCheckpoint:
        """A run's view of the checkpoint of the task ``message_id``, on ``broker``."""
        if self._broker is None:  # eager mode and in-process workers boot no process
            self._broker = broker
        return RunCheckpoint(self, message_id)

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        self._broker = broker

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        run = run_of(message)
        checkpoint = None if run is None else run.checkpoint
        if checkpoint is None or not checkpoint.used:
            return
        outcome = run.outcome  # type: ignore[union-attr]
        ended = outcome in _ENDED or (outcome is None and exception is None)
        if ended:
            self.store().forget(checkpoint.message_id, min(KEPT_AFTER_END_MS, self.ttl_ms))

    after_skip_message = after_process_message
