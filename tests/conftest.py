"""Fixtures: private brokers, settings per broker, in-process workers, CLI subprocesses;
and the helpers test files share (recording runs, held tasks, a free port, raw publishing),
here so that no test file imports another.

The behaviour suite runs on real brokers started for this test session only:
RabbitMQ through pytest-rabbitmq (Debian's binaries, loopback only, its own config file
so the system's listener settings are not picked up, the management plugin on a port of
its own for the statistics tests), Redis through pytest-redis, and
the embedded broker in a temporary directory. A missing server binary skips those
tests locally and fails them under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from pytest_rabbitmq import factories as rabbitmq_factories
from pytest_redis import factories as redis_factories

import dramaturg
import dramaturg.actors.builtin  # the echo actor, declared once and kept by isolated_app
from dramaturg import app, resources, suspension, task_context
from dramaturg.held import HeldTask
from dramaturg.queues import BANDS, band, lane_queue

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
BROKERS = ("rabbitmq", "redis", "embedded")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

rabbitmq_proc = rabbitmq_factories.rabbitmq_proc()
redis_proc = redis_factories.redis_proc()


def pytest_configure(config: pytest.Config) -> None:
    # A run started in the background by a shell without job control (`nohup make test &`
    # in a script) inherits SIGINT ignored, and hands that to every command the tests start:
    # the tests of Ctrl-C could not press it (their commands ran on, or exited 0). This
    # process takes SIGINT back, so that its children start with it as from a terminal.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def switching_every_microsecond() -> Iterator[None]:
    """Threads switch every microsecond inside (the interpreter's switch interval, restored
    after): a race test's threads then land inside each other's steps on every run."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def require(binary: str, what: str) -> None:
    """Skip (locally) or fail (under CI=true) when a server binary is missing."""
    if shutil.which(binary) or Path(binary).is_file():
        return
    message = f"{what} is not installed ({binary}); run: apt-get install -y rabbitmq-server redis-server"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


# -- private brokers -------------------------------------------------------------------


@pytest.fixture(scope="session")
def rabbitmq_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A RabbitMQ node for this session, on 127.0.0.1 and a free port, with the management
    plugin on 127.0.0.1 and another free port (``server.management_url``)."""
    require(RABBITMQ_SERVER, "RabbitMQ")
    directory = tmp_path_factory.mktemp("rabbitmq-config")
    config = directory / "rabbitmq.conf"
    management_port = free_port()
    # Our own file, so a system-wide listeners.tcp setting (port 5672) is not inherited.
    # Statistics every 500 ms instead of 5 s: the management API's counts follow sooner.
    config.write_text(
        "loopback_users.guest = true\n"
        f"management.tcp.port = {management_port}\n"
        "management.tcp.ip = 127.0.0.1\n"
        "collect_statistics_interval = 500\n"
    )
    # pytest-rabbitmq sets RABBITMQ_ENABLED_PLUGINS_FILE to <its plugindir>/plugins itself.
    (directory / "plugins").write_text("[rabbitmq_management].\n")
    request.config.option.rabbitmq_plugindir = str(directory)
    os.environ.update(
        {
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
    )
    server = request.getfixturevalue("rabbitmq_proc")
    server.management_url = f"http://guest:guest@127.0.0.1:{management_port}"
    return server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> Any:
    """A Redis server for this session, on 127.0.0.1 and a free port."""
    require("redis-server", "Redis")
    return request.getfixturevalue("redis_proc")


# -- settings and brokers ---------------------------------------------------------------


def broker_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "rabbitmq":
        server = request.getfixturevalue("rabbitmq_server")
        return f"amqp://guest:guest@{server.host}:{server.port}/%2F"
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        return f"redis://{server.host}:{server.port}/0"
    if kind == "embedded":
        return f"embedded://{tmp_path / 'queue' / 'embedded.db'}"
    raise ValueError(kind)


@pytest.fixture(params=BROKERS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Each behaviour test runs once per real broker."""
    return str(request.param)


