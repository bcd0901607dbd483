"""Task status by message id, and per-minute counts, kept in a small Redis store.

``send()`` returns a message whose ``message_id`` names the task for its whole life
(retries and kicks keep it). :func:`task_status` tells what became of it: queued,
delayed (until when), running (on which worker, since when), succeeded (when, how
long), retrying (attempt n, next run at), held (reason), failed, or unknown, with the
last error. ``dramaturg status ID`` prints the same.

Where it is kept: ``[state] url`` when set, else the broker's own Redis on the Redis and
embedded brokers; keys ``<broker.namespace>:__state__:<id>`` either way. On RabbitMQ
without ``[state] url`` there is no store and every task is "unknown" except held ones,
which the held store always knows. Each record expires ``[state] ttl`` (default one day)
after its last change, so the store never grows without bound; held tasks are not
subject to it.

Why it does not slow the queue: senders and workers never write per message. Each
process puts changes in a buffer (one entry per message, later changes merged into it,
so a task that starts and ends between two flushes costs one write) that a background
thread flushes every ``FLUSH_INTERVAL_S`` with one Lua script call per ``BATCH``
records. A record is one string, self-contained (a worker writes what the sender knew
too) and replaced only by newer news (by when it happened), so a sender's late flush
never overwrites a worker's later change: ~4 us of Redis time and ~6 us of the
writer's per record. The price: a status can lag its task by a flush interval, and
the changes of the last interval of a process killed with SIGKILL are lost (never the
task itself: the store only describes tasks, the broker keeps them). A flush that
fails is retried with the next one; past ``MAX_PENDING`` records the oldest changes
are dropped with a warning.

The same flushes add the per-minute counts ``dramaturg stats`` shows (processed,
failed, retried, held), in buckets of 5 s kept ten minutes.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import dramatiq

from .errors import DramaturgError
from .queues import canonical_queue

if TYPE_CHECKING:
    import redis

__all__ = ["COUNTERS", "StateStore", "StateUnavailable", "TaskStatus", "state_store", "task_status"]

logger = logging.getLogger("dramaturg.state")

#: How often each process writes its buffered changes.
FLUSH_INTERVAL_S = 0.1
#: Records per script call.
BATCH = 500
#: Buffered records past which the oldest are dropped (the store is unreachable).
MAX_PENDING = 200_000
#: Counts are kept per bucket of this many seconds, for ``COUNTS_TTL_MS``.
BUCKET_S = 5
COUNTS_TTL_MS = 10 * 60 * 1000
#: The per-minute counts: attempts that ended (any way), ended with an error,
#: were followed by a retry, or got the task held.
COUNTERS = ("processed", "failed", "retried", "held")

# A record is one string: "<when, 17 characters>|<JSON>", each self-contained (a worker
# writes what the sender wrote too), so it is replaced whole, and only by newer news.
# KEYS: record keys. ARGV: ttl ms, then one record per key.
_WRITE = """
local ttl = ARGV[1]
for k = 1, #KEYS do
  local record = ARGV[k + 1]
  local current = redis.call('GET', KEYS[k])
  if (not current) or string.sub(current, 1, 17) <= string.sub(record, 1, 17) then
    redis.call('SET', KEYS[k], record, 'PX', ttl)
  end
end
return #KEYS
"""
# The first news of many tasks at once (a bulk send): the same record for each, written
# only where there is none yet (anything there is newer).
# KEYS: the record keys' prefix. ARGV: ttl ms, the record, the message ids as one
# argument of netstrings ("<length>:<id>"; one argument each costs more to pack).
_WRITE_NEW = """
local ttl, record, ids = ARGV[1], ARGV[2], ARGV[3]
local pos, count = 1, 0
while pos <= #ids do
  local colon = string.find(ids, ":", pos, true)
  pos = colon + tonumber(string.sub(ids, pos, colon - 1)) + 1
  redis.call('SET', KEYS[1] .. string.sub(ids, colon + 1, pos - 1), record, 'NX', 'PX', ttl)
  count = count + 1
