"""The redis-py client every dramaturg component of a Redis broker shares, and ``ping``.

A client made by :func:`make_client` waits :func:`read_timeout_ms` at most for an answer,
probes idle connections with TCP keepalive, and retries no command by itself
(:func:`no_retry`). :func:`script` reads the Lua scripts beside these modules, once, when
the module that runs them is imported.
"""

from __future__ import annotations

import os
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ...errors import BrokerUnreachable, ConfigError
from ...masking import mask_url
from ...state_redis import client_options

if TYPE_CHECKING:
    from ...config import BrokerSettings

__all__ = [
    "MAX_READ_TIMEOUT_MS",
    "OwnConnection",
    "glob_escape",
    "make_client",
    "no_retry",
    "ping",
    "ping_client",
    "read_timeout_ms",
    "script",
    "socket_options",
    "text",
]

#: The longest read timeout of the broker's client (see read_timeout_ms).
MAX_READ_TIMEOUT_MS = 10_000

_SCRIPTS = resources.files(__package__)


def script(name: str) -> str:
    """The Lua script ``<name>.lua`` of this package."""
    return _SCRIPTS.joinpath(f"{name}.lua").read_text(encoding="utf-8")


def no_retry() -> Retry:
    """The retry policy of the broker's clients: none, whatever redis-py's default.

    redis-py 6 and later retry a command that failed with a connection error or a timeout
    (10 times, with backoff, on a client made with ``redis.Redis(...)``; none on one made
    with ``Redis.from_url``, nor in Dramatiq's own ``RedisBroker(url=...)``). A script that
    ran in Redis and whose reply was lost then runs again: a fetch claims a second batch
    over the first, which nobody holds; an enqueue enqueues twice. So no command is
    retried blindly, and each caller copes with the error: a consumer restarts and gives
    back what it claimed (:mod:`dramaturg.brokers.redis.claims`), Dramatiq retries an
    acknowledgement (idempotent), the recovery thread tries again at its next tick, a
    sender gets the error (the message may have been enqueued). A connection that broke
    while idle is still replaced before use: the pool checks it when it hands it out.
    """
    return Retry(NoBackoff(), 0)


def read_timeout_ms(settings: BrokerSettings) -> int:
    """How long the broker's client waits for an answer: half of ``broker.heartbeat_timeout``,
    at most :data:`MAX_READ_TIMEOUT_MS` (10 s, so 10 s with the default 60 s; 500 ms with 1 s).

    A Redis that stops answering without closing the connection (a network black hole, a
    paused server) would otherwise hold a consumer, a sender and the heartbeat thread until
    TCP gives up (many minutes). With this timeout the heartbeat thread's next tick fails
    within ``heartbeat_timeout`` / 5 + this, before another worker can take this one for
    dead (``heartbeat_timeout``), and the worker stops starting what it holds until it has
    checked its claims (see :mod:`dramaturg.brokers.redis.claims`). No command dramaturg
    or Dramatiq sends blocks in Redis; the longest are scripts over a few thousand messages,
    well under a second.
    """
    return min(settings.heartbeat_timeout // 2, MAX_READ_TIMEOUT_MS)


def socket_options(settings: BrokerSettings) -> dict[str, Any]:
    """redis-py connection options of the broker's client: the connect timeout, the read
    timeout (:func:`read_timeout_ms`), and for TCP keepalive probes after as many idle
    seconds, every third of it, three of them (a dead idle connection is dropped, not
    handed out), where the platform has them."""
    return client_options(settings.url, settings.connect_timeout / 1000, read_timeout_ms(settings) / 1000)


def make_client(settings: BrokerSettings) -> redis.Redis:
    """A redis-py client for ``broker.url`` with the configured connect timeout, a read
    timeout and TCP keepalive (:func:`socket_options`), which retries nothing by itself
    (:func:`no_retry`)."""
    assert settings.url is not None
    try:
        return redis.Redis.from_url(settings.url, retry=no_retry(), **socket_options(settings))
    except ValueError as error:
        raise ConfigError(
            f"broker.url: not a valid Redis URL: {error}",
            key="broker.url",  # never quote a URL that did not parse
        ) from None


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


def text(value: bytes | str) -> str:
    """A key or member as text (Redis answers with bytes)."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def glob_escape(literal: str) -> str:
    """``literal`` matched literally by a Redis MATCH pattern (namespaces may hold ``*?[]``)."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in literal)


class OwnConnection:
    """A connection of ``client``'s pool kept by one caller, who uses it from one thread at
    a time, to run scripts on the message path straight on it.

    redis-py's way (``Script.__call__``, then ``execute_command``: its argument checks, the
    retry wrapper, a pool checkout and its health check) cost about 40 us of CPU per call
    here, against about 15 us for the command written and its reply read on a connection
    kept at hand: on a worker draining short tasks, a tenth of its time. Errors are
    redis-py's own, and nothing is retried (as :func:`no_retry`): a connection that fails
    is closed, and the next call opens a new one, as the pool's would. A forked child opens
    its own.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._connection: Any = None
        self._pid = os.getpid()

    def run(self, sha: str, text: str, keys: list[Any], args: list[Any]) -> Any:
        """EVALSHA of the script ``text`` (its SHA1 ``sha``), loaded first if Redis lacks it."""
        connection = self._connection
        if connection is None or self._pid != os.getpid():
            self._pid = os.getpid()
            connection = self._connection = self._pool.make_connection()
        try:
            try:
                connection.send_command("EVALSHA", sha, len(keys), *keys, *args)
                return connection.read_response()
            except redis.exceptions.NoScriptError:  # Redis restarted, or SCRIPT FLUSH
                connection.send_command("SCRIPT", "LOAD", text)
                connection.read_response()
                connection.send_command("EVALSHA", sha, len(keys), *keys, *args)
                return connection.read_response()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self._connection = None
            connection.disconnect()
            raise

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and self._pid == os.getpid():
            connection.disconnect()
