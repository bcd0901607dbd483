"""Dramatiq's test fixtures, built through dramaturg: copied over the sdist's ``tests/`` by ``compat/run.py``.

Dramatiq's sdist ships its test files but not its ``conftest.py`` (nor ``common.py``);
this file provides the fixtures those tests use, with every broker made by
:func:`dramaturg.bootstrap` exactly as an application gets it, so that a test that
passes on Dramatiq and fails here shows where dramaturg differs:

- ``stub_broker``: ``stub://``; ``redis_broker``: a private Redis, namespace
  ``dramatiq`` (Dramatiq's Redis tests read ``dramatiq:*`` keys); ``rabbitmq_broker``:
  a private RabbitMQ node;
- ``stub_worker``, ``redis_worker``, ``rabbitmq_worker``: Dramatiq workers on them, as
  Dramatiq's own fixtures start them;
- ``result_backend`` and ``rate_limiter_backend`` on the private Redis and in memory
  (no memcached: those parameters are not collected);
- a record of each test's outcome, written as JSON to ``$DRAMATURG_COMPAT_RESULTS`` for
  ``compat/run.py`` to compare with ``compat/differences.toml``.

The servers are private to the run, on loopback and free ports (the project's
``tests/conftest.py`` does the same): the machine's own brokers on 5672 and 6379 are
never used. A missing server binary fails the run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.rate_limits import backends as rate_limit_backends
from dramatiq.results import backends as result_backends
from pytest_rabbitmq import factories as rabbitmq_factories
from pytest_redis import factories as redis_factories

import dramaturg

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"

logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(threadName)s] [%(name)s] [%(levelname)s] %(message)s")
logging.getLogger("pika").setLevel(logging.WARNING)
random.seed(1337)  # as Dramatiq's own conftest: its backoff and rate-limit tests draw from it

rabbitmq_proc = rabbitmq_factories.rabbitmq_proc()
redis_proc = redis_factories.redis_proc()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def rabbitmq_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A RabbitMQ node for this run, on 127.0.0.1 and a free port, no plugins."""
    if not Path(RABBITMQ_SERVER).is_file():
        pytest.fail(f"RabbitMQ is not installed ({RABBITMQ_SERVER}); run: apt-get install -y rabbitmq-server")
    directory = tmp_path_factory.mktemp("rabbitmq-config")
    config = directory / "rabbitmq.conf"
    # Our own file, so that a system-wide listeners.tcp setting (port 5672) is not inherited.
    config.write_text("loopback_users.guest = true\n")
    (directory / "plugins").write_text("[].\n")
    request.config.option.rabbitmq_plugindir = str(directory)
    os.environ.update(
        {
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
    )
    return request.getfixturevalue("rabbitmq_proc")


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> Any:
    """A Redis server for this run, on 127.0.0.1 and a free port."""
    return request.getfixturevalue("redis_proc")


def bootstrap(**broker: Any) -> Any:
    """A broker as an application gets it from dramaturg, booted as Dramatiq's fixtures boot theirs."""
    # A message for an actor no worker declares is held at once: with the default grace a
    # worker gives it back for 5 minutes, and Dramatiq's tests of missing actors join on the
    # queue until its pytest timeout (they differ either way: held, not dead-lettered).
    built = dramaturg.bootstrap(dramaturg.Settings(broker=broker, worker={"unknown_actor_grace": 0}))
    built.emit_after("process_boot")
    return built


def redis_client(server: Any) -> redis.Redis:
    return redis.Redis(host=server.host, port=server.port)


@pytest.fixture
def stub_broker() -> Iterator[Any]:
    broker = bootstrap(url="stub://")
    yield broker
    broker.flush_all()
    dramaturg.shutdown()


@pytest.fixture
def redis_broker(redis_server: Any) -> Iterator[Any]:
    redis_client(redis_server).flushall()
    broker = bootstrap(url=f"redis://{redis_server.host}:{redis_server.port}/0", namespace="dramatiq")
    yield broker
    dramaturg.shutdown()
    redis_client(redis_server).flushall()


@pytest.fixture
def rabbitmq_broker(rabbitmq_server: Any) -> Iterator[Any]:
    broker = bootstrap(url=f"amqp://guest:guest@{rabbitmq_server.host}:{rabbitmq_server.port}/%2F")
    yield broker
    declared = broker.get_declared_queues()
    dramaturg.shutdown()
    delete_rabbitmq_queues(broker.parameters, declared)


def delete_rabbitmq_queues(parameters: Any, names: set[str]) -> None:
    """Delete what a test declared, so that the next one starts on an empty node."""
    import pika

    connection = pika.BlockingConnection(parameters)
    try:
        channel = connection.channel()
        for name in names:
            for suffix in ("", ".DQ", ".XQ", ".HQ"):
                channel.queue_delete(name + suffix)
    finally:
        connection.close()


def start_worker(broker: Any, **options: Any) -> Iterator[dramatiq.Worker]:
    worker = dramatiq.Worker(broker, worker_threads=32, **options)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def stub_worker(stub_broker: Any) -> Iterator[dramatiq.Worker]:
    yield from start_worker(stub_broker, worker_timeout=100)


@pytest.fixture
def redis_worker(redis_broker: Any) -> Iterator[dramatiq.Worker]:
    yield from start_worker(redis_broker)


@pytest.fixture
def rabbitmq_worker(rabbitmq_broker: Any) -> Iterator[dramatiq.Worker]:
    yield from start_worker(rabbitmq_broker)


@pytest.fixture
def info_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    yield
    root.setLevel(level)


@pytest.fixture
def redis_result_backend(redis_server: Any) -> result_backends.RedisBackend:
    client = redis_client(redis_server)
    client.flushall()
    return result_backends.RedisBackend(client=client)


@pytest.fixture(params=["redis", "stub"])
def result_backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "redis":
        return request.getfixturevalue("redis_result_backend")
    return result_backends.StubBackend()


@pytest.fixture(params=["redis", "stub"])
def rate_limiter_backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "redis":
        client = redis_client(request.getfixturevalue("redis_server"))
        client.flushall()
        return rate_limit_backends.RedisBackend(client=client)
    return rate_limit_backends.StubBackend()


# -- outcomes, for compat/run.py -----------------------------------------------------------

_outcomes: dict[str, str] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A test failed if any phase failed (an error in a fixture too), else skipped or passed."""
    if report.failed:
        _outcomes[report.nodeid] = "failed"
    elif report.skipped:
        _outcomes.setdefault(report.nodeid, "skipped")
    elif report.when == "call":
        _outcomes.setdefault(report.nodeid, "passed")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _outcomes[report.nodeid] = "failed"


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("DRAMATURG_COMPAT_RESULTS")
    if path:
        Path(path).write_text(json.dumps(_outcomes, indent=0, sort_keys=True))
