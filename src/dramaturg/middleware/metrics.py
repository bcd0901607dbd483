"""Prometheus metrics of a worker: its tasks by outcome, failures, TTR interrupts, touches, run times.

On with ``worker.metrics_port`` (``dramaturg worker --metrics-port 9191``); served at
``http://<worker.metrics_host>:<port>/metrics``, on 127.0.0.1 unless ``metrics_host``
says otherwise. Every series is labelled with the task's ``queue`` (canonical: a retry
waiting in ``imports.DQ`` counts for ``imports``) and ``actor``:

- ``dramaturg_tasks_total{queue, actor, outcome}``: tasks a worker settled, by outcome:
  ``succeeded``, ``retried``, ``held``, ``released`` (put back untouched: its worker
  stopped, or its queue was suspended), ``rejected`` (into the dead-letter queue), and
  ``skipped`` (Dramatiq's age limit);
- ``dramaturg_task_failures_total{queue, actor, exception}``: runs that ended in an
  exception (a TTR interrupt too), by the exception's class name; the outcomes a handler
  asks for (``retry()``, ``hold()``, ``success()``) are not failures;
- ``dramaturg_ttr_exceeded_total{queue, actor}``: runs interrupted by their time to run;
- ``dramaturg_touches_total{queue, actor}``: ``touch()`` calls, counted as they happen;
- ``dramaturg_task_duration_seconds{queue, actor}``: a histogram of how long runs took.

Every worker process counts in memory-mapped files (prometheus_client's multiprocess
mode: no I/O call per task, a few microseconds) in one directory per worker group, and
one server, a process Dramatiq's main process forks once the workers are up, adds the
files of all of them up for each scrape. ``dramaturg worker`` makes a fresh directory
and removes it when it exits; under ``dramatiq dramaturg.worker`` it is
``$PROMETHEUS_MULTIPROC_DIR`` when set (then empty it between runs yourself), else
``<tmp>/dramaturg-metrics-<main pid>``. A recycled worker process keeps its pid and
goes on counting in its files; counts of a process that died stay in the sums, as
Prometheus counters should.

Dramatiq's own ``Prometheus`` middleware is not used, only its shape (multiprocess
mode, one forked exposition server): it listens on 0.0.0.0 by default, reads host and
port from variables at import, shares one fixed directory between every worker on the
machine (two worker groups would add up each other's counts, and counts outlive runs),
counts ``retry()`` and ``hold()`` as errors, and knows nothing of held tasks, TTR and
touches.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from http.server import ThreadingHTTPServer
from typing import Any

import dramatiq

from .. import task as task_module
from ..queues import canonical_queue
from ..task import TaskOutcome
from .outcomes import outcome_of
from .ttr import StopRequested, TimeToRunExceeded

__all__ = ["Metrics", "metrics_directory", "metrics_installed", "serve_metrics"]

logger = logging.getLogger("dramaturg.metrics")

#: prometheus_client's variable naming the directory its multiprocess mode writes to.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Histogram buckets in seconds: 5 ms to 30 minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600, 1800)
_OUTCOMES = {"done": "succeeded"}  # outcome_of's names, where the metric says it differently
INSTALL_HINT = "metrics need prometheus_client: pip install 'dramaturg[metrics]'"


def metrics_installed() -> bool:
    """True when prometheus_client can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("prometheus_client") is not None


def metrics_directory() -> str:
    """The directory the worker processes of this group count in (see the module docstring);
    created if missing, and set as ``PROMETHEUS_MULTIPROC_DIR`` for prometheus_client."""
    directory = os.environ.get(MULTIPROC_ENV) or _default_directory()
    os.makedirs(directory, exist_ok=True)
    os.environ[MULTIPROC_ENV] = directory
    return directory


def _default_directory() -> str:
    # Worker processes and the metrics server are all children of Dramatiq's main process.
    return os.path.join(tempfile.gettempdir(), f"dramaturg-metrics-{os.getppid()}")