@pytest.fixture
def settings(broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dramaturg.Settings:
    """Settings for the private broker of this run, with a namespace of this test's own
    (and on RabbitMQ the private node's management API)."""
    broker: dict[str, Any] = {
        "url": broker_url(broker_kind, request, tmp_path),
        "namespace": f"test-{uuid.uuid4().hex[:8]}",
    }
    if broker_kind == "rabbitmq":
        broker["management_url"] = request.getfixturevalue("rabbitmq_server").management_url
    return dramaturg.Settings(
        broker=broker,
        worker={"threads": 4},
    )


#: The real brokers and eager mode: where the features that keep state (batches,
#: checkpoints, cancelling, schedules, flow control) are tested.
MODES = ("rabbitmq", "redis", "embedded", "eager")


def settings_with_state(
    broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path, **sections: Any
) -> dramaturg.Settings:
    """Settings for ``broker_kind`` with a namespace of the test's own, where RabbitMQ gets
    the private Redis as its state store (and its node's management API); "eager" and
    "stub" are those modes. ``sections`` go to the settings as they are (``worker``
    defaults to 4 threads; eager and stub take no worker section)."""
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    if broker_kind in ("eager", "stub"):
        sections.pop("worker", None)
        return dramaturg.Settings(broker={"url": f"{broker_kind}://", "namespace": namespace}, **sections)
    broker: dict[str, Any] = {"url": broker_url(broker_kind, request, tmp_path), "namespace": namespace}
    state: dict[str, Any] = {}
    if broker_kind == "rabbitmq":
        broker["management_url"] = request.getfixturevalue("rabbitmq_server").management_url
        server = request.getfixturevalue("redis_server")
        state["url"] = f"redis://{server.host}:{server.port}/0"
    sections.setdefault("worker", {"threads": 4})
    return dramaturg.Settings(broker=broker, state=state, **sections)


@pytest.fixture(autouse=True)
def isolated_app() -> Iterator[None]:
    """Each test starts without a broker; actors it declares are forgotten afterwards,
    and so are the queues it suspended, its context providers, resources and hooks."""
    app.shutdown()
    before = dict(app._actors)
    providers, restorers = list(task_context._providers), list(task_context._restorers)
    declared, before_hooks, after_hooks = list(resources._registry), list(resources._before), list(resources._after)
    yield
    app.shutdown()
    app._actors.clear()
    app._actors.update(before)
    suspension.resume_all()
    task_context._providers[:], task_context._restorers[:] = providers, restorers
    resources._registry[:], resources._before[:], resources._after[:] = declared, before_hooks, after_hooks


@pytest.fixture
def broker(settings: dramaturg.Settings) -> Iterator[dramatiq.Broker]:
    """The bootstrapped broker; on RabbitMQ its queues are deleted afterwards."""
    built = dramaturg.bootstrap(settings)
    yield built
    if built.settings.type == "rabbitmq":  # type: ignore[attr-defined]
        delete_rabbitmq_queues(built)


def delete_rabbitmq_queues(broker: Any) -> None:
    import pika

    connection = pika.BlockingConnection(broker.parameters)
    try:
        channel = connection.channel()
        for name in broker.get_declared_queues():
            for suffix in ("", ".DQ", ".XQ", ".HQ"):
                channel.queue_delete(name + suffix)
    finally:
        connection.close()


def pending_messages(broker: Any, queue_name: str) -> int:
    """Messages of ``queue_name`` the broker still holds: ready, delayed or unacked.

    On RabbitMQ unacked deliveries are only visible as ready again once their consumer
    is gone, so call this after the worker stopped.
    """
    return int(broker.pending(queue_name))


@pytest.fixture
def start_worker(broker: dramatiq.Broker) -> Iterator[Callable[..., dramatiq.Worker]]:
    """Start a Dramatiq worker in this process; it is stopped at the end of the test."""
    started: list[dramatiq.Worker] = []

    def start(threads: int = 4, queues: set[str] | None = None) -> dramatiq.Worker:
        worker = dramatiq.Worker(broker, worker_threads=threads, queues=queues, worker_timeout=100)
        worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


# -- what test files share: recording runs, held tasks, raw access to a broker ----------

#: How long a test waits for something the broker or a worker thread does.
WAIT_S = 20


class Runs:
    """What handlers saw, in order: ``record(**facts)`` keeps a dict, ``add(value)`` one
    value; ``wait(n)`` blocks until there are ``n`` and returns them (a copy)."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self._changed = threading.Condition()

    def record(self, **facts: Any) -> None:
        self.add(facts)

    def add(self, value: Any) -> None:
        with self._changed:
            self.seen.append(value)
            self._changed.notify_all()

    def wait(self, count: int, timeout: float = WAIT_S) -> list[Any]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.seen) >= count, timeout), (
                f"{len(self.seen)} of {count} within {timeout} s: {self.seen}"
            )
            return list(self.seen)


@pytest.fixture
def import_user(broker: dramatiq.Broker) -> dramaturg.Actor[..., None]:
    """An actor on the "imports" queue taking a row; ``import_user.ran`` (:class:`Runs`)
    has the ``id`` of each row it ran."""
    ran = Runs()

    @dramaturg.actor(queue_name="imports")
    def import_user(row: dict[str, Any]) -> None:
        ran.add(row["id"])

    import_user.ran = ran  # type: ignore[attr-defined]
    return import_user


def held_task(queue: str, number: int, *, actor: str = "import_user") -> HeldTask:
    """A held task of ``queue`` for row ``number`` (an id of its own, times in 2023)."""
    return HeldTask(
        message_id=f"m-{number:03d}-{uuid.uuid4().hex[:6]}",
        queue_name=queue,
        actor_name=actor,
        args=[{"id": number}],
        kwargs={},
        reason=f"row {number} has no email",
        attempts=1,
        enqueued_at=1_700_000_000_000 + number,
        held_at=1_700_000_100_000 + number,
        host="worker-1",
        pid=4242,
    )


def raw_publish(broker: Any, queue: str, body: bytes, *, priority: int | None = 0) -> None:
    """Put ``body`` on ``queue`` without Dramatiq, as a foreign or broken producer would.

    It goes in the priority band ``send()`` puts a message of ``priority`` in (0, the
    default, is the band of a message sent with none), so that a message sent after it
    is delivered after it. ``None`` publishes as a producer that knows nothing of the
    bands: on RabbitMQ a message without a priority, which is RabbitMQ's lowest, so that
    a message of the default band sent after it is delivered before it; on Redis and
    embedded the queue's first lane, the default band's.
    """
    banded = priority is not None and broker.settings.priorities
    if broker.settings.type == "rabbitmq":
        import pika

        broker.declare_queue(queue, ensure=True)
        connection = pika.BlockingConnection(broker.parameters)
        try:
            channel = connection.channel()
            channel.confirm_delivery()  # on the queue before anything sent after it
            # RabbitMQ's priority for the band, as the priority middleware publishes it
            published = len(BANDS) - 1 - band(priority) if banded and priority is not None else None
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2, priority=published))
        finally:
            connection.close()
        return
    broker.declare_queue(queue)
    lane = lane_queue(queue, priority) if banded and priority is not None else queue
    redis_id = str(uuid.uuid4())
    # Dramatiq's Redis layout: the body in <lane>.msgs, the id on the <lane> list.
    broker.client.hset(f"{broker.namespace}:{lane}.msgs", redis_id, body)
    broker.client.rpush(f"{broker.namespace}:{lane}", redis_id)


# -- subprocesses -----------------------------------------------------------------------


class Process:
    """A CLI subprocess whose merged output is read line by line as it arrives."""

    def __init__(self, argv: list[str], *, cwd: Path, env: dict[str, str]) -> None:
        self.argv = argv
        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, needle: str, timeout: float = 30.0) -> str:
        """Block until a line containing ``needle`` is printed; fail with the output if not."""
        for line in self.lines:
            if needle in line:
                return line
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                line = None
                remaining = 0
            if line is None:
                if remaining <= 0 or self.popen.poll() is not None:
                    pytest.fail(f"{needle!r} never appeared in the output of {self.argv}:\n" + self.output)
                continue
            self.lines.append(line)
            if needle in line:
                return line

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` to the main process only and wait for it to exit."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        code = self.popen.wait(timeout=timeout)
        self._reader.join(timeout=5)
        self._drain()
        return code

    def _drain(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.lines.append(line)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    @property
    def output(self) -> str:
        self._drain()
        return "\n".join(self.lines)


def poll_until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Return ``check()`` once it is truthy, looking every 10 ms, or fail naming ``what``.

    Only for state another process changes (a file a worker appends to, a queue's count):
    no event reaches this one. Anything in this process waits on an event instead.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.01)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: no inherited DRAMATURG_* settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DRAMATURG_")}
    env.update(extra)
    return env


def bin_path(name: str) -> str:
    """A console script installed beside this interpreter."""
    return str(Path(sys.executable).with_name(name))


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    """Start CLI processes in ``tmp_path``; any still running at the end are killed."""
    processes: list[Process] = []

    def start(argv: list[str], *, cwd: Path | None = None, **env: str) -> Process:
        process = Process(argv, cwd=cwd or tmp_path, env=cli_env(**env))
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()


def run_cli(argv: list[str], *, cwd: Path, timeout: float = 60.0, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a short CLI command to completion and capture its output."""
    return subprocess.run(
        argv, cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=timeout, check=False
    )


def write_config(directory: Path, settings: dramaturg.Settings, **worker: Any) -> Path:
    """A dramaturg.toml for ``settings`` (broker url and namespace) in ``directory``."""
    lines = [
        "[broker]",
        f'url = "{settings.broker.url}"',
        f'namespace = "{settings.broker.namespace}"',
        *([f'management_url = "{settings.broker.management_url}"'] if settings.broker.management_url else []),
        "",
        "[worker]",
    ]
    for key, value in worker.items():
        rendered = "[" + ", ".join(f'"{v}"' for v in value) + "]" if isinstance(value, list) else repr(value)
        lines.append(f"{key} = {rendered}")
    if settings.state.url:
        lines += ["", "[state]", f'url = "{settings.state.url}"']
    path = directory / "dramaturg.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def observed_project(settings: dramaturg.Settings, tmp_path: Path) -> Any:
    """``tests.apps.observed_tasks``, declared in this process and named by a dramaturg.toml
    in ``tmp_path`` for the worker processes (the metrics and JSON-log tests)."""
    from tests.apps import observed_tasks

    observed_tasks.declare()  # declared at the first import; isolated_app forgets them after each test
    write_config(tmp_path, settings, modules=["tests.apps.observed_tasks"])
    return observed_tasks


# -- the web dashboard: served by uvicorn in a thread of the test process ----------------


class LiveServer:
    """An ASGI app served by uvicorn on 127.0.0.1 and a free port, in a thread;
    ``url`` is its address. ``stop()`` ends it (the fixture does)."""

    def __init__(self, asgi_app: Any) -> None:
        import uvicorn

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(asgi_app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        poll_until(lambda: self.server.started or not self.thread.is_alive(), "the dashboard to start", timeout=WAIT_S)
        assert self.server.started, "the dashboard did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_S)


@pytest.fixture
def serve() -> Iterator[Callable[[Any], LiveServer]]:
    """Serve ASGI apps (the dashboard) for this test; each is stopped at its end."""
    servers: list[LiveServer] = []

    def start(asgi_app: Any) -> LiveServer:
        server = LiveServer(asgi_app)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
