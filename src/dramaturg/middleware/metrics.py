"""Prometheus metrics of a worker: its tasks by outcome, failures, TTR interrupts, touches, run times.

On with ``worker.metrics_port`` (``dramaturg worker --metrics-port 9191``); served at
``http://<worker.metrics_host>:<port>/metrics``, on 127.0.0.1 unless ``metrics_host``
says otherwise. Every series is labelled with the task's ``queue`` (canonical: a retry
waiting in ``imports.DQ`` counts for ``imports``) and ``actor``:

- ``dramaturg_tasks_total{queue, actor, outcome}``: tasks a worker settled, by outcome:
  ``succeeded``, ``retried``, ``held``, ``released`` (put back untouched: its worker
  stopped, or its queue was suspended), ``rejected`` (into the dead-letter queue),
  ``unsettled`` (its outcome could not be written while the broker was unreachable: it
  runs again), ``cancelled`` (on request: skipped when taken, or interrupted; never a
  failure) and ``skipped`` (Dramatiq's age limit);
- ``dramaturg_task_failures_total{queue, actor, exception}``: runs that ended in an
  exception (a TTR interrupt too), by the exception's class name; the outcomes a handler
  asks for (``retry()``, ``hold()``, ``success()``) are not failures;
- ``dramaturg_ttr_exceeded_total{queue, actor}``: runs interrupted by their time to run;
- ``dramaturg_touches_total{queue, actor}``: ``touch()`` calls, counted as they happen;
- ``dramaturg_task_duration_seconds{queue, actor}``: a histogram of how long runs took.

Every worker process counts in memory and, twice a second, adds its counts to
memory-mapped files (prometheus_client's multiprocess mode) in one directory per worker
group; one server, a process Dramatiq's main process forks once the workers are up,
adds the files of all of them up for each scrape. ``dramaturg worker`` makes a fresh
directory and removes it when it exits; under ``dramatiq dramaturg.worker`` it is
``$PROMETHEUS_MULTIPROC_DIR`` when set (then empty it between runs yourself), else
``<tmp>/dramaturg-metrics-<main pid>``, made private (mode 0700), which the server
removes when it stops; a directory there that someone else could have prepared (not
yours, writable by others, a link, holding links) is refused (see
:func:`metrics_directory`). A
recycled worker process keeps its pid and goes on counting in its files; counts of a
process that died stay in the sums, as Prometheus counters should.

Dramatiq's own ``Prometheus`` middleware is not used, only its shape (multiprocess
mode, one forked exposition server): it listens on 0.0.0.0 by default, reads host and
port from variables at import, shares one fixed directory between every worker on the
machine (two worker groups would add up each other's counts, and counts outlive runs),
counts ``retry()`` and ``hold()`` as errors, and knows nothing of held tasks, TTR and
touches.
"""

from __future__ import annotations

import bisect
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

import dramatiq

from .. import task as task_module
from ..queues import canonical_queue
from ..task import RunOutcome, TaskOutcome, run_of, start_run
from .ttr import StopRequested, TaskCancelled, TimeToRunExceeded

if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

__all__ = ["Metrics", "metrics_directory", "metrics_installed", "serve_metrics"]

logger = logging.getLogger("dramaturg.metrics")

#: prometheus_client's variable naming the directory its multiprocess mode writes to.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: How often each worker process hands its counts to the shared files (seconds).
FLUSH_S = 0.5
#: Histogram buckets in seconds: 1 ms to 30 minutes.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600, 1800)
INSTALL_HINT = "metrics need prometheus_client: pip install 'dramaturg[metrics]'"


