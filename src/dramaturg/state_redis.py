"""Which Redis holds a broker's state: task status, batches, checkpoints (and what comes
after them) all live in one place, found one way.

``[state] url`` when it is set; else the broker's own Redis (the Redis and embedded
brokers); else there is none, and :class:`~dramaturg.StateUnavailable` says what needs
it and which setting to write::

    batches need a state store, and the rabbitmq broker has none of its own:
    set [state] url = "redis://..." (or DRAMATURG_STATE_URL)
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from .errors import StateUnavailable

if TYPE_CHECKING:
    import dramatiq
    import redis

__all__ = ["STATE_READ_TIMEOUT_MS", "client_options", "no_store_reason", "state_redis"]

#: How long a state store client made from ``[state] url`` waits for an answer.
STATE_READ_TIMEOUT_MS = 10_000


def state_redis(broker: dramatiq.Broker, url: str | None, *, needs: str) -> redis.Redis:
    """The Redis client of ``broker``'s state: a new one for ``url``, else the broker's own.

    ``needs`` names what asks, with its verb ("batches need"), for the error's line.
    Raises :class:`~dramaturg.StateUnavailable` when there is neither.

    A client for ``url`` waits ``broker.connect_timeout`` for a connection and
    :data:`STATE_READ_TIMEOUT_MS` (10 s) for an answer, and probes idle connections with
    TCP keepalive (:func:`client_options`), as the Redis broker's own client does: a store
    that stops answering without closing the connection (a paused server, a network black
    hole) fails the call that waits on it within 10 s instead of holding its thread until
    TCP gives up (many minutes). Nothing kept in the state store is read by a blocking
    command (no BLPOP, no subscription); its longest calls are scripts over a few thousand
    ids, well under a second.
    """
    if url:
        import redis

        connect_ms = getattr(getattr(broker, "settings", None), "connect_timeout", None) or 5_000
        return redis.Redis.from_url(url, **client_options(url, connect_ms / 1000, STATE_READ_TIMEOUT_MS / 1000))
    client: Any = getattr(broker, "client", None)
    if client is None:
        raise StateUnavailable(no_store_reason(broker, needs=needs))
    return client  # type: ignore[no-any-return]


def client_options(url: str | None, connect_timeout_s: float, read_timeout_s: float) -> dict[str, Any]:
    """redis-py connection options: the connect and read timeouts, and for TCP keepalive
    probes after as many idle seconds as the read timeout, every third of it, three of
    them (a dead idle connection is dropped, not handed out), where the platform has them
    (not on a unix socket)."""
    options: dict[str, Any] = {"socket_connect_timeout": connect_timeout_s, "socket_timeout": read_timeout_s}
    if not (url or "").startswith("unix:"):
        idle = max(1, round(read_timeout_s))
        probes = {"TCP_KEEPIDLE": idle, "TCP_KEEPINTVL": max(1, idle // 3), "TCP_KEEPCNT": 3}
        options["socket_keepalive"] = True
        options["socket_keepalive_options"] = {
            getattr(socket, name): value for name, value in probes.items() if hasattr(socket, name)
        }
    return options


def no_store_reason(broker: dramatiq.Broker, *, needs: str = "task status needs") -> str:
    """Why ``broker`` has no state store, and what to set."""
    kind = getattr(getattr(broker, "settings", None), "type", None) or type(broker).__name__
    return (
        f"{needs} a state store, and the {kind} broker has none of its own:"
        ' set [state] url = "redis://..." (or DRAMATURG_STATE_URL)'
    )
