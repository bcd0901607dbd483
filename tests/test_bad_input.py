"""Bad input and bad configuration, run as a user runs the commands: one line naming the
problem, a named exit code (2 bad input, 3 broker unreachable, 78 configuration), never a
traceback, never a password."""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import dramatiq
import pytest

import dramaturg
from dramaturg.cli import common, drain, send, stats
from dramaturg.errors import UsageError

from .conftest import bin_path, cli_env, pending_messages, run_cli, write_config

REPO = Path(__file__).resolve().parents[1]


def one_line_error(result: subprocess.CompletedProcess[str], code: int, expected: str) -> str:
    """The command failed with ``code`` and one line holding ``expected``, no traceback.

    Under ``dramatiq dramaturg.worker``, Dramatiq's main process adds lines of its own
    around it (booting up, a worker exited): there, the line is among them.
    """
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.args[:2] == [bin_path("dramatiq"), "dramaturg.worker"]:
        lines = [line for line in lines if "[dramatiq.MainProcess]" not in line]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], result.stderr
    return lines[0]


# -- send -----------------------------------------------------------------------------------


@pytest.mark.parametrize("broker_kind", ["redis"])
@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("[" + "9" * 5_000 + "]", "JSON_ARGS is not valid JSON: an integer of more than 4300 digits"),
        ("[" * 5_000 + "]" * 5_000, "JSON_ARGS is not valid JSON: nested deeper than"),
    ],
    ids=["huge integer", "deep nesting"],
)
def test_send_refuses_json_it_cannot_read_with_exit_2(
    payload: str, expected: str, settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path
) -> None:
    write_config(tmp_path, settings)

    result = run_cli([bin_path("dramaturg"), "send", f"default:echo:{payload}"], cwd=tmp_path)

    one_line_error(result, 2, expected)
    assert pending_messages(broker, "default") == 0


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["config", "show"], ["send", 'default:echo:["x"]'], ["worker", "-p", "1"]])
def test_a_config_file_with_a_byte_that_is_not_utf8_is_exit_78(command: list[str], tmp_path: Path) -> None:
    (tmp_path / "dramaturg.toml").write_bytes(b"[broker]\ntype = 'stub'\nnamespace = 'caf\xe9'\n")

    result = run_cli([bin_path("dramaturg"), *command], cwd=tmp_path)

    one_line_error(result, 78, "dramaturg.toml: not valid TOML: byte 0xe9 on line 3 is not UTF-8")


@pytest.mark.parametrize(
    "command",
    [
        [bin_path("dramaturg"), "send", 'default:echo:["x"]'],
        [bin_path("dramaturg"), "config", "show"],
        [bin_path("dramatiq"), "dramaturg.worker", "-p", "1"],
    ],
    ids=["send", "config show", "dramatiq dramaturg.worker"],
)
@pytest.mark.parametrize(
    ("state_url", "expected"),
    [
        ("redis://cache:port/0", "state.url: not a valid URL: its host or port does not parse"),
        ("cache:6379", "state.url: not a Redis URL"),
        ("redis://:hunter/2@cache:6379/0", "state.url: not a valid URL: its user or password holds a character"),
    ],
    ids=["bad port", "no scheme", "password with a slash"],
)
def test_an_unparsable_state_url_is_exit_78_at_load(
    command: list[str], state_url: str, expected: str, tmp_path: Path
) -> None:
    (tmp_path / "dramaturg.toml").write_text(f'[broker]\nurl = "stub://"\n\n[state]\nurl = "{state_url}"\n')

    result = run_cli(command, cwd=tmp_path)

    one_line_error(result, 78, expected)
    assert "hunter" not in result.stdout + result.stderr


@pytest.mark.parametrize("value", ["0", "'0s'"])
def test_a_connect_timeout_of_zero_is_refused_at_load(value: str, tmp_path: Path) -> None:
    (tmp_path / "dramaturg.toml").write_text(f"[broker]\nurl = 'redis://127.0.0.1:1/0'\nconnect_timeout = {value}\n")

    result = run_cli([bin_path("dramaturg"), "config", "check"], cwd=tmp_path)

    one_line_error(result, 78, "broker.connect_timeout: 0 is not valid: Input should be greater than 0")


