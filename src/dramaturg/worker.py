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
import sys

import dramatiq

from . import brokers
from .app import bootstrap, import_actor_modules
from .config import load_settings
from .errors import ConfigError
from .masking import install_log_masking

__all__ = ["broker"]

#: sysexits.h EX_CONFIG: the configuration is wrong.
EXIT_CONFIG = 78
#: Run when ``worker.modules`` names nothing (a fresh install): the built-in ``echo``.
#: List it in ``worker.modules`` to keep it beside the application's own actors; it is
#: not consumed otherwise, since every queue a worker consumes but never uses costs it
#: CPU (about 10% of the drain rate with two processes on Redis, benchmarks/).
BUILTIN_ACTORS = "dramaturg.actors.builtin"

logger = logging.getLogger("dramaturg.worker")


def _boot() -> dramatiq.Broker:
    install_log_masking()  # before anything can log a URL
    try:
        settings = load_settings()
        booted = bootstrap(settings)
    except ConfigError as error:
        logger.critical("dramaturg: configuration error: %s", error)
        sys.exit(EXIT_CONFIG)
    brokers.ping(settings.broker)  # BrokerUnreachable is a ConnectionFailed: Dramatiq exits with 3
    import_actor_modules(settings.worker.modules or [BUILTIN_ACTORS])  # ImportError: Dramatiq exits with 2
    return booted


broker = _boot()
