"""The deployment recipes of deploy/, the files the Operating pages show: the supervisord
program run for real (a worker stopped in the middle of a burst loses nothing, and only
the tasks it interrupted run again), the systemd unit checked by systemd-analyze, the
compose file by the Compose Specification's schema, and the stop timeouts of all three
tied to worker.shutdown_timeout."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg.durations import parse_ms

from .conftest import IN_CI, WAIT_S, Process, bin_path, poll_until, write_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROGRAM = "program:dramaturg-worker"
#: The margin the recipes leave above worker.shutdown_timeout before a kill.
MARGIN_S = 60


def recipe_shutdown_s() -> int:
    settings = tomllib.loads((DEPLOY / "dramaturg.toml").read_text())
    return parse_ms(settings["worker"]["shutdown_timeout"]) // 1000


def supervisor_program() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=None)
    parser.read(DEPLOY / "supervisor" / "dramaturg-worker.conf")
    return parser[PROGRAM]


def systemd_service() -> dict[str, str]:
    text = (DEPLOY / "systemd" / "dramaturg-worker.service").read_text()
    return dict(re.findall(r"^(\w+)=(.*)$", text, re.M))


def test_the_stop_timeouts_leave_running_tasks_their_shutdown_timeout() -> None:
    # Given worker.shutdown_timeout in the recipes' dramaturg.toml
    limit = recipe_shutdown_s() + MARGIN_S

    # Then systemd, supervisord and compose wait that long plus a minute before a kill,
    # and signal the way the worker expects
    service = systemd_service()
    assert (service["KillMode"], service["KillSignal"], int(service["TimeoutStopSec"])) == ("mixed", "SIGTERM", limit)
    assert service["Restart"] == "always" and service["RestartPreventExitStatus"].split() == ["2", "78"]
    program = supervisor_program()
    assert (program["stopsignal"], program["stopasgroup"], program["killasgroup"]) == ("TERM", "true", "true")
    assert int(program["stopwaitsecs"]) == limit
    compose = (DEPLOY / "container" / "compose.yaml").read_text()
    assert f"stop_grace_period: {limit // 60}m" in compose
    assert "stop_signal: SIGTERM" in compose


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit was not verified")
    # Given the unit with this machine's paths and user (verify checks that they exist)
    unit = (DEPLOY / "systemd" / "dramaturg-worker.service").read_text()
    unit = unit.replace("/srv/app/.venv/bin/dramaturg", bin_path("dramaturg")).replace("/srv/app", str(tmp_path))
    unit = re.sub(r"^(User|Group)=app$", r"\1=root", unit, flags=re.M)
    path = tmp_path / "dramaturg-worker.service"
    path.write_text(unit)

    # Then systemd-analyze finds nothing to say
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_the_compose_file_follows_the_compose_specification() -> None:
    checker = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "container" / "compose.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- the supervisord recipe, run for real ---------------------------------------------

TASKS = textwrap.dedent(
    """
    import os
    import time

    import dramaturg

    LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs.log")


    def note(line: str) -> None:
        with open(LOG, "a") as log:  # one short append per line: whole lines from every process
            log.write(line + "\\n")


    @dramaturg.actor(queue_name="burst")
    def record(n: int) -> None:
        note(f"start {n}")
        for _ in range(TICKS):  # short sleeps: a shutdown interrupt lands between them
            time.sleep(0.05)
        note(f"done {n}")
    """
)
SENT = 32
THREADS = 4
TICKS = 20  # 1 s a task: longer than the test's shutdown_timeout, so a stop interrupts


def runs(path: Path) -> tuple[Counter[int], Counter[int]]:
    """How often each task started, and how often it finished."""
    starts: Counter[int] = Counter()
    done: Counter[int] = Counter()
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines():
        event, n = line.split()
        (starts if event == "start" else done)[int(n)] += 1
    return starts, done


@pytest.fixture
def supervisord(tmp_path: Path, spawn: Callable[..., Process]) -> Any:
    """``supervisord -n`` of this test, on a unix socket in tmp_path, running the recipe's
    program (its paths and user replaced by this machine's); ``ctl(*args)`` runs
    supervisorctl against it. Stopped by pid (SIGTERM) at the end."""
    binary = shutil.which("supervisord")
    if binary is None:
        message = "supervisor is not installed (apt-get install -y supervisor)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    socket = tmp_path / "supervisor.sock"
    program = supervisor_program()
    program["command"] = f"{bin_path('dramaturg')} worker --processes 2 --threads {THREADS // 2}"
    program["directory"] = str(tmp_path)
    program["environment"] = f'DRAMATURG_CONFIG="{tmp_path / "dramaturg.toml"}",PYTHONPATH="{tmp_path}"'
    program["stdout_logfile"] = str(tmp_path / "worker.log")
    program["autostart"] = "false"
    program["startsecs"] = "1"  # the recipe waits 5 s to call a start a success
    del program["user"]  # the test's own user
    config = configparser.ConfigParser(interpolation=None)
    config.read_dict(
        {
            "unix_http_server": {"file": str(socket), "chmod": "0700"},
            "supervisord": {
                "logfile": str(tmp_path / "supervisord.log"),
                "pidfile": str(tmp_path / "supervisord.pid"),
                "childlogdir": str(tmp_path),
            },
            "rpcinterface:supervisor": {
                "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"
            },
            "supervisorctl": {"serverurl": f"unix://{socket}"},
            PROGRAM: dict(program),
        }
    )
    path = tmp_path / "supervisord.conf"
    with path.open("w") as file:
        config.write(file)
    process = spawn([binary, "-c", str(path), "-n"])

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["supervisorctl", "-c", str(path), *args], capture_output=True, text=True, timeout=120, check=False
        )

    poll_until(lambda: ctl("status").returncode in {0, 3}, "supervisord to answer on its socket", timeout=WAIT_S)
    yield ctl
    process.stop()  # SIGTERM: supervisord stops its program as the recipe says, then exits


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_supervisorctl_stop_in_a_burst_loses_nothing_and_start_finishes_it(
    broker_kind: str, settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path, supervisord: Any
) -> None:
    # Given a project whose task records each start and end in runs.log, run by the
    # supervisord recipe's program with worker.shutdown_timeout 0.5 s
    (tmp_path / "burst_tasks.py").write_text(TASKS.replace("TICKS", str(TICKS)))
    config = write_config(tmp_path, settings, modules=["burst_tasks"])
    config.write_text(config.read_text() + 'shutdown_timeout = "500ms"\n')
    log = tmp_path / "runs.log"

    @dramaturg.actor(queue_name="burst")
    def record(n: int) -> None: ...

    # When a burst is sent, and the program is stopped with supervisorctl in its middle
    assert supervisord("start", "dramaturg-worker").returncode == 0, supervisord("status").stdout
    for n in range(SENT):
        record.send(n)
    poll_until(lambda: sum(runs(log)[1].values()) >= THREADS, "a first round of tasks to finish", timeout=WAIT_S)
    stopped = supervisord("stop", "dramaturg-worker")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "STOPPED" in supervisord("status", "dramaturg-worker").stdout

    # Then nothing is lost: each task finished once or waits on the queue again
    starts, done = runs(log)
    row = dramaturg.queue_stats(["burst"], broker)[0]
    assert (row.in_flight, row.delayed) == (0, 0)
    assert all(count == 1 for count in done.values())
    assert len(done) + row.ready == SENT
    interrupted = set(starts) - set(done)
    assert 0 < len(done) < SENT
    assert interrupted  # the tasks outlast the shutdown timeout: those running were interrupted

    # and supervisorctl start finishes the rest, running again only the interrupted ones
    assert supervisord("start", "dramaturg-worker").returncode == 0
    poll_until(lambda: len(runs(log)[1]) == SENT, f"all {SENT} tasks to finish", timeout=60)
    starts, done = runs(log)
    assert all(count == 1 for count in done.values())
    assert {n for n, count in starts.items() if count > 1} == interrupted
    assert "runs again: it was interrupted when a worker stopped" in (tmp_path / "worker.log").read_text()
