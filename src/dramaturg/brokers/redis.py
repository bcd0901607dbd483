"""Redis through redis-py: Dramatiq's Redis broker, keys under ``broker.namespace``."""

from __future__ import annotations

import time

import redis
from dramatiq import Middleware
from dramatiq.brokers.redis import RedisBroker as _DramatiqRedisBroker

from ..config import BrokerSettings
from ..errors import BrokerUnreachable, ConfigError
from ..masking import mask_url

__all__ = ["RedisBroker", "create_broker", "ping"]


class RedisBroker(_DramatiqRedisBroker):
    """Dramatiq's Redis broker, built from :class:`BrokerSettings`.

    ``client`` is the redis-py client every dramaturg component shares; the embedded
    broker passes one connected to its own server's socket.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        middleware: list[Middleware],
        client: redis.Redis | None = None,
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            middleware=middleware,
            namespace=settings.namespace,
            heartbeat_timeout=settings.heartbeat_timeout,
            client=client or make_client(settings),
        )
        self.settings = settings

    def close(self) -> None:
        super().close()
        self.client.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {mask_url(self.settings.url)}>"


def make_client(settings: BrokerSettings) -> redis.Redis:
    """A redis-py client for ``broker.url`` with the configured connect timeout."""
    assert settings.url is not None
    try:
        return redis.Redis.from_url(settings.url, socket_connect_timeout=settings.connect_timeout / 1000)
    except ValueError as error:
        raise ConfigError(
            f"broker.url: {mask_url(settings.url)!r} is not a valid Redis URL: {error}", key="broker.url"
        ) from None


def create_broker(settings: BrokerSettings, middleware: list[Middleware]) -> RedisBroker:
    return RedisBroker(settings, middleware=middleware)


def ping(settings: BrokerSettings) -> float:
    client = make_client(settings)
    try:
        return ping_client(client, f"Redis at {mask_url(settings.url)}")
    finally:
        client.close()


def ping_client(client: redis.Redis, what: str) -> float:
    """Round trip of one PING in ms, or :class:`BrokerUnreachable` naming ``what``."""
    start = time.perf_counter()
    try:
        client.ping()
    except redis.AuthenticationError:
        raise BrokerUnreachable(f"cannot reach {what}: authentication failed (check the password)") from None
    except redis.RedisError as error:
        raise BrokerUnreachable(f"cannot reach {what}: {error}") from None
    return (time.perf_counter() - start) * 1000