@pytest.mark.parametrize(
    "url",
    ["amqp://shop:s3c/r3t@mq.internal:5672/%2F", "redis://:s3c?r3t@cache:6379/0", "amqps://shop:s3c#r3t@mq/"],
)
@pytest.mark.parametrize("command", [["config", "show"], ["config", "check"], ["send", 'default:echo:["x"]']])
def test_a_password_that_breaks_its_url_is_never_shown(url: str, command: list[str], tmp_path: Path) -> None:
    # Given a password holding '/', '?' or '#', not percent-encoded: a URL parser would
    # take part of it for the port, the path or the query
    (tmp_path / "dramaturg.toml").write_text(f'[broker]\nurl = "{url}"\n')

    result = run_cli([bin_path("dramaturg"), *command], cwd=tmp_path)

    one_line_error(result, 78, "broker.url: not a valid URL: its user or password holds a character")
    assert "s3c" not in result.stdout + result.stderr
    assert "r3t" not in result.stdout + result.stderr


def test_config_show_masks_a_percent_encoded_password(tmp_path: Path) -> None:
    (tmp_path / "dramaturg.toml").write_text('[broker]\nurl = "amqp://shop:s3c%2Fr3t%3F@mq.internal:5672/%2F"\n')

    result = run_cli([bin_path("dramaturg"), "config", "show", "--json"], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "s3c" not in result.stdout and "r3t" not in result.stdout
    assert "amqp://shop:***@mq.internal:5672/%2F" in result.stdout


# -- the broker -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["config", "check"],
        ["send", 'default:echo:["x"]'],
        ["stats"],
        ["held", "list"],  # no queue to look at: it must still ask, not say "no held tasks"
        ["held", "kick", "default", "--all"],
        ["drain", "default", "--budget", "1s"],  # asks first: not a worker's wall of reconnecting lines
    ],
)
@pytest.mark.parametrize("problem", ["wrong password", "closed port"])
def test_rabbitmq_refusing_or_absent_is_one_masked_line(
    command: list[str], problem: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server = request.getfixturevalue("rabbitmq_server")
    if problem == "wrong password":
        url, reason = f"amqp://guest:hunter2@{server.host}:{server.port}/%2F", "authentication failed"
    else:
        url, reason = "amqp://guest:hunter2@127.0.0.1:1/%2F", "Connection refused"
    (tmp_path / "dramaturg.toml").write_text(f'[broker]\nurl = "{url}"\nconnect_timeout = "2s"\n')

    result = run_cli([bin_path("dramaturg"), *command], cwd=tmp_path)

    line = one_line_error(result, 3, reason)
    assert f"cannot reach RabbitMQ at {url.replace('hunter2', '***')}" in line
    assert "hunter2" not in result.stdout + result.stderr


# -- drain ----------------------------------------------------------------------------------


@pytest.mark.parametrize("broker_kind", ["redis"])
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["imports", "--budget", "abc"], "--budget: 'abc' is not a duration"),
        (["imports", "--budget", "1s", "--grace", "soon"], "--grace: 'soon' is not a duration"),
        (["imports", "--budget", "1s", "--threads", "0"], "--threads must be at least 1, got 0"),
        (["imprts", "--budget", "1s"], "unknown queue 'imprts'; did you mean 'imports'?"),
    ],
    ids=["budget", "grace", "threads", "unknown queue"],
)
def test_drain_refuses_bad_arguments_with_exit_2(
    argv: list[str], expected: str, settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path
) -> None:
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])

    result = run_cli([bin_path("dramaturg"), "drain", *argv], cwd=tmp_path, PYTHONPATH=str(REPO))

    one_line_error(result, 2, expected)
    assert result.stdout == ""


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_drain_of_a_fresh_project_runs_the_builtin_echo_as_a_worker_does(
    settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path
) -> None:
    # Given a project with no worker.modules, and an echo task sent to it
    write_config(tmp_path, settings)
    sent = run_cli([bin_path("dramaturg"), "send", 'default:echo:["hello"]'], cwd=tmp_path)
    assert sent.returncode == 0, sent.stderr

    # When its queue is drained, then the echo ran: "default" is a queue of a declared actor there
    result = run_cli([bin_path("dramaturg"), "drain", "default", "--until-empty", "--budget", "30s"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 processed" in result.stdout
    assert pending_messages(broker, "default") == 0


# -- usage errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mistake", "expected"),
    [
        (lambda: common.duration_ms("soon", "--delay"), "--delay: 'soon' is not a duration"),
        (lambda: send.parse_spec("imports"), "expected QUEUE:ACTOR:JSON_ARGS"),
        (lambda: send.parse_spec("imports:import_user:[1,"), "JSON_ARGS is not valid JSON"),
        (lambda: drain.run(argparse.Namespace(budget="1s", grace="30s", threads=0)), "--threads must be at least 1"),
        (lambda: stats.run(argparse.Namespace(watch="10ms")), "--watch: '10ms' is 10 ms, under 100 ms"),
    ],
    ids=["delay", "spec", "json args", "threads", "watch"],
)
def test_a_command_line_mistake_is_a_usage_error_not_a_send_error(mistake: Callable[[], object], expected: str) -> None:
    # When a command is given an option or argument it cannot use (before it loads anything)
    with pytest.raises(UsageError) as raised:
        mistake()

    # Then it is a usage error (exit 2, as `dramaturg` maps it), not a message that could not be sent
    assert expected in str(raised.value)
    assert isinstance(raised.value, dramaturg.DramaturgError)
    assert not isinstance(raised.value, dramaturg.SendError)


# -- found by a hunt for tracebacks (2026-12-03) ----------------------------------------------


def usage_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    """argparse's own usage error: its usage, then one line naming the problem; exit 2."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert expected in result.stderr.splitlines()[-1], result.stderr


@pytest.mark.parametrize("broker_kind", ["redis"])
@pytest.mark.parametrize(
    ("configured", "argument", "code", "expected"),
    [
        # Raised while it ran (a database not answering yet): 1, which deploy/'s units restart
        (
            [],
            "raiser",
            1,
            "importing 'raiser' failed: RuntimeError: cannot reach redis://u:***@h:1 (a MODULE argument)",
        ),
        (
            ["raiser"],
            None,
            1,
            "worker.modules: importing 'raiser' failed: RuntimeError: cannot reach redis://u:***@h:1",
        ),
        # Cannot be imported, the same at every try: 2 or 78, which they do not
        ([], "broken", 2, "importing 'broken' failed: SyntaxError:"),
        (["nosuch"], None, 78, "worker.modules: cannot import 'nosuch': No module named 'nosuch'"),
    ],
    ids=["raises, argument", "raises, worker.modules", "syntax error, argument", "missing, worker.modules"],
)
def test_a_worker_whose_actor_module_fails_to_import_is_one_masked_line(
    configured: list[str],
    argument: str | None,
    code: int,
    expected: str,
    settings: dramaturg.Settings,
    broker: dramatiq.Broker,
    tmp_path: Path,
) -> None:
    # Given an actor module that raises with a password in its message, or does not parse
    (tmp_path / "raiser.py").write_text('raise RuntimeError("cannot reach redis://u:s3cr3t@h:1")\n')
    (tmp_path / "broken.py").write_text("def handler(:\n")
    write_config(tmp_path, settings, **({"modules": configured} if configured else {}))

    # When a worker is started with it
    argv = [bin_path("dramaturg"), "worker", "-p", "1", "-t", "1", *([argument] if argument else [])]
    result = run_cli(argv, cwd=tmp_path)

    # Then it is one line, masked, before any worker process starts (not a traceback from each)
    one_line_error(result, code, expected)
    assert "s3cr3t" not in result.stdout + result.stderr


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_a_worker_checks_its_modules_with_the_settings_it_was_given(
    settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path
) -> None:
    # Given a config file where the worker starts and another given with --config, and a
    # module that looks at the settings as it is imported (then raises, to say what it saw)
    write_config(tmp_path, settings)
    (tmp_path / "deploy").mkdir()
    given = write_config(tmp_path / "deploy", settings)
    given.write_text(given.read_text().replace(settings.broker.namespace, "from-the-config-flag"))
    (tmp_path / "checks.py").write_text(
        "import dramaturg\nraise RuntimeError('namespace ' + dramaturg.get_broker().namespace)\n"
    )

    # When a worker is started with --config
    argv = [bin_path("dramaturg"), "--config", "deploy/dramaturg.toml", "worker", "-p", "1", "checks"]
    result = run_cli(argv, cwd=tmp_path)

    # Then the module saw the settings of --config (as a worker process would), not the file found
    one_line_error(result, 1, "RuntimeError: namespace from-the-config-flag (a MODULE argument)")


@pytest.mark.parametrize(
    ("argv", "env", "code", "expected"),
    [
        (["send", 'default:echo:["x"]', "--delay", "9" * 400 + "s"], {}, 2, "--delay: a duration can be at most"),
        (["config", "show"], {"DRAMATURG_TASKS_TTR": "99999999999999d"}, 78, "tasks.ttr: '99999999999999d' is not"),
        (["stats", "--watch", "99999999999999d"], {}, 2, "--watch: a duration can be at most 36500d (100 years)"),
    ],
    ids=["--delay", "tasks.ttr", "--watch"],
)
def test_a_duration_past_100_years_is_refused_in_one_line(
    argv: list[str], env: dict[str, str], code: int, expected: str, tmp_path: Path
) -> None:
    (tmp_path / "dramaturg.toml").write_text('[broker]\nurl = "stub://"\n')

    result = run_cli([bin_path("dramaturg"), *argv], cwd=tmp_path, **env)

    one_line_error(result, code, expected)


@pytest.mark.parametrize(
    ("config", "env"),
    [
        ('[broker]\nurl = "stub://"\n', {"DRAMATURG_BROKER_MANAGEMENT_URL": "admin:s3cr3t@mq:15672"}),
        ('[broker]\nurl = "stub://"\n\n[dashboard]\ntoken = 5318008\n', {}),
        ('[broker]\nurl = "stub://"\n\n[dashboard]\ntoken = ["s3cr3t"]\n', {}),
    ],
    ids=["management url without a scheme", "a number for a token", "a list for a token"],
)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_bad_secret_setting_is_named_and_never_quoted(
    config: str, env: dict[str, str], log_format: str, tmp_path: Path
) -> None:
    (tmp_path / "dramaturg.toml").write_text(config)

    result = run_cli([bin_path("dramaturg"), "--log-format", log_format, "config", "show"], cwd=tmp_path, **env)

    one_line_error(result, 78, "its value (not shown: it may hold a secret) is not valid")
    assert "s3cr3t" not in result.stdout + result.stderr and "5318008" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["config", "show"], "pyproject.toml: [tool] must be a table, not int"),
        (["--config", "~nosuchuser/dramaturg.toml", "config", "show"], "config file cannot be used:"),
        (["--config", "x" * 300 + ".toml", "config", "show"], "config file cannot be used: File name too long"),
        (["--config", ".", "config", "show"], "config file is not a file:"),
    ],
    ids=["tool not a table", "unknown user", "name too long", "a directory"],
)
def test_a_config_path_that_cannot_be_read_is_exit_78(argv: list[str], expected: str, tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("tool = 5\n")

    result = run_cli([bin_path("dramaturg"), *argv], cwd=tmp_path)

    one_line_error(result, 78, expected)


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_output_to_a_reader_that_went_away_ends_without_a_traceback(buffered: bool, tmp_path: Path) -> None:
    # Given a reader that went away before the command writes (| head -c0): a pipe whose
    # read end is closed; stdout buffered as in a terminal's pipe (what it writes goes out at
    # the end), or not
    (tmp_path / "dramaturg.toml").write_text('[broker]\nurl = "stub://"\n')
    env = {k: v for k, v in cli_env().items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [bin_path("dramaturg"), "config", "show"],
            cwd=tmp_path,
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)

    # Then the command stops quietly, failed
    assert (result.returncode, result.stderr) == (1, "")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["held", "list", "--limit", "0"], "argument --limit: expected 1 to 1,000,000, got 0"),
        (["held", "list", "--offset", "-1"], "argument --offset: expected 0 to"),
        (["batch", "list", "--limit", "1" + "0" * 20], "argument --limit: expected 1 to 1,000,000"),
        (["send", "echo", "--file", "rows.jsonl", "--priority", "1" + "0" * 23], "argument --priority: expected -9,"),
        (["send", "echo", "--file", "rows.jsonl", "--chunk-size", "1" + "0" * 23], "argument --chunk-size: expected 1"),
        (["worker", "--processes", "-1"], "argument --processes/-p: expected 1 to 1,024, got -1"),
        (["worker", "--threads", "0"], "argument --threads/-t: expected 1 to 1,024, got 0"),
        (["worker", "--metrics-port", "70000"], "argument --metrics-port: expected 1 to 65,535, got 70000"),
        (["held", "list", "--limit", "\u00b2"], "argument --limit: expected a whole number, got '\u00b2'"),
    ],
)
def test_a_count_out_of_its_range_is_a_usage_error(argv: list[str], expected: str, tmp_path: Path) -> None:
    (tmp_path / "dramaturg.toml").write_text('[broker]\nurl = "redis://127.0.0.1:1/0"\n')

    usage_error(run_cli([bin_path("dramaturg"), *argv], cwd=tmp_path), expected)