def metrics_installed() -> bool:
    """True when prometheus_client can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("prometheus_client") is not None


def metrics_directory() -> str:
    """The directory the worker processes of this group count in (see the module docstring),
    set as ``PROMETHEUS_MULTIPROC_DIR`` for prometheus_client.

    Created private (mode 0700) when missing. Since its default name is predictable and
    in the shared temporary directory, one that exists is used only if no one else can
    have prepared it: a real directory (not a link), yours, writable by no one else, and
    holding no symbolic link (prometheus_client opens its files by name, following links:
    a planted one would have it write over the file it points to). Otherwise
    :class:`~dramaturg.errors.ConfigError`, and the worker does not start.
    """
    from ..errors import ConfigError

    given = os.environ.get(MULTIPROC_ENV)
    directory = given or _default_directory()
    try:
        if given:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        else:
            os.mkdir(directory, 0o700)
    except FileExistsError:
        pass  # a sibling worker process made it (or someone else did: see below)
    except OSError as error:
        raise ConfigError(f"metrics directory {directory}: cannot be made: {error.strerror or error}") from None
    problem = _unsafe(directory)
    if problem is not None:
        if given:
            raise ConfigError(
                f"metrics directory {directory} ({MULTIPROC_ENV}): {problem}; name a private directory of your own"
            )
        raise ConfigError(
            f"metrics directory {directory}: {problem}, so someone else may have prepared it; remove it, or set"
            f" {MULTIPROC_ENV} to a private directory of your own (`dramaturg worker` makes a fresh one)"
        )
    os.environ[MULTIPROC_ENV] = directory
    return directory


def _unsafe(directory: str) -> str | None:
    """Why ``directory`` may not be counted in (None when it may)."""
    from ..config import group_is_yours_alone

    try:
        status = os.lstat(directory)
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"
    if stat.S_ISLNK(status.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(status.st_mode):
        return "is not a directory"
    geteuid = getattr(os, "geteuid", None)
    if geteuid is not None and status.st_uid != geteuid():
        return f"belongs to another user (uid {status.st_uid})"
    if status.st_mode & stat.S_IWOTH or (status.st_mode & stat.S_IWGRP and not group_is_yours_alone(status.st_gid)):
        return f"can be written by group or others (mode {stat.S_IMODE(status.st_mode):o})"
    with os.scandir(directory) as entries:
        link = next((entry.name for entry in entries if entry.is_symlink()), None)
    return None if link is None else f"holds a symbolic link ({link})"


def _default_directory() -> str:
    # Worker processes and the metrics server are all children of Dramatiq's main process.
    return os.path.join(tempfile.gettempdir(), f"dramaturg-metrics-{os.getppid()}")


class _Durations:
    """Runs of one (queue, actor) since the last flush: a count per bucket, and their sum."""

    __slots__ = ("counts", "seconds")

    def __init__(self) -> None:
        self.counts = [0] * len(_BOUNDS)
        self.seconds = 0.0


_BOUNDS = (*DURATION_BUCKETS, float("inf"))


class Metrics(dramatiq.Middleware):
    """Counts each task's outcome and run time in a Dramatiq worker process.

    Add it before :class:`~dramaturg.middleware.Outcomes` (its after-hook then runs
    after Outcomes' and sees the outcome). It does nothing outside the worker processes
    of Dramatiq's CLI (``dramaturg worker``, ``dramatiq dramaturg.worker``): a process
    that only sends tasks never imports prometheus_client.

    A task adds to plain counters under one lock (about 1 us); a thread hands them to
    prometheus_client every :data:`FLUSH_S` and when the worker stops. Calling
    prometheus_client for each task cost 8.5 us a task (three writes, each taking its
    process-wide lock), twice what a middleware may cost. A worker process killed
    outright loses what it counted since the last flush.
    """

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.on = False
        self._labels: dict[tuple[str, str], tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._outcomes: dict[tuple[str, str, str], int] = {}
        self._failures: dict[tuple[str, str, str], int] = {}
        self._ttr_exceeded: dict[tuple[str, str], int] = {}
        self._touches: dict[tuple[str, str], int] = {}
        self._durations: dict[tuple[str, str], _Durations] = {}
        self._stop = threading.Event()
        self._prometheus: dict[str, Any] = {}

    @property
    def forks(self) -> list[Any]:
        return [serve_metrics]

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        from ..errors import ConfigError

        try:
            metrics_directory()  # before prometheus_client is imported: it decides its mode then
        except ConfigError as error:  # dramaturg.worker refused it already; a worker of another kind counts nothing
            logger.error("%s; this worker counts nothing", error)
            return
        try:
            import prometheus_client
            from prometheus_client import values
        except ImportError:
            logger.error("worker.metrics_port is set, but %s; this worker counts nothing", INSTALL_HINT)
            return
        if not getattr(values.ValueClass, "_multiprocess", False):
            logger.warning(
                "prometheus_client was imported before %s was set, so this process's metrics stay in its"
                " memory and are not served; do not import it in modules imported before the worker boots",
                MULTIPROC_ENV,
            )
        labels = ("queue", "actor")
        # registry=None: counted in the shared files, registered nowhere in this process.
        self._prometheus = {
            "tasks": prometheus_client.Counter(
                "dramaturg_tasks", "Tasks settled, by outcome.", [*labels, "outcome"], registry=None
            ),
            "failures": prometheus_client.Counter(
                "dramaturg_task_failures", "Runs that ended in an exception.", [*labels, "exception"], registry=None
            ),
            "ttr_exceeded": prometheus_client.Counter(
                "dramaturg_ttr_exceeded", "Runs interrupted by their time to run.", labels, registry=None
            ),
            "touches": prometheus_client.Counter("dramaturg_touches", "touch() calls.", labels, registry=None),
            "duration": prometheus_client.Histogram(
                "dramaturg_task_duration_seconds",
                "How long runs took.",
                labels,
                buckets=DURATION_BUCKETS,
                registry=None,
            ),
        }
        task_module.touch_observers.append(self._touched)
        self.on = True
        threading.Thread(target=self._flush_every, name="dramaturg-metrics", daemon=True).start()

    def labels(self, message: Any) -> tuple[str, str]:
        """``(queue, actor)`` of a message, its queue canonical (looked up once per pair)."""
        key = (message.queue_name, message.actor_name)
        labels = self._labels.get(key)
        if labels is None:
            labels = self._labels[key] = (canonical_queue(message.queue_name), message.actor_name)
        return labels

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if self.on:
            start_run(message)  # the run starts here: its hook is the first of the stack to need it

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        if not self.on:
            return
        run = run_of(message)
        seconds = time.monotonic() - run.started if run is not None else None
        labels = self.labels(message)
        if exception is None or run is None or run.outcome is None:
            outcome: str = RunOutcome.SUCCEEDED
        else:
            outcome = run.outcome
        failure = None
        if exception is not None and not isinstance(exception, TaskOutcome | StopRequested | TaskCancelled):
            failure = type(exception).__name__
        with self._lock:
            if seconds is not None:
                durations = self._durations.get(labels)
                if durations is None:
                    durations = self._durations[labels] = _Durations()
                durations.counts[bisect.bisect_left(_BOUNDS, seconds)] += 1
                durations.seconds += seconds
            if failure is not None:
                key = (*labels, failure)
                self._failures[key] = self._failures.get(key, 0) + 1
                if isinstance(exception, TimeToRunExceeded):
                    self._ttr_exceeded[labels] = self._ttr_exceeded.get(labels, 0) + 1
            key = (*labels, outcome)
            self._outcomes[key] = self._outcomes.get(key, 0) + 1

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if not self.on:
            return
        run = run_of(message)
        # No outcome: skipped by another middleware (Dramatiq's age limit).
        outcome: str = "skipped" if run is None or run.outcome is None else run.outcome
        key = (*self.labels(message), outcome)
        with self._lock:
            self._outcomes[key] = self._outcomes.get(key, 0) + 1

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        if self.on:
            self._stop.set()
            self.flush()

    def _touched(self, task: Any) -> None:
        labels = (task.queue_name, task.actor_name)
        with self._lock:
            self._touches[labels] = self._touches.get(labels, 0) + 1

    def _flush_every(self) -> None:
        while not self._stop.wait(FLUSH_S):
            try:
                self.flush()
            except Exception:  # a full disk, say: keep counting, try again
                logger.warning("could not write the metrics", exc_info=True)

    def flush(self) -> None:
        """Hand what was counted since the last flush to prometheus_client's shared files."""
        with self._lock:
            outcomes, self._outcomes = self._outcomes, {}
            failures, self._failures = self._failures, {}
            ttr_exceeded, self._ttr_exceeded = self._ttr_exceeded, {}
            touches, self._touches = self._touches, {}
            durations, self._durations = self._durations, {}
        metrics = self._prometheus
        for labels, ran in durations.items():
            histogram = metrics["duration"].labels(*labels)
            # prometheus_client has no public way to add many observations at once:
            # its own observe() adds to _sum and to the one bucket a value falls in.
            histogram._sum.inc(ran.seconds)
            for bucket, count in zip(histogram._buckets, ran.counts, strict=True):
                if count:
                    bucket.inc(count)
        for name, counts in (("failures", failures), ("ttr_exceeded", ttr_exceeded), ("touches", touches)):
            for key, count in counts.items():
                metrics[name].labels(*key).inc(count)
        # Last: once a task's outcome shows, so does everything else about its run.
        for key, count in outcomes.items():
            metrics["tasks"].labels(*key).inc(count)


# -- the exposition server ------------------------------------------------------------------


def serve_metrics() -> int:
    """The metrics server: Dramatiq's main process forks a process that runs this.

    It reads the same settings as the workers (``worker.metrics_host``/``metrics_port``)
    and serves the sums of every worker process's counts until it is stopped.
    """
    from .. import logs
    from ..config import load_settings
    from ..errors import ConfigError

    try:
        settings = load_settings()
    except ConfigError as error:
        logger.error("metrics server: configuration error: %s", error)
        return 1
    logs.apply(settings.log.format)
    host, port = settings.worker.metrics_host, settings.worker.metrics_port
    if port is None:
        return 0
    own_directory = not os.environ.get(MULTIPROC_ENV)
    try:
        directory = metrics_directory()
    except ConfigError as error:
        logger.error("metrics server: configuration error: %s", error)
        return 1
    try:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import MetricsHandler
        from prometheus_client.multiprocess import MultiProcessCollector
    except ImportError:
        logger.error("worker.metrics_port is set, but %s", INSTALL_HINT)
        return 1
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    try:
        server = _server_class(host)((host, port), MetricsHandler.factory(registry))
    except OSError as error:
        logger.error("metrics server: cannot listen on %s:%d: %s", host, port, error.strerror or error)
        return 1
    logger.info("metrics server: serving http://%s/metrics", _address(host, port))
    try:
        server.serve_forever()
    finally:  # Dramatiq stops it with SIGTERM, which raises SystemExit here
        server.server_close()
        if own_directory:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


def _server_class(host: str) -> type[ThreadingHTTPServer]:
    from http.server import ThreadingHTTPServer  # here: ~1 MB a worker without a metrics port does without

    class MetricsServer(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    return MetricsServer


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_can_listen(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (None when it can): checked before the
    worker starts, so that a taken port is one clear line instead of a worker without metrics."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return f"cannot listen on {_address(host, port)}: {error.strerror or error}"
    return None