end
return count
"""
_encode_json = json.JSONEncoder(separators=(",", ":"), default=str).encode


class StateUnavailable(DramaturgError):
    """There is no state store: the broker is RabbitMQ (or stub) and ``[state] url`` is unset."""


@dataclass(frozen=True)
class TaskStatus:
    """What is known of one task. Times are ms since the epoch."""

    message_id: str
    #: queued, delayed, running, succeeded, retrying, held, failed or unknown.
    state: str
    queue: str | None = None
    actor: str | None = None
    #: The attempt running, done, or next (1-based).
    attempt: int | None = None
    enqueued_at: int | None = None
    #: delayed: until when; retrying: when the next attempt is due.
    eta: int | None = None
    #: ``host:pid`` and thread of the worker running (or that ran) it.
    worker: str | None = None
    started_at: int | None = None
    finished_at: int | None = None
    duration_ms: int | None = None
    #: held: why.
    reason: str | None = None
    #: The last error: ``Type: message``, and where it was raised when known.
    last_error: str | None = None
    #: When this was last true (the newest change the store saw).
    updated_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class StateStore:
    """The buffered writer and the reader of task records and counts (one per broker)."""

    def __init__(
        self, client: redis.Redis, *, namespace: str, ttl_ms: int, flush_interval_s: float = FLUSH_INTERVAL_S
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_ms = ttl_ms
        self.flush_interval_s = flush_interval_s
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending: dict[str, list[Any]] = {}
        self._new: list[tuple[str, list[str]]] = []
        #: Tasks started and ended, as the worker threads saw them: made records at the flush.
        self._runs: list[tuple[Any, ...]] = []
        self._counts: Counter[tuple[str, int, str]] = Counter()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._failing_since: float | None = None
        _stores.add(self)

    # -- writing ----------------------------------------------------------------------

    def key(self, message_id: str) -> str:
        return f"{self.namespace}:__state__:{message_id}"

    def record(self, message_id: str, fields: Mapping[str, Any], at: float | None = None) -> None:
        """Buffer a change of one task's record (``at``: when it happened, s since the epoch)."""
        at = time.time() if at is None else at
        with self._lock:
            entry = self._pending.get(message_id)
            if entry is None:
                self._pending[message_id] = [at, dict(fields)]
            else:
                entry[0] = max(entry[0], at)
                entry[1].update(fields)
            full = len(self._pending) == BATCH  # once, as it fills
        if self._thread is None or self._pid != os.getpid():
            self._ensure_thread()
        if full:
            self._wake.set()

    def task_event(self, event: tuple[Any, ...]) -> None:
        """A task started or ended (see :class:`TaskState`); its record is made at the
        next flush, in the writer thread, not in the worker thread."""
        with self._lock:
            self._runs.append(event)
        if self._thread is None or self._pid != os.getpid():
            self._ensure_thread()

    def record_new(self, message_ids: Sequence[str], fields: Mapping[str, Any]) -> None:
        """The first record of many new tasks that share it (a bulk send's chunk).

        Cheaper than :meth:`record` for each (encoded once, one argument per task) and
        written only where a task has no record yet.
        """
        record = f"{time.time():017.6f}|{_encode_json(fields)}"
        with self._lock:
            self._new.append((record, list(message_ids)))
        self._ensure_thread()

    def count(self, queue: str, *names: str) -> None:
        """Add one to each count ``names`` (in :data:`COUNTERS`) of ``queue``, now."""
        bucket = int(time.time() // BUCKET_S)
        with self._lock:
            for name in names:
                self._counts[(queue, bucket, name)] += 1
        self._ensure_thread()

    def flush(self) -> None:
        """Write every buffered change now (the writer thread does this on its own)."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
                counts, self._counts = self._counts, Counter()
                new, self._new = self._new, []
                runs, self._runs = self._runs, []
            if runs:
                _apply_runs(runs, pending, counts)
            if not pending and not counts and not new:
                return
            try:
                self._write(pending, counts, new)
            except Exception as error:
                with self._lock:
                    self._new[:0] = new
                self._put_back(pending, counts, error)
            else:
                if self._failing_since is not None:
                    logger.warning("the state store is reachable again; buffered task states are written")
                    self._failing_since = None

    def _write(
        self, pending: dict[str, list[Any]], counts: Counter[tuple[str, int, str]], new: list[tuple[str, list[str]]]
    ) -> None:
        items = list(pending.items())
        script = self.client.register_script(_WRITE)
        with self.client.pipeline(transaction=False) as pipe:
            if new:  # first, so that a task's later news in the same flush wins
                write_new = self.client.register_script(_WRITE_NEW)
                for record, ids in new:
                    framed = "".join(f"{len(message_id)}:{message_id}" for message_id in ids)
                    write_new(keys=[self.key("")], args=[self.ttl_ms, record, framed], client=pipe)
            for start in range(0, len(items), BATCH):
                batch = items[start : start + BATCH]
                keys = [self.key(message_id) for message_id, _ in batch]
                records = [f"{at:017.6f}|{_encode_json(fields)}" for _, (at, fields) in batch]
                script(keys=keys, args=[self.ttl_ms, *records], client=pipe)
            for (queue, bucket, name), n in counts.items():
                key = f"{self.namespace}:__counts__:{queue}:{bucket}"
                pipe.hincrby(key, name, n)
                pipe.pexpire(key, COUNTS_TTL_MS)
            pipe.execute()

    def _put_back(self, pending: dict[str, list[Any]], counts: Counter[tuple[str, int, str]], error: Exception) -> None:
        with self._lock:
            for message_id, entry in self._pending.items():  # newer news wins
                older = pending.pop(message_id, None)
                if older is not None:
                    entry[1] = {**older[1], **entry[1]}
            pending.update(self._pending)
            self._pending = pending
            self._counts.update(counts)
            dropped = len(self._pending) - MAX_PENDING
            if dropped > 0:
                for message_id in list(self._pending)[:dropped]:
                    del self._pending[message_id]
        now = time.monotonic()
        if self._failing_since is None or dropped > 0:
            logger.warning(
                "could not write task states to the state store (%s: %s); they are kept and written when it answers%s",
                type(error).__name__,
                error,
                f"; {dropped} of the oldest were dropped" if dropped > 0 else "",
            )
        if self._failing_since is None:
            self._failing_since = now

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._lock:
            if self._closed or (self._thread is not None and self._pid == os.getpid()):
                return
            self._pid = os.getpid()  # after a fork the parent's thread is not ours
            self._thread = threading.Thread(target=self._run, name="dramaturg-state", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        """Write what is buffered and stop the writer thread."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and self._pid == os.getpid():
            thread.join(timeout=5)
        self.flush()

    # -- reading ----------------------------------------------------------------------

    def get(self, message_id: str) -> dict[str, Any] | None:
        """The task's newest record (its fields, and ``at``: when, s since the epoch)."""
        raw = self.client.get(self.key(message_id))
        if raw is None:
            return None
        at, _, data = _text(raw).partition("|")
        return {**json.loads(data), "at": float(at)}

    def minute_counts(self, queues: Sequence[str]) -> dict[str, dict[str, int]]:
        """Per queue, each of :data:`COUNTERS` over the last 60 s.

        Exact for the last 55 s; the bucket that straddles the window's start is counted
        for the part of it inside the window.
        """
        now = time.time()
        newest = int(now // BUCKET_S)
        window = 60 // BUCKET_S  # full buckets, the current one included
        part_of_oldest = 1 - (now % BUCKET_S) / BUCKET_S
        with self.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                for bucket in range(newest - window, newest + 1):
                    pipe.hgetall(f"{self.namespace}:__counts__:{queue}:{bucket}")
            replies = iter(pipe.execute())
        result: dict[str, dict[str, float]] = {}
        for queue in queues:
            totals = dict.fromkeys(COUNTERS, 0.0)
            for n in range(window + 1):
                counts = next(replies)
                weight = part_of_oldest if n == 0 else 1.0
                for name in COUNTERS:
                    totals[name] += int(counts.get(name.encode(), 0)) * weight
            result[queue] = totals
        return {queue: {name: round(value) for name, value in totals.items()} for queue, totals in result.items()}


_stores: weakref.WeakSet[StateStore] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    for store in list(_stores):
        store.flush()  # a store that does not answer logs a warning: a lost status is all it costs


# -- the middleware -----------------------------------------------------------------------

_HOST = socket.gethostname()


class TaskState(dramatiq.Middleware):
    """Records each task's changes in the :class:`StateStore` and counts outcomes.

    Placed before :class:`~dramaturg.middleware.Outcomes` in the stack, so that its
    after-hook runs once the outcome is decided.
    """

    def __init__(self, url: str | None, ttl_ms: int, namespace: str = "dramaturg") -> None:
        self.url = url
        self.ttl_ms = ttl_ms
        self.namespace = namespace
        self._store: StateStore | None = None
        self._store_lock = threading.Lock()

    def store(self, broker: dramatiq.Broker) -> StateStore:
        store = self._store
        if store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = _make_store(broker, self.url, self.ttl_ms, self.namespace)
                store = self._store
        return store

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        if message.options.get("redis_message_id") == message.message_id:
            return  # a new message on Redis: task_status() finds it in the broker by its id
        self.store(broker).record(message.message_id, _enqueued(message, delay))

    def after_enqueue_many(self, broker: dramatiq.Broker, messages: Sequence[Any], delay: int | None) -> None:
        """The after-hook of a bulk send (:mod:`dramaturg.bulk`): new tasks that share
        their first record (actor, queue, time sent), written as one."""
        messages = [m for m in messages if m.options.get("redis_message_id") != m.message_id]
        if not messages:
            return  # new messages on Redis: task_status() finds them in the broker by their ids
        store = self.store(broker)
        groups: dict[tuple[Any, ...], tuple[dict[str, Any], list[str]]] = {}
        for message in messages:
            fields = _enqueued(message, delay)
            key = tuple(fields.values())
            group = groups.get(key)
            if group is None:
                groups[key] = (fields, [message.message_id])
            else:
                group[1].append(message.message_id)
        for fields, ids in groups.values():
            store.record_new(ids, fields)

    # The worker threads only note what happened (a tuple, under one lock); the records are
    # made by the writer thread at the flush (see _apply_runs), where a task that started
    # and ended in the same interval costs one record.

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        now = time.time()
        message._dramaturg_state_started = now  # (metrics has _dramaturg_started)
        inner = getattr(message, "_message", message)  # under Dramatiq's proxy: no __getattr__
        self.store(broker).task_event(("start", inner.message_id, now, inner, _worker_label()))

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        state = message.__dict__
        outcome = state.get("_dramaturg_outcome", "done")
        if outcome == "released" or outcome == "unsettled":
            return  # put back untouched (its copy's enqueue said "queued"), or it runs again
        now = time.time()
        inner = getattr(message, "_message", message)
        self.store(broker).task_event(
            (
                "end",
                inner.message_id,
                now,
                inner,
                _worker_label(),
                state.get("_dramaturg_state_started", now),
                outcome,
                state.get("_dramaturg_error"),
                state.get("_dramaturg_reason"),
                # Outcomes counted the failure in the message's ``retries`` (for Dramatiq's callbacks).
                state.get("_dramaturg_attempt"),
            )
        )

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        if self._store is not None:
            self._store.flush()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def _running_fields(inner: Any, started: float, worker: str) -> dict[str, Any]:
    """A running task's record: everything the sender's said too (a record is replaced whole)."""
    options = inner.options
    fields = {
        "state": "running",
        "queue": canonical_queue(inner.queue_name),
        "actor": inner.actor_name,
        "attempt": options.get("retries", 0) + 1,
        "enqueued_at": inner.message_timestamp,
        "worker": worker,
        "started_at": int(started * 1000),
    }
    last_error = options.get("dramaturg_last_error")
    if last_error:
        fields["last_error"] = last_error
    return fields


def _apply_runs(runs: list[tuple[Any, ...]], pending: dict[str, list[Any]], counts: Counter[Any]) -> None:
    """Turn the worker threads' start and end events into records (in ``pending``) and counts."""
    ended = {event[1] for event in runs if event[0] == "end"}
    for event in runs:
        if event[0] == "start":
            _, message_id, at, inner, worker = event
            if message_id in ended:
                continue  # its end, later in this batch, says everything
            fields = _running_fields(inner, at, worker)
        else:
            _, message_id, at, inner, worker, started, outcome, error, reason, attempt = event
            fields = _running_fields(inner, started, worker)
            if attempt is not None:
                fields["attempt"] = attempt
            bucket = int(at // BUCKET_S)
            queue = fields["queue"]
            counts[(queue, bucket, "processed")] += 1
            if error:
                counts[(queue, bucket, "failed")] += 1
            if outcome == "retried":
                counts[(queue, bucket, "retried")] += 1
                continue  # the retry's enqueue said "retrying", with the next run's time and this error
            fields["finished_at"] = int(at * 1000)
            fields["duration_ms"] = int((at - started) * 1000)
            if error:
                fields["last_error"] = error
            if outcome == "held":
                counts[(queue, bucket, "held")] += 1
                fields["state"] = "held"
                fields["reason"] = reason or ""
            else:
                fields["state"] = "failed" if outcome == "rejected" else "succeeded"
        entry = pending.get(message_id)
        if entry is None:
            pending[message_id] = [at, fields]
        elif at >= entry[0]:
            pending[message_id] = [at, {**entry[1], **fields}]


_labels = threading.local()


def _worker_label() -> str:
    """``host:pid thread``, computed once per thread."""
    label: str | None = getattr(_labels, "label", None)
    if label is None:
        label = _labels.label = f"{_HOST}:{os.getpid()} {threading.current_thread().name}"
    return label


def _forget_labels() -> None:
    global _labels
    _labels = threading.local()


os.register_at_fork(after_in_child=_forget_labels)  # a forked thread keeps its thread-locals


def _enqueued(message: Any, delay: int | None) -> dict[str, Any]:
    options = message.options
    attempt = int(options.get("retries", 0)) + 1
    fields: dict[str, Any] = {
        "state": "queued",
        "queue": canonical_queue(message.queue_name),
        "actor": message.actor_name,
        "attempt": attempt,
        "enqueued_at": message.message_timestamp,
    }
    if delay:
        fields["state"] = "retrying" if attempt > 1 else "delayed"
        fields["eta"] = options.get("eta") or int(time.time() * 1000) + delay
    last_error = options.get("dramaturg_last_error")
    if last_error:
        fields["last_error"] = last_error
    return fields


def _make_store(broker: dramatiq.Broker, url: str | None, ttl_ms: int, namespace: str) -> StateStore:
    if url:
        import redis

        return StateStore(redis.Redis.from_url(url), namespace=namespace, ttl_ms=ttl_ms)
    client = getattr(broker, "client", None)
    if client is None:
        raise StateUnavailable(_no_store_reason(broker))
    return StateStore(client, namespace=namespace, ttl_ms=ttl_ms)


def _no_store_reason(broker: dramatiq.Broker) -> str:
    kind = getattr(getattr(broker, "settings", None), "type", None) or type(broker).__name__
    return (
        f"task status needs a state store, and the {kind} broker has none of its own:"
        ' set [state] url = "redis://..." (or DRAMATURG_STATE_URL)'
    )


# -- reading ------------------------------------------------------------------------------


def state_store(broker: dramatiq.Broker | None = None) -> StateStore:
    """The state store of ``broker`` (default: the app's). Raises :class:`StateUnavailable`."""
    if broker is None:
        from .app import get_broker

        broker = get_broker()
    for middleware in broker.middleware:
        if isinstance(middleware, TaskState):
            return middleware.store(broker)
    raise StateUnavailable(_no_store_reason(broker))


def task_status(message_id: str, broker: dramatiq.Broker | None = None) -> TaskStatus:
    """What is known of the task ``message_id`` (see the module docstring).

    The held store answers for held tasks whatever the state store says (and whether
    or not there is one); raises :class:`StateUnavailable` only when neither knows.
    """
    if broker is None:
        from .app import get_broker

        broker = get_broker()
    record: dict[str, Any] | None = None
    unavailable: StateUnavailable | None = None
    try:
        record = state_store(broker).get(message_id)
    except StateUnavailable as error:
        unavailable = error  # the held store may still know it
    queue = record.get("queue") if record else None
    held = broker.held.get(message_id, queue)  # type: ignore[attr-defined]
    if held is not None:
        last_error = None
        if held.exception_type and held.exception_type != "Hold":  # hold(reason): the reason says it
            last_error = f"{held.exception_type}: {held.exception_message}"
        if last_error and held.origin:
            last_error += f" (at {held.origin})"
        return TaskStatus(
            message_id=message_id,
            state="held",
            queue=held.queue_name,
            actor=held.actor_name or None,
            attempt=held.attempts,
            enqueued_at=held.enqueued_at,
            worker=f"{held.host}:{held.pid}",
            finished_at=held.held_at,
            reason=held.reason,
            last_error=last_error,
            updated_at=held.held_at,
        )
    if unavailable is not None and not getattr(broker, "runs_inline", False):
        raise unavailable
    if record is None and getattr(broker, "finds_messages", False):
        found = broker.find_message(message_id)  # type: ignore[attr-defined]
        if found is not None:
            message, delayed = found
            record = _enqueued(message, delay=1 if delayed else None)
            record["at"] = message.message_timestamp / 1000
    if record is None:
        return TaskStatus(message_id=message_id, state="unknown")
    return from_record(message_id, record)


def from_record(message_id: str, record: Mapping[str, Any]) -> TaskStatus:
    """A :class:`TaskStatus` from a stored record."""
    state = record.get("state", "unknown")
    reason = record.get("reason") or None
    if state == "held":
        # Not in the held store (checked first): it was purged since.
        state, reason = "unknown", f"was held ({reason}), then purged"
    eta = _int(record.get("eta"))
    if state == "delayed" and eta is not None and eta <= time.time() * 1000:
        state = "queued"  # due: it waits on its queue now
    keep_times = state in {"running", "succeeded", "failed", "unknown"}
    return TaskStatus(
        message_id=message_id,
        state=state,
        queue=record.get("queue"),
        actor=record.get("actor"),
        attempt=_int(record.get("attempt")),
        enqueued_at=_int(record.get("enqueued_at")),
        eta=eta if state in {"delayed", "retrying"} else None,
        worker=record.get("worker") if keep_times else None,
        started_at=_int(record.get("started_at")) if keep_times else None,
        finished_at=_int(record.get("finished_at")) if state in {"succeeded", "failed", "unknown"} else None,
        duration_ms=_int(record.get("duration_ms")) if state in {"succeeded", "failed", "unknown"} else None,
        reason=reason,
        last_error=record.get("last_error") or None,
        updated_at=int(record["at"] * 1000) if "at" in record else None,
    )


def close_stores(middleware: Iterable[dramatiq.Middleware]) -> None:
    """Flush and stop the writers of a broker's stores (when the broker is closed)."""
    for item in middleware:
        if isinstance(item, TaskState):
            item.close()


def _int(value: Any) -> int | None:
    return None if value is None or value == "" else int(value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
