"""The framework's middleware stack, one middleware per module.

:func:`framework_middleware` is the stack :func:`dramaturg.bootstrap` installs:
Dramatiq's defaults (age limit, time limit, shutdown notifications, callbacks,
pipelines, retries), its AsyncIO support for ``async def`` actors, and dramaturg's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dramatiq import Middleware
from dramatiq.middleware import (
    AgeLimit,
    AsyncIO,
    Callbacks,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from .worker_config import WorkerConfig

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["WorkerConfig", "framework_middleware"]


def framework_middleware(settings: Settings) -> list[Middleware]:
    """A fresh instance of every middleware in the stack, configured from ``settings``."""
    broker_type = settings.broker.type or "embedded"
    return [
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        Retries(),
        AsyncIO(),
        WorkerConfig(broker_type, settings.broker.prefetch, settings.worker.queues),
    ]
