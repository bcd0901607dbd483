"""The state store: task records and per-minute counts in a small Redis, written in batches.

What it holds is described in :mod:`dramaturg.status`. Why it does not slow the queue:
senders and workers never write per message. Each process puts changes in a buffer (one
entry per message, later changes merged into it, so a task that starts and ends between
two flushes costs one write) that a background thread flushes every ``FLUSH_INTERVAL_S``
with one Lua script call per ``BATCH`` records. A record is one string, self-contained
(a worker writes what the sender knew too) and replaced only by newer news (by when it
happened), so a sender's late flush never overwrites a worker's later change: ~3 us of
Redis time and ~4 us of the writer's per record (a worker's records are made as text,
not through dicts and ``json``: see :func:`_apply_runs`). The price: a status can lag its task by
a flush interval, and the changes of the last interval of a process killed with SIGKILL
are lost (never the task itself: the store only describes tasks, the broker keeps them).
A flush that fails is retried with the next one; past ``MAX_PENDING`` records the oldest
changes are dropped with a warning.

The same flushes add the per-minute counts ``dramaturg stats`` shows (:data:`COUNTERS`),
in buckets of 5 s kept ten minutes, and the same counts per calendar minute, kept
``HISTORY_TTL_MS`` (65 minutes), for the dashboard's chart of the last hour
(:meth:`StateStore.minute_history`). The history costs no round trip of its own: its
``HINCRBY`` and ``PEXPIRE`` go in the flush's pipeline, two commands per queue, minute and
counter that changed in a flush (at most ten flushes a second per process, whatever
the rate of tasks), ~61 small hashes per queue in Redis.

Keys: ``<broker.namespace>:__state__:<message id>`` for records,
``<broker.namespace>:__counts__:<queue>:<bucket>`` for counts,
``<broker.namespace>:__minutes__:<queue>:<minute>`` for the history (minute: since the epoch). The Lua scripts are the
``.lua`` files beside this module, read once when it is imported.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import dramatiq

from ..queues import canonical_queue
from ..state_redis import no_store_reason, state_redis
from ..task import RunOutcome

if TYPE_CHECKING:
    import redis

__all__ = ["COUNTERS", "StateStore", "no_store_reason", "queued_fields", "store_for"]

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
#: The history's counts are kept per minute (since the epoch) for this long: an hour, and
#: a margin for clocks a little apart.
HISTORY_TTL_MS = 65 * 60 * 1000
#: Minutes of history :meth:`StateStore.minute_history` reads, the current one included.
HISTORY_MINUTES = 60
#: The per-minute counts, per queue: attempts that ended (any way), ended with an error,
#: were followed by a retry, or got the task held. ``dramaturg stats`` shows them as the
#: ``<name>/min`` columns (:class:`~dramaturg.QueueStats`' ``<name>_per_min``).
COUNTERS: tuple[str, ...] = ("processed", "failed", "retried", "held")

_SCRIPTS = resources.files("dramaturg.status")
# A record is one string: "<when, 17 characters>|<JSON>" (see write.lua).
_WRITE = _SCRIPTS.joinpath("write.lua").read_text(encoding="utf-8")
_WRITE_NEW = _SCRIPTS.joinpath("write_new.lua").read_text(encoding="utf-8")
_encode_json = json.JSONEncoder(separators=(",", ":"), default=str).encode


class StateStore:
    """The buffered writer and the reader of task records and counts (one per broker).

    Get a broker's with :func:`dramaturg.status.state_store`.
    """

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
        #: A deque, appended to without a lock (atomic) and emptied from the other end.
        self._runs: deque[tuple[Any, ...]] = deque()
        self._counts: Counter[tuple[str, int, str]] = Counter()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._failing_since: float | None = None
        self._write_script = client.register_script(_WRITE)
        self._write_new_script = client.register_script(_WRITE_NEW)
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

    def write_now(self, records: Mapping[str, tuple[float, Mapping[str, Any]]]) -> None:
        """Write whole records now, bypassing the buffer: ``message id -> (at, fields)``.

        For a writer that must know they are written before it goes on (a queue purge
        records what it drops before it is gone for good): the store's error is raised,
        and nothing is kept to be written later (the caller undoes what it did instead).
        """
        if records:
            pending = {message_id: [at, dict(fields)] for message_id, (at, fields) in records.items()}
            self._write(pending, Counter(), [], {})

    def task_event(self, event: tuple[Any, ...]) -> None:
        """A task started or ended (see :class:`~dramaturg.status.recorder.StatusRecorder`); its record is made at the
        next flush, in the writer thread, not in the worker thread."""
        self._runs.append(event)
        if self._thread is None:  # (a forked child's store has none: see _forget_writers)
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

    def count(self, queue: str, *names: str, at: float | None = None) -> None:
        """Add one to each count ``names`` (in :data:`COUNTERS`) of ``queue``, now (or ``at``, s since the epoch)."""
        bucket = int((time.time() if at is None else at) // BUCKET_S)
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
            runs = _take_all(self._runs)
            made: dict[str, tuple[float, str]] = {}
            if runs:
                _apply_runs(runs, pending, counts, made)
            if not pending and not counts and not new and not made:
                return
            try:
                self._write(pending, counts, new, made)
            except Exception as error:
                with self._lock:
                    self._new[:0] = new
                for message_id, (at, record) in made.items():  # kept as fields, as any change
                    pending[message_id] = [at, json.loads(record[18:])]
                self._put_back(pending, counts, error)
            else:
                if self._failing_since is not None:
                    logger.warning("the state store is reachable again; buffered task states are written")
                    self._failing_since = None

    def _write(
        self,
        pending: dict[str, list[Any]],
        counts: Counter[tuple[str, int, str]],
        new: list[tuple[str, list[str]]],
        made: dict[str, tuple[float, str]],
    ) -> None:
        records = [(message_id, f"{at:017.6f}|{_encode_json(fields)}") for message_id, (at, fields) in pending.items()]
        records.extend((message_id, record) for message_id, (_, record) in made.items())
        script, write_new = self._write_script, self._write_new_script
        prefix = self.key("")
        with self.client.pipeline(transaction=False) as pipe:
            if new:  # first, so that a task's later news in the same flush wins
                for record, ids in new:
                    framed = "".join(f"{len(message_id)}:{message_id}" for message_id in ids)
                    write_new(keys=[prefix], args=[self.ttl_ms, record, framed], client=pipe)
            for start in range(0, len(records), BATCH):
                batch = records[start : start + BATCH]
                keys = [prefix + message_id for message_id, _ in batch]
                script(keys=keys, args=[self.ttl_ms, *(record for _, record in batch)], client=pipe)
            minutes: Counter[tuple[str, int, str]] = Counter()
            for (queue, bucket, name), n in counts.items():
                key = f"{self.namespace}:__counts__:{queue}:{bucket}"
                pipe.hincrby(key, name, n)
                pipe.pexpire(key, COUNTS_TTL_MS)
                minutes[(queue, bucket * BUCKET_S // 60, name)] += n
            for (queue, minute, name), n in minutes.items():
                key = self._minute_key(queue, minute)
                pipe.hincrby(key, name, n)
                pipe.pexpire(key, HISTORY_TTL_MS)
            pipe.execute()

    def _minute_key(self, queue: str, minute: int) -> str:
        return f"{self.namespace}:__minutes__:{queue}:{minute}"

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

    def minute_history(
        self, queues: Sequence[str], minutes: int = HISTORY_MINUTES
    ) -> dict[str, list[tuple[int, dict[str, int]]]]:
        """Per queue, the last ``minutes`` calendar minutes, oldest first, the current one
        (still counting) last: ``(minute's start, s since the epoch, {counter: n})`` with
        each of :data:`COUNTERS`, 0 where nothing happened. One pipelined read of
        ``minutes`` small hashes per queue. ``minutes`` is at most :data:`HISTORY_MINUTES`
        (older ones have expired).
        """
        minutes = max(1, min(minutes, HISTORY_MINUTES))
        newest = int(time.time() // 60)
        span = range(newest - minutes + 1, newest + 1)
        with self.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                for minute in span:
                    pipe.hgetall(self._minute_key(queue, minute))
            replies = iter(pipe.execute())
        return {
            queue: [
                (minute * 60, {name: int(counts.get(name.encode(), 0)) for name in COUNTERS})
                for minute, counts in zip(span, replies, strict=False)
            ]
            for queue in queues
        }


_stores: weakref.WeakSet[StateStore] = weakref.WeakSet()


def _take_all(events: deque[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Empty ``events`` from its left while threads may append on its right."""
    taken = []
    while True:
        try:
            taken.append(events.popleft())
        except IndexError:
            return taken


def _forget_writers() -> None:
    """In a forked child: no store has a writer thread (the parent's did not come along)."""
    for store in list(_stores):
        store._thread = None


os.register_at_fork(after_in_child=_forget_writers)


@atexit.register
def _flush_all() -> None:
    for store in list(_stores):
        store.flush()  # a store that does not answer logs a warning: a lost status is all it costs


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
    waiting = options.get("dramaturg_waiting")  # put back by a limit (dramaturg.flow.control)
    if waiting:
        fields["state"], fields["reason"] = "waiting", f"waiting for {waiting}"
    return fields


#: JSON of the fields a worker's records repeat, by (queue as sent, actor, worker): made
#: once each, as ``"queue":...,"actor":...,"worker":...``, and the queue's canonical name.
_shared: dict[tuple[str, str, str], tuple[str, str]] = {}
_SHARED_MAX = 4096


def _shared_json(queue_name: str, actor: str, worker: str) -> tuple[str, str]:
    key = (queue_name, actor, worker)
    found = _shared.get(key)
    if found is None:
        if len(_shared) >= _SHARED_MAX:
            _shared.clear()
        queue = canonical_queue(queue_name)
        found = _shared[key] = (
            f'"queue":{json.dumps(queue)},"actor":{json.dumps(actor)},"worker":{json.dumps(worker)}',
            queue,
        )
    return found


#: What a task's status says of a run that ended so, where it is not "succeeded" (nor held).
_ENDED_AS = {RunOutcome.REJECTED: "failed", RunOutcome.CANCELLED: "cancelled"}


def _apply_runs(
    runs: list[tuple[Any, ...]],
    pending: dict[str, list[Any]],
    counts: Counter[Any],
    made: dict[str, tuple[float, str]],
) -> None:
    """Turn the worker threads' start and end events into records and counts.

    A task with a change in ``pending`` already (a sender's, such as a retry's enqueue)
    has its record merged there as fields. The others, nearly all of them, get their
    record made here as text, into ``made``: the same JSON ``_encode_json`` would make of
    :func:`_running_fields` and the end's fields, written straight from the parts a
    worker repeats (:func:`_shared_json`), ~1 us against ~6 us through dicts and ``json``.
    """
    ended = {event[1] for event in runs if event[0] == "end"}
    for event in runs:
        if event[0] == "start":
            _, message_id, at, inner, worker = event
            if message_id in ended:
                continue  # its end, later in this batch, says everything
            started, bucket = at, 0
            outcome = error = reason = attempt = None
        else:
            _, message_id, at, inner, worker, started, outcome, error, reason, attempt = event
            bucket = int(at // BUCKET_S)
        shared, queue = _shared_json(inner.queue_name, inner.actor_name, worker)
        if outcome is not None:
            counts[(queue, bucket, "processed")] += 1
            if error:
                counts[(queue, bucket, "failed")] += 1
            if outcome == RunOutcome.RETRIED:
                counts[(queue, bucket, "retried")] += 1
                continue  # the retry's enqueue said "retrying", with the next run's time and this error
            if outcome == RunOutcome.HELD:
                counts[(queue, bucket, "held")] += 1
        if message_id in pending:
            _merge_run(pending, message_id, at, inner, worker, started, outcome, error, reason, attempt)
            continue
        options = inner.options
        if attempt is None:
            attempt = options.get("retries", 0) + 1
        started_ms = int(started * 1000)
        text = f'{shared},"attempt":{attempt},"enqueued_at":{inner.message_timestamp},"started_at":{started_ms}'
        last_error = error or options.get("dramaturg_last_error")
        if last_error:
            text += f',"last_error":{json.dumps(last_error)}'
        if outcome is None:
            state = "running"
        else:
            text += f',"finished_at":{int(at * 1000)},"duration_ms":{int((at - started) * 1000)}'
            if outcome == RunOutcome.HELD:
                state = "held"
                text += f',"reason":{json.dumps(reason or "")}'
            else:
                state = _ENDED_AS.get(outcome, "succeeded")
        older = made.get(message_id)
        if older is None or at >= older[0]:
            made[message_id] = (at, f'{at:017.6f}|{{"state":"{state}",{text}}}')


def _merge_run(
    pending: dict[str, list[Any]],
    message_id: str,
    at: float,
    inner: Any,
    worker: str,
    started: float,
    outcome: RunOutcome | None,
    error: str | None,
    reason: str | None,
    attempt: int | None,
) -> None:
    """A run's record as fields, merged into the change already buffered for its task."""
    fields = _running_fields(inner, started, worker)
    if attempt is not None:
        fields["attempt"] = attempt
    if outcome is not None:
        fields["finished_at"] = int(at * 1000)
        fields["duration_ms"] = int((at - started) * 1000)
        if error:
            fields["last_error"] = error
        if outcome == RunOutcome.HELD:
            fields["state"] = "held"
            fields["reason"] = reason or ""
        else:
            fields["state"] = _ENDED_AS.get(outcome, "succeeded")
    entry = pending[message_id]
    if at >= entry[0]:
        pending[message_id] = [at, {**entry[1], **fields}]


def queued_fields(message: Any, delay: int | None) -> dict[str, Any]:
    """A record of ``message`` just sent (``delay``: ms it waits, if any): queued, delayed or retrying."""
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
    waiting = options.get("dramaturg_waiting")  # put back by a limit (dramaturg.flow.control)
    if waiting:
        fields["state"], fields["reason"] = "waiting", f"waiting for {waiting}"
    return fields


def store_for(broker: dramatiq.Broker, url: str | None, ttl_ms: int, namespace: str) -> StateStore:
    """A new store for ``broker``: at ``url`` (``[state] url``), else in the broker's own Redis.

    Raises :class:`~dramaturg.errors.StateUnavailable` when the broker has no Redis of its own.
    """
    return StateStore(state_redis(broker, url, needs="task status needs"), namespace=namespace, ttl_ms=ttl_ms)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
