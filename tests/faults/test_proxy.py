"""The fault proxy itself, against the private Redis: it forwards, cuts, refuses and loses replies."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .proxy import FaultProxy


@pytest.fixture
def proxy(redis_server: Any) -> Iterator[FaultProxy]:
    with FaultProxy() as started:
        started.start((redis_server.host, redis_server.port))
        yield started


def client_of(port: int | None = None, path: str | None = None) -> redis.Redis:
    """A client that never retries by itself, so each fault shows."""
    if path is not None:
        return redis.Redis(unix_socket_path=path, retry=Retry(NoBackoff(), 0))
    return redis.Redis("127.0.0.1", port, retry=Retry(NoBackoff(), 0))


def test_it_forwards_until_cut_and_refuses_while_down(proxy: FaultProxy) -> None:
    assert proxy._listener is not None
    client = client_of(proxy._listener.getsockname()[1])
    assert client.ping()

    # A cut drops the open connection (an idle one is replaced by the client's pool)
    assert proxy.cut() == 1
    assert client.ping()
    assert proxy.accepted == 2

    # While down, every connection is refused; afterwards they work again
    with proxy.down():
        for _ in range(2):
            with pytest.raises(redis.ConnectionError):
                client.ping()
    assert client.ping()
    assert proxy.refused >= 2


def test_a_lost_reply_leaves_the_command_done(proxy: FaultProxy, redis_server: Any) -> None:
    assert proxy._listener is not None
    client = client_of(proxy._listener.getsockname()[1])
    direct = redis.Redis(redis_server.host, redis_server.port)
    key = f"proxy-test-{uuid.uuid4().hex}"
    assert client.ping()

    # When the reply to an INCR is lost
    proxy.drop_next_reply()
    with pytest.raises(redis.ConnectionError):
        client.incr(key)

    # Then the INCR ran all the same, once
    assert proxy.replies_dropped == 1
    assert direct.get(key) == b"1"
    direct.delete(key)


def test_it_listens_on_a_unix_socket_too(redis_server: Any, tmp_path: Path) -> None:
    with FaultProxy() as proxy:
        path = proxy.start_unix((redis_server.host, redis_server.port), str(tmp_path / "p.sock"))
        client = client_of(path=path)
        assert client.ping()
        proxy.drop_next_reply()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        assert client.ping()