class _Series:
    """The labelled children of one (queue, actor), looked up once."""

    __slots__ = ("actor", "duration", "metrics", "outcomes", "queue")

    def __init__(self, metrics: Any, queue: str, actor: str) -> None:
        self.metrics = metrics
        self.queue = queue
        self.actor = actor
        self.outcomes: dict[str, Any] = {}
        self.duration = metrics.duration.labels(queue, actor)

    def outcome(self, name: str) -> Any:
        child = self.outcomes.get(name)
        if child is None:
            child = self.outcomes[name] = self.metrics.tasks.labels(self.queue, self.actor, name)
        return child


class Metrics(dramatiq.Middleware):
    """Counts each task's outcome and run time in a Dramatiq worker process.

    Add it before :class:`~dramaturg.middleware.Outcomes` (its after-hook then runs
    after Outcomes' and sees the outcome). It does nothing outside the worker processes
    of Dramatiq's CLI (``dramaturg worker``, ``dramatiq dramaturg.worker``): a process
    that only sends tasks never imports prometheus_client.
    """

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.tasks: Any = None  # the metrics, once the process has booted
        self.failures: Any = None
        self.ttr_exceeded: Any = None
        self.touches: Any = None
        self.duration: Any = None
        self._series: dict[tuple[str, str], _Series] = {}

    @property
    def forks(self) -> list[Any]:
        return [serve_metrics]

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        metrics_directory()  # before prometheus_client is imported: it decides its mode then
        try:
            import prometheus_client
            from prometheus_client import values
        except ImportError:
            logger.error("worker.metrics_port is set, but %s; this worker counts nothing", INSTALL_HINT)
            return
        if not getattr(values.ValueClass, "_multiprocess", False):
            logger.warning(
                "prometheus_client was imported before %s was set, so this process's metrics stay in its"
                " memory and are not served; do not import it at the top of dramaturg's config or modules"
                " imported before the worker boots",
                MULTIPROC_ENV,
            )
        labels = ("queue", "actor")
        # registry=None: counted in the shared files, registered nowhere in this process.
        self.tasks = prometheus_client.Counter(
            "dramaturg_tasks", "Tasks settled, by outcome.", [*labels, "outcome"], registry=None
        )
        self.failures = prometheus_client.Counter(
            "dramaturg_task_failures", "Runs that ended in an exception.", [*labels, "exception"], registry=None
        )
        self.ttr_exceeded = prometheus_client.Counter(
            "dramaturg_ttr_exceeded", "Runs interrupted by their time to run.", labels, registry=None
        )
        self.touches = prometheus_client.Counter("dramaturg_touches", "touch() calls.", labels, registry=None)
        self.duration = prometheus_client.Histogram(
            "dramaturg_task_duration_seconds", "How long runs took.", labels, buckets=DURATION_BUCKETS, registry=None
        )
        task_module.touch_observers.append(self._touched)

    def series(self, message: Any) -> _Series:
        key = (message.queue_name, message.actor_name)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(self, canonical_queue(message.queue_name), message.actor_name)
        return series

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if self.tasks is not None:
            message._dramaturg_started = time.perf_counter()

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        if self.tasks is None:
            return
        series = self.series(message)
        started = message.__dict__.get("_dramaturg_started")
        if started is not None:
            series.duration.observe(time.perf_counter() - started)
        if exception is None:
            series.outcome("succeeded").inc()
            return
        if not isinstance(exception, TaskOutcome | StopRequested):
            self.failures.labels(series.queue, series.actor, type(exception).__name__).inc()
            if isinstance(exception, TimeToRunExceeded):
                self.ttr_exceeded.labels(series.queue, series.actor).inc()
        # Counted last: once a task's outcome is counted, so is everything else about its run.
        outcome = outcome_of(message)
        series.outcome(_OUTCOMES.get(outcome, outcome)).inc()

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if self.tasks is None:
            return
        outcome = outcome_of(message)
        if outcome == "done":  # skipped by another middleware (Dramatiq's age limit)
            outcome = "skipped"
        self.series(message).outcome(outcome).inc()

    def _touched(self, task: Any) -> None:
        self.touches.labels(task.queue_name, task.actor_name).inc()


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
    directory = metrics_directory()
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
