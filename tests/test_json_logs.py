"""--log-format json: every line a worker or a command writes is one JSON object, failure
lines carry what went wrong and what happens next, and passwords are masked in every field."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg.logs import JsonFormatter

from .conftest import Process, bin_path, free_port, run_cli

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "apps" / "observed_tasks.py"
ALWAYS = {"ts", "level", "logger", "message", "process", "thread"}


def parse_lines(output: str) -> list[dict[str, Any]]:
    """Each line of ``output`` as JSON: fails naming the first line that is not."""
    entries = []
    for line in output.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}\nin:\n{output}")
        assert isinstance(entry, dict), line
        assert entry.keys() >= ALWAYS, line
        assert datetime.fromisoformat(entry["ts"]).utcoffset() is not None and entry["ts"].endswith("Z"), line
        entries.append(entry)
    return entries


def raise_line() -> str:
    """``path:line`` of the raise in the failing test actor."""
    lines = APP.read_text().splitlines()
    [number] = [n for n, line in enumerate(lines, 1) if 'raise ValueError(f"row {row}: cannot reach' in line]
    return f"{APP}:{number}"


def test_a_worker_in_json_mode_writes_only_json_lines_and_says_what_failed_and_what_next(
    settings: dramaturg.Settings,
    broker: dramatiq.Broker,
    tmp_path: Path,
    spawn: Callable[..., Process],
    observed_project: Any,
) -> None:
    # Given a task that fails on every attempt (with a password in its error) and may retry once
    observed_tasks = observed_project
    message = observed_tasks.fails.send(7)

    # When a worker in json mode runs it until it is held, and stops
    port = free_port()
    argv = [bin_path("dramaturg"), "--log-format", "json", "worker", "-p", "1", "-t", "2", "--metrics-port", str(port)]
    worker = spawn(argv, PYTHONPATH=str(REPO))
    worker.wait_for_line("held: retries exhausted", timeout=60)
    worker.wait_for_line(f"serving http://127.0.0.1:{port}/metrics")
    assert worker.stop() == 0, worker.output

    # Then every line it wrote is a JSON object, Dramatiq's own lines too
    entries = parse_lines(worker.output)
    messages = {entry["message"]: entry for entry in entries}
    assert messages["Worker process is ready for action."]["logger"].startswith("dramatiq.WorkerProcess")
    assert any(m.startswith("Dramatiq ") and "is booting up" in m for m in messages)  # its main process
    assert messages[f"metrics server: serving http://127.0.0.1:{port}/metrics"]["logger"] == "dramaturg.metrics"
    # and what the handler logs carries the task's fields
    handler_lines = [entry for entry in entries if entry["logger"] == "tests.observed"]
    assert [(e["actor"], e["message_id"], e["queue"], e["attempt"]) for e in handler_lines] == [
        ("fails", message.message_id, "observed", 1),
        ("fails", message.message_id, "observed", 2),
    ]
    # and each failure is one line with its facts, the password masked in every field
    failures = [entry for entry in entries if entry["logger"] == "dramaturg.outcomes"]
    assert [(f["level"], f["attempt"]) for f in failures] == [("WARNING", 1), ("ERROR", 2)]
    for failure in failures:
        assert failure["actor"] == "fails"
        assert failure["message_id"] == message.message_id
        assert failure["queue"] == "observed"
        assert failure["max_attempts"] == 2
        assert failure["exception_type"] == "ValueError"
        assert failure["exception_message"] == "row 7: cannot reach smtp://mailer:***@mail.invalid/"
        assert failure["origin"] == raise_line()
        assert failure["traceback"].rstrip().endswith("ValueError: row 7: cannot reach smtp://mailer:***@mail.invalid/")
    retry, held = failures
    assert re.fullmatch(r"retrying in 10 ms \(at (\S+)\)", retry["next"])
    assert retry["next"].endswith(f"(at {retry['retry_at']})")
    # retry_at is when the retry was sent plus its 10 ms: at most that past the line's time
    # (written after), and not long before it (a line delayed behind busy threads may come
    # after the retry is due; in whole ms, so one more for rounding)
    ahead = datetime.fromisoformat(retry["retry_at"]) - datetime.fromisoformat(retry["ts"])
    assert timedelta(seconds=-1) < ahead <= timedelta(milliseconds=11), ahead
    assert held["next"] == "held: retries exhausted"
    assert "retry_at" not in held
    assert "hunter2" not in worker.output


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_dramatiqs_own_cli_logs_json_in_its_worker_processes(
    settings: dramaturg.Settings,
    broker: dramatiq.Broker,
    tmp_path: Path,
    spawn: Callable[..., Process],
    observed_project: Any,
) -> None:
    # Given json mode from the environment, and `dramatiq dramaturg.worker`
    observed_tasks = observed_project
    message = observed_tasks.fails.send(3)
    worker = spawn(
        [bin_path("dramatiq"), "dramaturg.worker", "-p", "1", "-t", "2"],
        PYTHONPATH=str(REPO),
        DRAMATURG_LOG_FORMAT="json",
    )

    # Then what its worker process logs is JSON (its main process is Dramatiq's: text)
    worker.wait_for_line("held: retries exhausted", timeout=60)
    worker.stop()
    worker_lines = [line for line in worker.lines if line.startswith("{")]
    entries = parse_lines("\n".join(worker_lines))
    assert "Worker process is ready for action." in {entry["message"] for entry in entries}
    [held] = [entry for entry in entries if entry.get("next") == "held: retries exhausted"]
    assert (held["message_id"], held["attempt"], held["origin"]) == (message.message_id, 2, raise_line())
    assert all("is booting up" in line or "Sending signal" in line for line in worker.lines if line not in worker_lines)


def test_a_command_in_json_mode_reports_its_error_as_json_with_the_password_masked(tmp_path: Path) -> None:
    # Given a config file choosing json, and a broker URL with a password where nothing listens
    port = free_port()
    (tmp_path / "dramaturg.toml").write_text(
        f'[broker]\nurl = "redis://:s3cret@127.0.0.1:{port}/0"\nconnect_timeout = "500ms"\n\n[log]\nformat = "json"\n'
    )

    # When a command cannot reach it
    result = run_cli([bin_path("dramaturg"), "config", "check"], cwd=tmp_path)

    # Then its one error line is JSON, with the exit code and the password masked
    assert result.returncode == 3
    [entry] = parse_lines(result.stderr)
    assert (entry["level"], entry["logger"], entry["exit_code"]) == ("ERROR", "dramaturg.cli", 3)
    assert f"redis://:***@127.0.0.1:{port}/0" in entry["message"]
    assert "s3cret" not in result.stderr

    # and --log-format text overrides the file
    result = run_cli([bin_path("dramaturg"), "--log-format", "text", "config", "check"], cwd=tmp_path)
    assert result.returncode == 3
    assert result.stderr.startswith("dramaturg: ") and "s3cret" not in result.stderr


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_drain_in_json_mode_logs_its_task_failures_as_json(
    settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path, observed_project: Any
) -> None:
    # Given a task that fails twice, with a password in its error
    observed_tasks = observed_project
    message = observed_tasks.fails.send(5)

    # When `dramaturg --log-format json drain` runs it
    result = run_cli(
        [bin_path("dramaturg"), "--log-format", "json", "drain", "observed", "--until-empty", "--budget", "60s"],
        cwd=tmp_path,
        PYTHONPATH=str(REPO),
    )

    # Then its summary is on stdout, and stderr holds its two failure lines as JSON, masked
    assert result.returncode == 0, result.stderr
    assert "1 held" in result.stdout
    entries = [entry for entry in parse_lines(result.stderr) if entry["logger"] == "dramaturg.outcomes"]
    assert [(e["attempt"], e["next"].split(" (at ")[0]) for e in entries] == [
        (1, "retrying in 10 ms"),
        (2, "held: retries exhausted"),
    ]
    assert {e["message_id"] for e in entries} == {message.message_id}
    assert {e["exception_message"] for e in entries} == {"row 5: cannot reach smtp://mailer:***@mail.invalid/"}
    assert "hunter2" not in result.stderr


def test_the_json_formatter_masks_every_field_and_adds_extras() -> None:
    # Given a logger writing JSON to a buffer (pure formatting: no broker involved)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        # When lines carry a password in the message, an extra field and a traceback
        logger.warning("connecting to %s", "amqp://shop:pw1@mq/")
        logger.warning("import done", extra={"rows": 3, "source": "redis://:pw2@cache/0", "tags": ["x"]})
        try:
            raise ConnectionError("lost amqp://shop:pw3@mq/")
        except ConnectionError:
            logger.exception("gave up")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True

    # Then each line is JSON, every password masked, extras kept with their types
    first, second, third = parse_lines(stream.getvalue())
    assert first["message"] == "connecting to amqp://shop:***@mq/"
    assert (second["rows"], second["source"], second["tags"]) == (3, "redis://:***@cache/0", ["x"])
    assert third["traceback"].rstrip().endswith("ConnectionError: lost amqp://shop:***@mq/")
    assert not re.search(r"pw\d", stream.getvalue())


def test_log_format_is_a_setting(tmp_path: Path) -> None:
    assert dramaturg.Settings().log.format == "text"
    (tmp_path / "dramaturg.toml").write_text('[log]\nformat = "xml"\n')
    result = run_cli([bin_path("dramaturg"), "config", "show"], cwd=tmp_path)
    assert result.returncode == 78
    assert "log.format: unknown 'xml'; choose one of text, json" in result.stderr
