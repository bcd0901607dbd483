"""`dramaturg send ACTOR --file`: rows streamed from JSONL or CSV, bad rows reported by
line, the good ones sent; against RabbitMQ, Redis and embedded, run as a user runs it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import dramaturg

from .conftest import bin_path, pending_messages, run_cli, write_config

REPO = Path(__file__).resolve().parents[1]


def send(tmp_path: Path, *argv: str, **env: str) -> tuple[int, str, str]:
    result = run_cli([bin_path("dramaturg"), "send", *argv], cwd=tmp_path, PYTHONPATH=str(REPO), timeout=120, **env)
    return result.returncode, result.stdout, result.stderr


def test_a_jsonl_file_is_sent_row_by_row_and_bad_rows_are_named(
    settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path
) -> None:
    # Given 3,000 rows: two broken, one blank (ignored)
    broker.declare_queue("imports")  # declared here too, so that the fixture deletes it afterwards (RabbitMQ)
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])
    lines = [json.dumps({"id": n, "email": f"user{n}@example.com"}) for n in range(3_000)]
    lines[10] = '{"id": 10, "email": '
    lines[20] = "id=20 email=user20@example.com"
    lines[30] = ""
    (tmp_path / "users.jsonl").write_text("\n".join(lines) + "\n")

    # When they are sent from the French store
    code, out, err = send(tmp_path, "imports:import_user", "--file", "users.jsonl", "--context", "store=fr", "--json")

    # Then the good rows are on the queue, the bad ones named by line, and the exit code says so
    assert code == 2, err
    summary = json.loads(out)
    assert (summary["sent"], summary["bad_rows"]) == (2_997, 2)
    assert "users.jsonl:11: not JSON" in err
    assert "users.jsonl:21: not JSON" in err
    assert pending_messages(broker, "imports") == 2_997


def test_a_csv_file_as_keyword_arguments(settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path) -> None:
    # Given a CSV whose columns are the handler's keyword arguments
    broker.declare_queue("imports")
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])
    (tmp_path / "users.csv").write_text('row,notify\n"{}",yes\n"{}",no\n')

    # Then each row is sent; a file whose columns do not fit the handler is refused row by row
    code, out, err = send(tmp_path, "import_user", "--file", "users.csv", "--as", "kwargs")
    assert code == 0, err
    assert out.startswith("sent 2 tasks to import_user in ")
    assert pending_messages(broker, "imports") == 2

    (tmp_path / "bad.csv").write_text("id,unknown\n1,2\n")
    code, out, err = send(tmp_path, "import_user", "--file", "bad.csv", "--as", "kwargs")
    assert code == 2 and "bad.csv:2: arguments do not fit import_user" in err
    assert out.startswith("sent 0 tasks")


def test_a_terminal_gets_a_progress_bar(settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path) -> None:
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    from .conftest import cli_env

    # Given a terminal 100 columns wide (a pseudo-terminal; tqdm draws nothing at width 0)
    broker.declare_queue("imports")
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])
    (tmp_path / "users.jsonl").write_text("".join(json.dumps({"id": n}) + "\n" for n in range(500)))
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))

    # When the file is sent with stderr on it
    process = subprocess.run(
        [bin_path("dramaturg"), "send", "import_user", "--file", "users.jsonl"],
        cwd=tmp_path,
        env=cli_env(PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=follower,
        timeout=120,
        check=False,
    )
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: everything has been read
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)

    # Then the bar was drawn up to 100%, and the summary printed as without a terminal
    assert process.returncode == 0
    assert b"sending users.jsonl: 100%" in drawn, drawn[-500:]
    assert process.stdout.decode().startswith("sent 500 tasks to import_user in ")


def test_rows_the_command_cannot_read_are_bad_rows_and_the_rest_is_sent(
    settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path
) -> None:
    # Given 3,000 JSON lines where, after the first 1,000: bytes that are not UTF-8, an
    # integer of 5,000 digits, a row nested 5,000 deep, and one nested 980 deep (it parses,
    # but encoding it for the broker would run out of recursion)
    broker.declare_queue("imports")
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])
    lines = [json.dumps({"id": n}).encode() for n in range(3_000)]
    lines[1_000] = b'{"id": 1000, "name": "caf\xe9"}'
    lines[1_001] = b'{"id": ' + b"9" * 5_000 + b"}"
    lines[1_002] = b"[" * 5_000 + b"]" * 5_000
    lines[1_003] = b'{"id": ' + b"[" * 980 + b"]" * 980 + b"}"
    (tmp_path / "users.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    # When the file is sent
    code, out, err = send(tmp_path, "import_user", "--file", "users.jsonl", "--json")

    # Then each of them is a bad row named by its line, and every other row is sent
    assert code == 2, err
    assert "Traceback" not in err
    summary = json.loads(out)
    assert (summary["sent"], summary["bad_rows"]) == (2_996, 4)
    assert "users.jsonl:1001: not UTF-8: byte 0xe9 at column 26; skipped" in err
    assert "users.jsonl:1002: not JSON: an integer of more than 4300 digits; skipped" in err
    assert "users.jsonl:1003: not JSON: nested deeper than the JSON reader allows; skipped" in err
    assert "users.jsonl:1004: not JSON this command sends: nested deeper than 200 levels; skipped" in err
    assert pending_messages(broker, "imports") == 2_996


def test_csv_rows_the_command_cannot_read_are_bad_rows_and_the_rest_is_sent(
    settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path
) -> None:
    # Given 3,000 CSV rows where, after the first 1,000, a field of 200 KiB (over the csv
    # module's 128 KiB limit) and a byte that is not UTF-8
    broker.declare_queue("imports")
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])
    rows = [b"%d,yes" % n for n in range(3_000)]
    rows[1_000] = b'"' + b"x" * 200_000 + b'",yes'
    rows[1_001] = b"caf\xe9,yes"
    (tmp_path / "users.csv").write_bytes(b"row,notify\n" + b"\n".join(rows) + b"\n")

    # When the file is sent, each row as keyword arguments
    code, out, err = send(tmp_path, "import_user", "--file", "users.csv", "--as", "kwargs", "--json")

    # Then both are bad rows named by their line (the header is line 1), and the rest is sent
    assert code == 2, err
    assert "Traceback" not in err
    summary = json.loads(out)
    assert (summary["sent"], summary["bad_rows"]) == (2_998, 2)
    assert "users.csv:1002: not CSV this command reads: field larger than field limit (131072); skipped" in err
    assert "users.csv:1003: not UTF-8: byte 0xe9; skipped" in err
    assert pending_messages(broker, "imports") == 2_998


@pytest.mark.parametrize("broker_kind", ["rabbitmq", "redis"])  # the embedded server has no TCP port to proxy
def test_a_connection_lost_mid_file_reports_what_was_sent_and_what_is_unknown(
    broker_kind: str, settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path, request: Any
) -> None:
    # Given 2,500 rows sent in chunks of 1,000, and the connection lost in the last one
    # (Redis: its answer lost on the way back; RabbitMQ: closed by the server mid-chunk)
    broker.declare_queue("imports")
    (tmp_path / "users.jsonl").write_text("".join(json.dumps({"id": n}) + "\n" for n in range(2_500)))
    env: dict[str, str] = {}
    proxy = None
    if broker_kind == "rabbitmq":
        write_config(tmp_path, settings, modules=["tests.apps.shop_tasks", "tests.apps.bulk_cut"])
        env = {"CUT_AT": "2100", "CUT_MANAGEMENT_URL": request.getfixturevalue("rabbitmq_server").management_url}
    else:
        from .test_bulk import ReplyDropper

        kwargs = broker.client.connection_pool.connection_kwargs  # type: ignore[attr-defined]
        proxy = ReplyDropper((kwargs["host"], kwargs["port"]))
        proxy.drop_next_reply(containing=b":500\r\n")  # the third chunk's answer
        (tmp_path / "dramaturg.toml").write_text(
            f'[broker]\nurl = "redis://127.0.0.1:{proxy.port}/0"\nnamespace = "{settings.broker.namespace}"\n\n'
            '[worker]\nmodules = ["tests.apps.shop_tasks"]\n\n[state]\nenabled = false\n'
        )

    # When the file is sent
    try:
        code, out, err = send(tmp_path, "import_user", "--file", "users.jsonl", "--json", **env)
    finally:
        if proxy is not None:
            proxy.stop()

    # Then it fails, saying how many were sent, which rows are unknown (maybe on the
    # queue) and which not sent, and from where on nothing was sent; never "not sent"
    # for what is on the queue
    assert code == 1, err
    assert "Traceback" not in err
    report = json.loads(out)
    assert report["failed_lines"] == [2_001, 2_500]
    assert report["nothing_sent_after_line"] == 2_500
    assert report["sent"] + report["unknown"] + report["not_sent"] == 2_500
    assert f"sent {report['sent']:,} tasks to import_user; of the chunk of rows on lines 2,001-2,500" in err
    if broker_kind == "rabbitmq":
        from .test_bulk import queued_ids

        on_queue = queued_ids(broker, "imports")
        assert not on_queue & set(report["not_sent_ids"])
        assert report["sent"] <= len(on_queue) <= report["sent"] + report["unknown"]
        assert "CONNECTION_FORCED" in err
    else:
        assert (report["sent"], report["unknown"], report["not_sent"]) == (2_000, 500, 0)
        assert "500 are unknown (written, but no answer came: they may be on the queue" in err
        assert pending_messages(broker, "imports") == 2_500


def test_ctrl_c_mid_file_says_in_one_line_what_was_sent(
    settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path
) -> None:
    # Given 2,500 rows sent in chunks of 1,000
    broker.declare_queue("imports")
    (tmp_path / "users.jsonl").write_text("".join(json.dumps({"id": n}) + "\n" for n in range(2_500)))
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks", "tests.apps.bulk_cut"])

    # When Ctrl-C comes in the middle of the third chunk
    code, _, err = send(tmp_path, "import_user", "--file", "users.jsonl", INTERRUPT_AT="2100")

    # Then it exits 130 with one line saying how many were sent, which rows may be on the
    # queue, and that nothing after them was
    assert code == 130, err
    [line] = err.splitlines()
    assert line.startswith("dramaturg: interrupted (Ctrl-C): sent 2,000 tasks to import_user; "), line
    assert "of the chunk of rows on lines 2,001-2,500 of users.jsonl, 0 were sent, 500 are unknown" in line
    assert line.endswith("nothing after line 2,500 was sent"), line
    # and what it said is so: the 2,000 are on the queue, and of the 500 at most what was written
    sent = int(re.search(r"sent ([\d,]+) tasks", line)[1].replace(",", ""))  # type: ignore[index]
    assert sent <= pending_messages(broker, "imports") <= sent + 500
