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
    assert not _process_exists(first_pid)
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
    assert not _process_exists(pid)


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
