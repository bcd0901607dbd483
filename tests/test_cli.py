"""The dramaturg and dramatiq command lines, run as a user runs them, on real brokers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import dramatiq
import pytest

import dramaturg

from .conftest import Process, bin_path, pending_messages, run_cli, write_config

REPO = Path(__file__).resolve().parents[1]
READY = "Worker process is ready for action."
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

WORKER_COMMANDS = {
    "dramaturg worker": [bin_path("dramaturg"), "worker", "--processes", "1", "--threads", "2"],
    "dramatiq dramaturg.worker": [bin_path("dramatiq"), "dramaturg.worker", "--processes", "1", "--threads", "2"],
}


@pytest.mark.parametrize("command", WORKER_COMMANDS)
def test_a_worker_cli_processes_a_sent_message_and_stops_cleanly_on_sigterm(
    command: str,
    settings: dramaturg.Settings,
    broker: dramatiq.Broker,
    tmp_path: Path,
    spawn: Callable[..., Process],
) -> None:
    # Given a project whose dramaturg.toml names the broker and the actor module
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])

    # When a worker is started through the CLI
    worker = spawn(WORKER_COMMANDS[command], PYTHONPATH=str(REPO))
    worker.wait_for_line(READY)

    # and a message is sent through the CLI
    sent = run_cli(
        [bin_path("dramaturg"), "send", 'imports:import_user:{"row": {"id": 42}, "notify": true}'],
        cwd=tmp_path,
        PYTHONPATH=str(REPO),
    )
    assert sent.returncode == 0, sent.stderr
    assert UUID.match(sent.stdout.strip()), sent.stdout

    # Then the worker runs the handler with those arguments
    worker.wait_for_line("imported 42 notify=True")

    # and SIGTERM stops it with exit code 0, leaving nothing unacked behind
    assert worker.stop() == 0, worker.output
    assert "Worker has been shut down." in worker.output
    assert pending_messages(broker, "imports") == 0


@pytest.mark.parametrize("broker_kind", ["redis", "rabbitmq"])
@pytest.mark.parametrize("command", WORKER_COMMANDS)
def test_a_worker_process_reads_the_configured_settings_without_importing_pydantic(
    command: str,
    settings: dramaturg.Settings,
    broker: dramatiq.Broker,
    tmp_path: Path,
    spawn: Callable[..., Process],
) -> None:
    # Given a dramaturg.toml with a time to run, a queue's own and the actor module,
    # and a variable setting the retries
    config = write_config(tmp_path, settings, modules=["tests.apps.settings_probe"])
    config.write_text(config.read_text() + '\n[tasks]\nttr = "90s"\n\n[queues.imports]\nttr = "2m"\n')

    # When a worker started through the CLI runs a task that reports what its process sees
    worker = spawn(WORKER_COMMANDS[command], PYTHONPATH=str(REPO), DRAMATURG_RETRIES_MAX_RETRIES="7")
    worker.wait_for_line(READY)
    sent = run_cli([bin_path("dramaturg"), "send", "probes:report_settings:[]"], cwd=tmp_path, PYTHONPATH=str(REPO))
    assert sent.returncode == 0, sent.stderr

    # Then it has the configured settings and where each came from, and no pydantic (~10 MB)
    worker.wait_for_line(
        f"pydantic imported: False; tasks.ttr 90000 from {config.resolve()}; queues.imports.ttr 120000;"
        " retries.max_retries 7 from env DRAMATURG_RETRIES_MAX_RETRIES"
    )
    assert worker.stop() == 0, worker.output


@pytest.mark.parametrize("broker_kind", ["redis"])
@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ('imports:import_user:{"row": {"id": 1}', "JSON_ARGS is not valid JSON: Expecting ',' delimiter"),
        ('imports:import_usr:[{"id": 1}]', "unknown actor 'import_usr'; did you mean 'import_user'?"),
        ('import:import_user:[{"id": 1}]', "unknown queue 'import'; did you mean 'imports'?"),
        (
            "imports:import_user:[]",
            "arguments do not fit import_user(row: 'dict[str, object]', *, notify: 'bool' = False)"
            ": missing a required argument: 'row'",
        ),
        ('imports:import_user:"row"', "JSON_ARGS must be an array of positional arguments or an object"),
        ("imports-import_user", "expected QUEUE:ACTOR:JSON_ARGS"),
    ],
)
def test_send_refuses_bad_input_and_sends_nothing(
    spec: str, error: str, settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path
) -> None:
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])

    result = run_cli([bin_path("dramaturg"), "send", spec], cwd=tmp_path, PYTHONPATH=str(REPO))

    assert result.returncode == 2
    assert error in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert pending_messages(broker, "imports") == 0


def test_send_to_the_builtin_echo_actor(settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path) -> None:
    write_config(tmp_path, settings)

    result = run_cli([bin_path("dramaturg"), "send", "--json", 'default:echo:["hello"]'], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["queue"] == "default" and answer["actor"] == "echo"
    assert UUID.match(answer["message_id"])
    assert pending_messages(broker, "default") == 1


def test_config_show_lists_every_setting_with_its_source_and_masks_secrets(tmp_path: Path) -> None:
    (tmp_path / "dramaturg.toml").write_text('[broker]\nurl = "amqp://shop:hunter2@mq.internal:5672/%2F"\n')

    table = run_cli([bin_path("dramaturg"), "config", "show"], cwd=tmp_path, DRAMATURG_WORKER_THREADS="3")
    as_json = run_cli([bin_path("dramaturg"), "config", "show", "--json"], cwd=tmp_path)

    assert table.returncode == 0, table.stderr
    assert "hunter2" not in table.stdout + as_json.stdout
    assert re.search(r"broker\.url\s+\"amqp://shop:\*\*\*@mq.internal:5672/%2F\"\s+.*dramaturg\.toml", table.stdout)
    assert re.search(r"broker\.type\s+\"rabbitmq\"\s+derived from broker\.url", table.stdout)
    assert re.search(r"worker\.threads\s+3\s+env DRAMATURG_WORKER_THREADS", table.stdout)
    shown = json.loads(as_json.stdout)["settings"]
    assert shown["broker.url"]["value"] == "amqp://shop:***@mq.internal:5672/%2F"
    assert shown["broker.confirm_delivery"] == {"value": True, "source": "default"}


def test_config_check_reports_latency(broker_kind: str, settings: dramaturg.Settings, tmp_path: Path) -> None:
    write_config(tmp_path, settings)

    result = run_cli([bin_path("dramaturg"), "config", "check", "--json"], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["ok"] is True and answer["type"] == broker_kind
    assert answer["latency_ms"] > 0


@pytest.mark.parametrize(
    "url",
    ["redis://:hunter2@127.0.0.1:1/0", "amqp://shop:hunter2@127.0.0.1:1/%2F"],
    ids=["redis", "rabbitmq"],
)
def test_an_unreachable_broker_is_exit_code_3_with_the_url_masked(url: str, tmp_path: Path) -> None:
    (tmp_path / "dramaturg.toml").write_text(f'[broker]\nurl = "{url}"\nconnect_timeout = "2s"\n')
    masked = url.replace("hunter2", "***")

    check = run_cli([bin_path("dramaturg"), "config", "check"], cwd=tmp_path)
    worker = run_cli([bin_path("dramaturg"), "worker", "-p", "1"], cwd=tmp_path)
    dramatiq_worker = run_cli([bin_path("dramatiq"), "dramaturg.worker", "-p", "1"], cwd=tmp_path)

    for result in (check, worker, dramatiq_worker):
        assert result.returncode == 3, result.stdout + result.stderr
        assert "hunter2" not in result.stdout + result.stderr
        assert f"cannot reach {'Redis' if 'redis' in url else 'RabbitMQ'} at {masked}" in result.stderr


def test_a_worker_with_bad_configuration_exits_78_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "dramaturg.toml").write_text("[broker]\ntype = 'rabit'\n")

    for argv in ([bin_path("dramaturg"), "worker"], [bin_path("dramatiq"), "dramaturg.worker", "-p", "1"]):
        result = run_cli(argv, cwd=tmp_path)
        assert result.returncode == 78, result.stderr
        assert "broker.type: unknown 'rabit'; did you mean 'rabbitmq'?" in result.stderr


@pytest.mark.parametrize(
    ("config", "expected", "code"),
    [
        ('[broker]\nurl = "amqp://guest:hunter2@127.0.0.1:5672/%2F?heartbeat=often"\n', "not a valid AMQP URL", 78),
        ('[broker]\ntype = "stub"\n\n[worker]\nmodules = ["no_such_module"]\n', "cannot import 'no_such_module'", 78),
    ],
    ids=["bad amqp url", "missing actor module"],
)
def test_send_explains_a_broken_setup_in_one_line(config: str, expected: str, code: int, tmp_path: Path) -> None:
    (tmp_path / "dramaturg.toml").write_text(config)

    result = run_cli([bin_path("dramaturg"), "send", 'default:echo:["x"]'], cwd=tmp_path)

    assert result.returncode == code, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr
