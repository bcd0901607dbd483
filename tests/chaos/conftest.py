"""The chaos suite's fixtures: its own broker servers, its scale, and its results table.

Every module here sets ``pytestmark = pytest.mark.chaos`` (``pytest -m chaos`` runs only
these, ``-m 'not chaos'`` everything else). The suite runs in one of two scales, chosen in one
place, the environment variable ``DRAMATURG_CHAOS``:

- unset (``make test``, CI): the bounded run, one repetition of each scenario with short
  outages, a few minutes in all;
- ``full`` (``make chaos``): more repetitions, more kills, the 15 s outage.

The brokers are this suite's own, never the session's: a RabbitMQ node and a Redis
server (``--appendonly yes --appendfsync always``) started here on free loopback ports,
which the scenarios stop, kill and restart. The scenarios on two hosts start servers of
their own that also listen on the addresses of their network namespaces.

Each scenario run reports one row (see :mod:`tests.chaos.harness`); with
``DRAMATURG_CHAOS_ROWS=PATH`` the rows are appended to that file as JSON lines, which
``tests/chaos/table.py`` turns into the table of ``docs/RELIABILITY.md``. The table is
printed at the end of every run either way; only ``make chaos`` rewrites the page.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
import redis

import dramaturg

from ..conftest import IN_CI, RABBITMQ_SERVER, Process, free_port, require
from .harness import ROWS, Chaos, Row
from .table import render

RABBITMQ_CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
FULL = os.environ.get("DRAMATURG_CHAOS", "").strip().lower() == "full"
ROWS_ENV = "DRAMATURG_CHAOS_ROWS"


@dataclass(frozen=True)
class Scale:
    """How hard each scenario pushes: the one switch between the bounded and the full run."""

    #: Repetitions of each scenario (each one a row of the table).
    runs: int
    #: Tasks per run of the process and network scenarios.
    tasks: int
    #: kill -9 per run.
    kills: int
    #: SIGTERMs per run (each followed by a fresh worker).
    sigterms: int
    #: The broker outage with delayed tasks and retries waiting (the issue's is 15 s).
    outage_s: float
    #: How long a worker host stays cut off (network namespaces).
    cut_off_s: float
    #: How long replies are lost (every 0.3 s) while the workers run.
    lossy_s: float
    #: Held tasks kicked by a kicker that is paused past its lease.
    held: int
    #: The most a run waits for its tasks to settle after the last fault.
    settle_s: float


SCALE = (
    Scale(runs=3, tasks=600, kills=8, sigterms=5, outage_s=15, cut_off_s=15, lossy_s=8, held=3000, settle_s=90)
    if FULL
    else Scale(runs=1, tasks=200, kills=3, sigterms=2, outage_s=5, cut_off_s=5, lossy_s=3, held=1000, settle_s=20)
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``run``: the repetition of a scenario (one in the bounded run)."""
    if "run" in metafunc.fixturenames:
        metafunc.parametrize("run", range(SCALE.runs), ids=[f"run{n}" for n in range(SCALE.runs)])


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if ROWS:
        scale = "full run" if FULL else "bounded run (DRAMATURG_CHAOS=full: more)"
        terminalreporter.write_sep("-", f"chaos: {scale}")
        terminalreporter.write_line(render(ROWS))


@pytest.fixture(scope="session", autouse=True)
def chaos_rows() -> Iterator[None]:
    """Appends each row to ``$DRAMATURG_CHAOS_ROWS`` once the session ends."""
    yield
    path = os.environ.get(ROWS_ENV)
    if path and ROWS:
        with open(path, "a") as out:
            for row in ROWS:
                out.write(json.dumps({**row.as_dict(), "scale": "full" if FULL else "bounded"}) + "\n")


@pytest.fixture(scope="session")
def scale() -> Scale:
    return SCALE


# -- the suite's own brokers --------------------------------------------------------------


