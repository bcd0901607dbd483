"""RabbitMQ through pika: Dramatiq's broker with publisher confirms on by default.

With confirms, ``send()`` returns only once RabbitMQ has taken responsibility for the
message (a publish to a missing queue or a full disk raises instead of vanishing).
They cost a round trip per message; bulk sending (a later feature) pipelines them.
"""

from __future__ import annotations

import time
from typing import Any

import pika
import pika.exceptions
from dramatiq import Middleware
from dramatiq.brokers.rabbitmq import RabbitmqBroker as _DramatiqRabbitmqBroker

from ..config import BrokerSettings
from ..errors import BrokerUnreachable, ConfigError
from ..masking import mask_url

__all__ = ["RabbitmqBroker", "create_broker", "ping"]


class RabbitmqBroker(_DramatiqRabbitmqBroker):
    """Dramatiq's RabbitMQ broker, built from :class:`BrokerSettings`.

    Connections are opened lazily, one per thread, as in Dramatiq.
    """

    def __init__(self, settings: BrokerSettings, *, middleware: list[Middleware]) -> None:
        assert settings.url is not None
        super().__init__(
            url=settings.url,
            middleware=middleware,
            confirm_delivery=settings.confirm_delivery,
            max_priority=settings.max_priority,
        )
        self.parameters = connection_parameters(settings)
        self.settings = settings

    def __repr__(self) -> str:
        return f"<RabbitmqBroker {mask_url(self.settings.url)}>"


def connection_parameters(settings: BrokerSettings) -> pika.URLParameters:
    """pika's parameters for ``broker.url``, with the configured timeouts and heartbeat."""
    assert settings.url is not None
    try:
        parameters = pika.URLParameters(settings.url)
    except Exception as error:  # pika raises ValueError, TypeError or its own errors
        raise ConfigError(
            f"broker.url: {mask_url(settings.url)!r} is not a valid AMQP URL: {error}", key="broker.url"
        ) from None
    parameters.socket_timeout = settings.connect_timeout / 1000
    parameters.blocked_connection_timeout = 30
    if settings.heartbeat is not None:
        parameters.heartbeat = max(1, round(settings.heartbeat / 1000))
    return parameters


def create_broker(settings: BrokerSettings, middleware: list[Middleware]) -> RabbitmqBroker:
    return RabbitmqBroker(settings, middleware=middleware)


def ping(settings: BrokerSettings) -> float:
    parameters = connection_parameters(settings)
    parameters.connection_attempts = 1
    start = time.perf_counter()
    try:
        connection = pika.BlockingConnection(parameters)
    except pika.exceptions.ProbableAuthenticationError:
        raise _unreachable(settings, "authentication failed (check the user and password)") from None
    except pika.exceptions.ProbableAccessDeniedError:
        raise _unreachable(settings, "access denied to the virtual host") from None
    except (pika.exceptions.AMQPError, OSError) as error:
        raise _unreachable(settings, _reason(error)) from None
    try:
        channel = connection.channel()
        channel.close()
        return (time.perf_counter() - start) * 1000
    finally:
        connection.close()


def _reason(error: BaseException) -> str:
    # AMQPConnectionError wraps the socket error in args; show the innermost useful text.
    inner: Any = error
    while getattr(inner, "args", None) and isinstance(inner.args[0], BaseException):
        inner = inner.args[0]
    text = str(inner) or type(inner).__name__
    return text if text != "()" else type(error).__name__


def _unreachable(settings: BrokerSettings, reason: str) -> BrokerUnreachable:
    return BrokerUnreachable(f"cannot reach RabbitMQ at {mask_url(settings.url)}: {reason}")
