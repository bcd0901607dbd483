"""How dramaturg connects to RabbitMQ: pika's parameters, ``ping``, and errors in a line.

:func:`connection_parameters` turns ``broker.url`` (several, separated by ``;``) into
pika's parameters with the configured timeouts and heartbeat; :func:`quiet_pika` keeps
pika from logging while a command connects; :func:`unreachable` and :func:`error_text`
say why RabbitMQ could not be reached, in one masked line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions

from ...errors import BrokerUnreachable, ConfigError
from ...masking import mask_url

if TYPE_CHECKING:
    from ...config import BrokerSettings

__all__ = ["connection_parameters", "error_text", "ping", "quiet_pika", "unreachable"]


def connection_parameters(settings: BrokerSettings) -> Any:
    """pika's parameters for ``broker.url``, with the configured timeouts and heartbeat.

    A URL holding several, separated by ``;``, gives a list: pika tries them in turn.
    """
    assert settings.url is not None
    urls = [url for url in settings.url.split(";") if url.strip()]
    parsed = []
    for url in urls:
        try:
            parameters = pika.URLParameters(url.strip())
        except Exception as error:  # pika raises ValueError, TypeError or its own errors
            # Never the URL: one that did not parse cannot be masked reliably.
            raise ConfigError(f"broker.url: not a valid AMQP URL: {mask_url(str(error))}", key="broker.url") from None
        parameters.socket_timeout = settings.connect_timeout / 1000
        parameters.blocked_connection_timeout = 30
        if settings.heartbeat is not None:  # 0 turns heartbeats off; round up, never down to 0
            parameters.heartbeat = -(-settings.heartbeat // 1000)
        parsed.append(parameters)
    return parsed[0] if len(parsed) == 1 else parsed


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_level = logging.NOTSET


@contextmanager
def quiet_pika() -> Iterator[None]:
    """Keep pika from logging while a command connects: a refused password or a closed
    port makes it log six ERROR lines and a traceback before it raises, and the command
    then says the same in one line of its own. Only around a command's own attempts
    (``ping``, the statistics); a worker's reconnections keep pika's lines."""
    global _quiet_depth, _quiet_level
    pika_logger = logging.getLogger("pika")
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_level = pika_logger.level
            pika_logger.setLevel(logging.CRITICAL + 1)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                pika_logger.setLevel(_quiet_level)


def ping(settings: BrokerSettings) -> float:
    parameters = connection_parameters(settings)
    for each in parameters if isinstance(parameters, list) else [parameters]:
        each.connection_attempts = 1
    start = time.perf_counter()
    try:
        with quiet_pika():
            connection = pika.BlockingConnection(parameters)
    except pika.exceptions.ProbableAuthenticationError:
        raise unreachable(settings, "authentication failed (check the user and password)") from None
    except pika.exceptions.ProbableAccessDeniedError:
        raise unreachable(settings, "access denied to the virtual host") from None
    except (pika.exceptions.AMQPError, OSError) as error:
        raise unreachable(settings, error_text(error)) from None
    try:
        channel = connection.channel()
        channel.close()
        return (time.perf_counter() - start) * 1000
    finally:
        connection.close()


def error_text(error: BaseException) -> str:
    # AMQPConnectionError wraps the socket error in args, and pika's connector errors keep
    # it in .exception; show the innermost useful text ("[Errno 111] Connection refused").
    inner: Any = error
    while True:
        if getattr(inner, "args", None) and isinstance(inner.args[0], BaseException):
            inner = inner.args[0]
        elif isinstance(getattr(inner, "exception", None), BaseException):
            inner = inner.exception
        else:
            break
    text = str(inner) or type(inner).__name__
    return text if text != "()" else type(error).__name__


def unreachable(settings: BrokerSettings, reason: str) -> BrokerUnreachable:
    return BrokerUnreachable(f"cannot reach RabbitMQ at {mask_url(settings.url)}: {reason}")