def _quiet_env(**extra: str) -> dict[str, str]:
    """The environment for a server: none of the session node's RABBITMQ_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_", "DRAMATURG_"))}
    env.update(extra)
    return env


def server_port() -> int:
    """A free port for a server the chaos tests restart, below the kernel's ephemeral range.

    A restarted server binds its port again; one from the ephemeral range (what
    :func:`free_port` gives) may meanwhile have become the local port of a client's
    connection (the workers reconnect while it is down), and the restart then fails with
    ``eaddrinuse``: the harness, not the code under test, failing a scenario."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = max(low, 11000)
    for _ in range(100):
        port = random.randrange(10000, low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return free_port()


class RabbitmqNode:
    """A RabbitMQ node of this suite's own, stopped and started by the scenarios.

    Listens on 127.0.0.1 and on any further ``addresses`` (those of the test's network
    namespaces); ``guest`` may log in from them only when there are some.
    """

    def __init__(self, directory: Path, addresses: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.host = "127.0.0.1"
        self.port = server_port()
        self.addresses = addresses
        self.name = f"chaos-{self.port}@localhost"
        config = directory / "rabbitmq.conf"
        lines = ["loopback_users = none" if addresses else "loopback_users.guest = true"]
        for n, address in enumerate(("127.0.0.1", *addresses), start=1):
            lines.append(f"listeners.tcp.{n} = {address}:{self.port}")
        config.write_text("\n".join(lines) + "\n")
        (directory / "plugins").write_text("[].\n")
        self.env = _quiet_env(
            RABBITMQ_CONFIG_FILE=str(config),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_MNESIA_BASE=str(directory / "mnesia"),
            RABBITMQ_LOG_BASE=str(directory / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(directory / "plugins"),
            RABBITMQ_DIST_PORT=str(server_port()),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, host: str | None = None) -> str:
        return f"amqp://guest:guest@{host or self.host}:{self.port}/%2F"

    def start(self, timeout: float = 60.0) -> float:
        """Start the node and wait until it takes AMQP connections; returns how long that took."""
        began = time.monotonic()
        log = open(self.directory / "server.out", "ab")  # noqa: SIM115 - the server writes it for its lifetime
        self.process = subprocess.Popen(
            [RABBITMQ_SERVER], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        parameters = pika.URLParameters(self.url())
        parameters.connection_attempts = 1
        parameters.socket_timeout = 1
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"RabbitMQ node {self.name} exited; see {self.directory}/server.out")
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                pika.BlockingConnection(parameters).close()
                return time.monotonic() - began
            if time.monotonic() - began > timeout:
                raise RuntimeError(f"RabbitMQ node {self.name} did not answer within {timeout} s")
            time.sleep(0.1)  # a server booting: nothing to wait on but its port

    def stop(self) -> None:
        """Stop the node as an operator does (``rabbitmqctl stop``); durable messages stay."""
        if self.process is None or self.process.poll() is not None:
            return
        subprocess.run([RABBITMQ_CTL, "-n", self.name, "stop"], env=self.env, capture_output=True, timeout=60)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class RedisServer:
    """A Redis server of this suite's own: append-only file fsynced on every write, so a
    ``kill -9`` loses nothing it answered; killed and started again by the scenarios."""

    def __init__(self, directory: Path, addresses: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.host = "127.0.0.1"
        self.port = server_port()
        self.addresses = addresses
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, host: str | None = None) -> str:
        return f"redis://{host or self.host}:{self.port}/0"

    def start(self, timeout: float = 30.0) -> float:
        began = time.monotonic()
        argv = [
            "redis-server",
            "--port",
            str(self.port),
            # One argument per address: Redis 6.2 (the venv's redis-server, for the embedded
            # broker, comes first on an activated venv's PATH) takes no spaces in one.
            "--bind",
            "127.0.0.1",
            *self.addresses,
            "--protected-mode",
            "no",
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ]
        log = open(self.directory / "server.out", "ab")  # noqa: SIM115 - the server writes it for its lifetime
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        client = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=1)
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited; see {self.directory}/server.out")
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return time.monotonic() - began
                if time.monotonic() - began > timeout:
                    raise RuntimeError(f"redis-server did not answer within {timeout} s")
                time.sleep(0.02)  # a server loading its file: nothing to wait on but its port
        finally:
            client.close()

    def kill(self) -> None:
        """``kill -9``: what it answered is in its append-only file."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    stop = kill


@pytest.fixture(scope="session")
def chaos_rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitmqNode]:
    """The suite's RabbitMQ node, on 127.0.0.1 and a free port."""
    require(RABBITMQ_SERVER, "RabbitMQ")
    node = RabbitmqNode(tmp_path_factory.mktemp("chaos-rabbitmq"))
    node.start()
    yield node
    node.stop()
    node.kill()


@pytest.fixture(scope="session")
def chaos_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The suite's Redis server, on 127.0.0.1 and a free port."""
    require("redis-server", "Redis")
    server = RedisServer(tmp_path_factory.mktemp("chaos-redis"))
    server.start()
    yield server
    server.kill()


def chaos_broker_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "rabbitmq":
        node: RabbitmqNode = request.getfixturevalue("chaos_rabbitmq")
        if node.process is None or node.process.poll() is not None:
            node.start()  # a scenario that failed half-way through a restart
        return node.url()
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("chaos_redis")
        if server.process is None or server.process.poll() is not None:
            server.start()
        return server.url()
    if kind == "embedded":
        return f"embedded://{tmp_path / 'queue' / 'embedded.db'}"
    raise ValueError(kind)


#: Broker settings of every chaos scenario, the sender's and the workers' (see harness).
#: A dead Redis worker is found after 1 s (heartbeats every 200 ms); RabbitMQ heartbeats
#: every 2 s, so a silent peer is dropped within a few seconds.
CHAOS_BROKER = {"heartbeat_timeout": 1_000, "heartbeat": 2_000}


@pytest.fixture
def settings(broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dramaturg.Settings:
    """The session's ``settings`` fixture, on this suite's own brokers."""
    return dramaturg.Settings(
        broker={
            "url": chaos_broker_url(broker_kind, request, tmp_path),
            "namespace": f"chaos-{uuid.uuid4().hex[:8]}",
            **CHAOS_BROKER,
        },
        worker={"threads": 4},
    )


@pytest.fixture
def chaos(
    broker_kind: str, settings: dramaturg.Settings, tmp_path: Path, spawn: Callable[..., Process]
) -> Iterator[Callable[[str], Chaos]]:
    """``chaos(fault)``: a scenario run on this test's broker (see :mod:`tests.chaos.harness`)."""
    made: list[Chaos] = []

    def make(fault: str) -> Chaos:
        run = Chaos(fault, broker_kind, settings, tmp_path, spawn)
        made.append(run)
        return run

    yield make
    for run in made:
        run.close()


# -- two hosts: network namespaces ---------------------------------------------------------


@dataclass
class Host:
    """A worker host: a network namespace joined to this one by a veth pair."""

    namespace: str
    #: This end's address (the brokers listen on it) and the host's own.
    gateway: str
    address: str

    def run(self, *argv: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.namespace, *argv], check=True, capture_output=True, timeout=30)

    def prefix(self) -> list[str]:
        """Prefix of a command that runs on this host."""
        return ["ip", "netns", "exec", self.namespace]

    def cut_off(self) -> None:
        """Every packet in or out of the host dropped, as a dead switch port does."""
        self.run("iptables", "-A", "INPUT", "-j", "DROP")
        self.run("iptables", "-A", "OUTPUT", "-j", "DROP")

    def restore(self) -> None:
        self.run("iptables", "-F")


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


_hosts_made = 0


@pytest.fixture
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Two worker hosts, each a network namespace with a veth pair to this one.

    Needs ``ip netns`` and ``iptables`` (and root): skipped without them locally, failed
    under CI=true.
    """
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    problem = f"{' and '.join(missing)} not installed (apt-get install iproute2 iptables)" if missing else None
    global _hosts_made
    _hosts_made += 1
    tag = f"dgc{os.getpid() % 10_000}{_hosts_made % 100}"  # at most 15 characters per link name
    if problem is None:
        try:
            _ip("netns", "add", f"{tag}probe")
            _ip("netns", "del", f"{tag}probe")
        except (subprocess.CalledProcessError, OSError) as error:
            stderr = getattr(error, "stderr", b"") or b""
            problem = f"ip netns is unavailable: {stderr.decode(errors='replace').strip() or error}"
    if problem is not None:
        if IN_CI:
            pytest.fail(problem)
        pytest.skip(problem)
    # 10.<a>.<b>.0/30 per host, from the pid, so two sessions on one machine do not collide.
    a, b = 100 + os.getpid() % 100, (os.getpid() // 100 + _hosts_made) % 120
    hosts = []
    try:
        for n in (1, 2):
            namespace, outside, inside = f"{tag}h{n}", f"{tag}o{n}", f"{tag}i{n}"
            gateway, address = f"10.{a}.{b * 2 + n - 1}.1", f"10.{a}.{b * 2 + n - 1}.2"
            _ip("netns", "add", namespace)
            hosts.append(Host(namespace, gateway, address))
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", namespace)
            _ip("addr", "add", f"{gateway}/30", "dev", outside)
            _ip("link", "set", outside, "up")
            host = hosts[-1]
            host.run("ip", "addr", "add", f"{address}/30", "dev", inside)
            host.run("ip", "link", "set", inside, "up")
            host.run("ip", "link", "set", "lo", "up")
        yield hosts[0], hosts[1]
    finally:
        for n, host in enumerate(hosts, start=1):
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                _ip("link", "del", f"{tag}o{n}")  # the pair goes at once, even while processes are inside
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                _ip("netns", "del", host.namespace)


__all__ = ["FULL", "SCALE", "Host", "RabbitmqNode", "RedisServer", "Row", "Scale"]
