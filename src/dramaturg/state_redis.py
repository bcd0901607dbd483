"""Which Redis holds a broker's state: task status, batches, checkpoints (and what comes
after them) all live in one place, found one way.

``[state] url`` when it is set; else the broker's own Redis (the Redis and embedded
brokers); else there is none, and :class:`~dramaturg.StateUnavailable` says what needs
it and which setting to write::

    batches need a state store, and the rabbitmq broker has none of its own:
    set [state] url = "redis://..." (or DRAMATURG_STATE_URL)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import StateUnavailable

if TYPE_CHECKING:
    import dramatiq
    import redis

__all__ = ["no_store_reason", "state_redis"]


def state_redis(broker: dramatiq.Broker, url: str | None, *, needs: str) -> redis.Redis:
    """The Redis client of ``broker``'s state: a new one for ``url``, else the broker's own.

    ``needs`` names what asks, with its verb ("batches need"), for the error's line.
    Raises :class:`~dramaturg.StateUnavailable` when there is neither.
    """
    if url:
        import redis

        return redis.Redis.from_url(url)
    client: Any = getattr(broker, "client", None)
    if client is None:
        raise StateUnavailable(no_store_reason(broker, needs=needs))
    return client  # type: ignore[no-any-return]


def no_store_reason(broker: dramatiq.Broker, *, needs: str = "task status needs") -> str:
    """Why ``broker`` has no state store, and what to set."""
    kind = getattr(getattr(broker, "settings", None), "type", None) or type(broker).__name__
    return (
        f"{needs} a state store, and the {kind} broker has none of its own:"
        ' set [state] url = "redis://..." (or DRAMATURG_STATE_URL)'
    )
