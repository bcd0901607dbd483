"""The module Dramatiq's CLI loads: ``dramatiq dramaturg.worker [more.modules ...]``.

Importing it reads the configuration (file + ``DRAMATURG_*``), bootstraps the broker,
checks that the broker answers, and imports the actor modules named in
``worker.modules`` (with none, the built-in ``echo`` actor). Dramatiq then runs its
workers on that broker.

Exit codes seen from Dramatiq's CLI: 2 when an actor module cannot be imported, 3 when
the broker cannot be reached (the message names the masked URL), 78 when the
configuration is invalid. ``dramaturg worker`` is the same thing with the process and
thread counts taken from the configuration.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

import dramatiq

from . import brokers, logs
from .app import BUILTIN_ACTORS, bootstrap, import_actor_modules
from .errors import ConfigError
from .exit_codes import EXIT_CONFIG
from .masking import install_log_masking
from .middleware import recycle, shutdown
from .settings_data import load_worker_settings

__all__ = ["broker"]

#: Seconds within which a repeated SIGTERM counts as the same request.
DUPLICATE_SIGNAL_S = 2.0

logger = logging.getLogger("dramaturg.worker")


def _debounce_sigterm() -> None:
    """Treat a second SIGTERM within :data:`DUPLICATE_SIGNAL_S` of the first as the same request.

    systemd (KillMode=control-group) and ``timeout`` signal the whole process group, and
    Dramatiq's main process forwards the signal to its workers as well: each worker
    process gets SIGTERM twice at once, and Dramatiq takes the second as "kill now",
    cutting the graceful shutdown short. A later SIGTERM still means "kill now".
    SIGHUP (Dramatiq's reload, which stops the worker the same way) shares the timer.

    Every stop request also stops the worker threads from taking tasks at once
    (:func:`~dramaturg.middleware.shutdown.stop_taking_tasks`): Dramatiq's process acts
    on the request up to a second later, and its threads would start tasks meanwhile.
    """
    handler = signal.getsignal(signal.SIGTERM)
    if not callable(handler) or "worker_process" not in getattr(handler, "__qualname__", ""):
        return  # not a Dramatiq worker process
    recycle.stop_process = handler
    first: list[float] = []

    def debounced(signum: int, frame: Any) -> None:
        shutdown.stop_taking_tasks()  # first: before Dramatiq's handler logs that the process stops
        now = time.monotonic()
        if recycle.on_outside_stop():
            first[:] = [now]
            return  # stopping already, to recycle: now it exits instead
        if first and now - first[0] < DUPLICATE_SIGNAL_S:
            return
        first[:] = [now]
        handler(signum, frame)

    signal.signal(signal.SIGTERM, debounced)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is handler:
        signal.signal(signal.SIGHUP, debounced)


def _boot() -> dramatiq.Broker:
    install_log_masking()  # before anything can log a URL
    logs.apply(os.environ.get(logs.LOG_FORMAT_ENV))  # before anything logs; a config file's choice follows
    _debounce_sigterm()
    try:
        settings = load_worker_settings()  # checked as load_settings() does, without pydantic here
        logs.apply(settings.log.format)
        if settings.broker.type == "eager":
            from .brokers.eager import NO_WORKERS

            raise ConfigError(f"broker.type: {NO_WORKERS}", key="broker.type")
        booted = bootstrap(settings)
        if settings.worker.metrics_port:
            from .middleware.metrics import metrics_directory

            metrics_directory()  # before an actor module may import prometheus_client: it picks its mode then
    except ConfigError as error:
        logger.critical("dramaturg: configuration error: %s", error)
        sys.exit(EXIT_CONFIG)
    brokers.ping(settings.broker)  # BrokerUnreachable is a ConnectionFailed: Dramatiq exits with 3
    import_actor_modules(settings.worker.modules or [BUILTIN_ACTORS])  # ImportError: Dramatiq exits with 2
    return booted


broker = _boot()
