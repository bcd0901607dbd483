"""The embedded broker: one server per data file, shared by every process, kept on disk."""

from __future__ import annotations

import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dramaturg
from dramaturg.brokers.embedded import EmbeddedServer, _process_exists

from .conftest import bin_path, pending_messages, run_cli, write_config


@pytest.fixture
def embedded_settings(tmp_path: Path) -> dramaturg.Settings:
    return dramaturg.Settings(broker={"url": f"embedded://{tmp_path / 'data' / 'queue.db'}"})


def server_of(settings: dramaturg.Settings) -> EmbeddedServer:
    assert settings.broker.url is not None
    return EmbeddedServer(Path(settings.broker.url.removeprefix("embedded://")))


def test_sender_and_worker_processes_share_one_server(embedded_settings: dramaturg.Settings, tmp_path: Path) -> None:
    # Given this process uses the embedded broker
    broker = dramaturg.bootstrap(embedded_settings)
    server = server_of(embedded_settings)
    pid = server.pid
    assert pid is not None

    # When another process sends through the same data file
    write_config(tmp_path, embedded_settings)
    result = run_cli([bin_path("dramaturg"), "send", 'default:echo:["from another process"]'], cwd=tmp_path)

    # Then it used the same server (no second one was started) and this process sees its message
    assert result.returncode == 0, result.stderr
    assert server.pid == pid
    assert pending_messages(broker, "default") == 1


def test_the_server_stops_with_its_last_user_and_the_data_survives(embedded_settings: dramaturg.Settings) -> None:
    # Given a message queued on the embedded broker
    broker = dramaturg.bootstrap(embedded_settings)
    dramaturg.echo.send("kept on disk")
    server = server_of(embedded_settings)
    first_pid = server.pid
    assert first_pid is not None

    # When its only user closes it
    dramaturg.shutdown()

    # Then the server is gone
    assert wait_for_exit(first_pid)
    assert not server.socket_path.exists()

    # and when the application starts again, a new server has the message
    broker = dramaturg.bootstrap(embedded_settings)
    assert server.pid not in (None, first_pid)
    assert pending_messages(broker, "default") == 1


def test_a_killed_user_does_not_keep_the_server_alive(embedded_settings: dramaturg.Settings) -> None:
    # Given another process attached to the server, then killed with SIGKILL
    script = textwrap.dedent(
        f"""
        import sys, dramaturg
        dramaturg.bootstrap(dramaturg.Settings(broker={{"url": {embedded_settings.broker.url!r}}}))
        print("attached", flush=True)
        sys.stdin.read()
        """
    )
    other = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "attached"
        dramaturg.bootstrap(embedded_settings)
        server = server_of(embedded_settings)
        pid = server.pid
        assert pid is not None
    finally:
        other.kill()
        other.wait()

    # When the last living user closes
    dramaturg.shutdown()

    # Then the server stops: the dead process's claim went with it
    assert wait_for_exit(pid)


def test_the_server_listens_on_a_private_unix_socket_only(embedded_settings: dramaturg.Settings) -> None:
    broker = dramaturg.bootstrap(embedded_settings)
    server = server_of(embedded_settings)

    assert broker.client.config_get("port") == {"port": "0"}
    mode = server.socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o700
    assert broker.client.config_get("appendonly") == {"appendonly": "yes"}


def test_the_default_data_file_is_under_the_project(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'shop'\n")

    result = run_cli([bin_path("dramaturg"), "send", 'default:echo:["x"]'], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".dramaturg" / "embedded.db.aof").is_file()


def wait_for_exit(pid: int, timeout: float = 10.0) -> bool:
    """Wait until process ``pid`` (not our child) has exited: its pidfd becomes readable."""
    import os
    import select

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        # A zombie nobody reaps yet counts as gone, as it does for the broker.
        return bool(readable) or not _process_exists(pid)
    finally:
        os.close(pidfd)


def test_a_forked_child_does_not_keep_the_parents_claim(embedded_settings: dramaturg.Settings) -> None:
    # Given a process using the server that forks a long-lived child (gunicorn --preload)
    import os

    dramaturg.bootstrap(embedded_settings)
    server_pid = server_of(embedded_settings).pid
    assert server_pid is not None
    release_read, release_write = os.pipe()
    child = os.fork()
    if child == 0:  # the child never uses the broker; it waits, then leaves without cleanup
        os.read(release_read, 1)
        os._exit(0)
    try:
        # When the parent closes while the child still runs
        dramaturg.shutdown()

        # Then the server stops: the child inherited no claim
        assert wait_for_exit(server_pid)
    finally:
        os.write(release_write, b"x")
        os.waitpid(child, 0)


def test_a_process_that_exits_without_closing_lets_the_server_stop(embedded_settings: dramaturg.Settings) -> None:
    # Given a worker-like process that uses the server and ends with os._exit (no atexit)
    script = textwrap.dedent(
        f"""
        import os, dramaturg
        dramaturg.bootstrap(dramaturg.Settings(broker={{"url": {embedded_settings.broker.url!r}}}))
        dramaturg.echo.send("left behind")
        print(dramaturg.get_broker().server.pid, flush=True)
        os._exit(0)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    server_pid = int(result.stdout.strip())

    # Then the server's watchdog stops it, and the message is still there on the next start
    assert wait_for_exit(server_pid), "the embedded server outlived its last user"
    broker = dramaturg.bootstrap(embedded_settings)
    assert pending_messages(broker, "default") == 1


def test_a_stale_pid_file_never_harms_another_process(embedded_settings: dramaturg.Settings) -> None:
    # Given a pid file left by a dead server whose pid now belongs to an unrelated process
    bystander = subprocess.Popen(["sleep", "30"])
    server = server_of(embedded_settings)
    server.path.parent.mkdir(parents=True)
    server.pid_path.write_text(str(bystander.pid))
    try:
        # When the broker starts and stops
        dramaturg.bootstrap(embedded_settings)
        assert server.pid not in (None, bystander.pid)
        dramaturg.shutdown()

        # Then the bystander was left alone
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_busy_server_is_waited_for_not_replaced(embedded_settings: dramaturg.Settings) -> None:
    import threading

    broker = dramaturg.bootstrap(embedded_settings)
    server = server_of(embedded_settings)
    server_pid = server.pid
    # Given the server is busy for 2 s (a long script: it answers nobody meanwhile)
    busy = threading.Thread(
        target=broker.client.eval,
        args=("local t = redis.call('TIME')[1] while redis.call('TIME')[1] - t < 2 do end return 1", 0),
    )
    busy.start()
    try:
        # When another process attaches meanwhile
        script = f"""
import dramaturg
dramaturg.bootstrap(dramaturg.Settings(broker={{"url": {embedded_settings.broker.url!r}}}))
print(dramaturg.get_broker().server.pid)
"""
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    finally:
        busy.join()

    # Then it waited and used the same server: no second server on the same file
    assert int(result.stdout.strip()) == server_pid
    assert server.pid == server_pid


def test_data_files_are_private(embedded_settings: dramaturg.Settings) -> None:
    dramaturg.bootstrap(embedded_settings)
    dramaturg.echo.send("secret payload")
    server = server_of(embedded_settings)

    for path in server.path.parent.iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    assert stat.S_IMODE(server.path.parent.stat().st_mode) == 0o700
