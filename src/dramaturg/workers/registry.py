"""The middleware that keeps each worker's record in the worker registry.

It lives here, with the records it writes (see :mod:`dramaturg.workers` for what they
say and how they are read), and takes its place in the stack of
:mod:`dramaturg.middleware`, as ``StatusRecorder`` does from :mod:`dramaturg.status`.

**Cost.** A thread per worker process writes its record every :data:`INTERVAL_MS`
(one pipelined ``SET``/``SADD``: one round trip), never per task. Per task, a worker
thread adds its id to a set and discards it again (two operations in memory, no lock,
no I/O): that is how the record counts the tasks running now.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from importlib import resources
from typing import TYPE_CHECKING, Any

import dramatiq

from ..queues import canonical_queue
from ..state_redis import state_redis

if TYPE_CHECKING:
    import redis

__all__ = ["INTERVAL_MS", "TTL_MS", "WorkerRegistry", "index_key", "record_prefix"]

logger = logging.getLogger("dramaturg.workers")

#: How often a worker process writes its record.
INTERVAL_MS = 5_000
#: How long a record outlives its last write: a worker that stops writing (killed,
#: stuck, cut off from the store) drops off the list within this.
TTL_MS = 3 * INTERVAL_MS
#: A stopping worker waits this long for a write in progress (the thread is a daemon).
_JOIN_TIMEOUT_S = 5.0

FORGET_GONE = resources.files("dramaturg.workers").joinpath("forget_gone.lua").read_text(encoding="utf-8")

_HOST = socket.gethostname()


def record_prefix(namespace: str) -> str:
    """``<namespace>:__worker__:``, followed by a worker's id: its record (JSON, with a TTL)."""
    return f"{namespace}:__worker__:"


def index_key(namespace: str) -> str:
    """``<namespace>:__worker_ids__``: the set of the ids of the workers that wrote a record."""
    return f"{namespace}:__worker_ids__"


class WorkerRegistry(dramatiq.Middleware):
    """Writes each worker's record to the state store while it runs, removes it when it stops.

    ``url`` is ``[state] url`` (unset: the broker's own Redis); without a state store
    (RabbitMQ without ``[state] url``, the stub broker) it writes nothing, and
    :func:`dramaturg.workers` says what to set. ``interval_ms``: how often the record is
    written (its TTL is three times that).
    """

    def __init__(self, url: str | None, namespace: str = "dramaturg", interval_ms: int = INTERVAL_MS) -> None:
        self.url = url
        self.namespace = namespace
        self.interval_ms = interval_ms
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()
        self._threads: dict[int, _RecordThread] = {}
        #: The ids of the worker threads running a task now (set.add and set.discard are
        #: atomic under the GIL: no lock on the task's path).
        self.running: set[int] = set()

    @property
    def ttl_ms(self) -> int:
        return 3 * self.interval_ms

    def client(self, broker: dramatiq.Broker) -> redis.Redis:
        """The state store's client (raises :class:`~dramaturg.StateUnavailable` without one)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = state_redis(broker, self.url, needs="the worker list needs")
        return self._client

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        if getattr(broker, "runs_inline", False):
            return
        try:
            client = self.client(broker)
        except Exception as error:  # no state store: nothing to write (workers() says what to set)
            logger.debug("no worker record: %s", error)
            return
        thread = _RecordThread(self, client, worker)
        with self._lock:
            self._threads[id(worker)] = thread
        thread.start()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self.running.add(threading.get_ident())

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        self.running.discard(threading.get_ident())

    after_skip_message = after_process_message

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        # After, not before: a worker finishing its running tasks is still alive.
        with self._lock:
            thread = self._threads.pop(id(worker), None)
        if thread is not None:
            thread.stop()


class _RecordThread(threading.Thread):
    """Writes one worker's record every ``interval_ms`` until stopped, then removes it."""

    def __init__(self, registry: WorkerRegistry, client: redis.Redis, worker: Any) -> None:
        super().__init__(name="dramaturg-worker-record", daemon=True)
        self.registry = registry
        self.client = client
        self.worker = worker
        self.pid = os.getpid()
        # The pid alone may be reused (containers, restarts); the suffix makes the id unique.
        self.worker_id = f"{_HOST}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.key = record_prefix(registry.namespace) + self.worker_id
        self.index = index_key(registry.namespace)
        self.started_at = int(time.time() * 1000)
        self.stopped = threading.Event()
        self.failing = False

    def record(self) -> dict[str, Any]:
        worker = self.worker
        running = self.registry.running
        threads = list(getattr(worker, "workers", []))
        return {
            "worker_id": self.worker_id,
            "host": _HOST,
            "pid": self.pid,
            # Consumers are added while the worker runs (actors declared late); list() copies at once.
            "queues": sorted({canonical_queue(name) for name in list(getattr(worker, "consumers", {}))}),
            "threads": int(getattr(worker, "worker_threads", len(threads))),
            "running": sum(1 for thread in threads if thread.ident in running),
            "started_at": self.started_at,
            "seen_at": int(time.time() * 1000),
        }

    def write(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.key, json.dumps(self.record(), separators=(",", ":")), px=self.registry.ttl_ms)
        pipe.sadd(self.index, self.worker_id)
        pipe.execute()

    def run(self) -> None:
        while True:
            try:
                self.write()
            except Exception as error:  # the store is down: the record expires; write again when it is back
                if not self.failing:
                    logger.warning("could not write this worker's record to the state store: %s", error)
                    self.failing = True
            else:
                if self.failing:
                    logger.info("this worker's record is written again")
                    self.failing = False
            if self.stopped.wait(self.registry.interval_ms / 1000):
                return

    def stop(self) -> None:
        self.stopped.set()
        self.join(_JOIN_TIMEOUT_S)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(self.key)
            pipe.srem(self.index, self.worker_id)
            pipe.execute()
        except Exception as error:  # it expires after the TTL anyway
            logger.debug("could not remove this worker's record: %s", error)
