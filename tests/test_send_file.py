"""`dramaturg send ACTOR --file`: rows streamed from JSONL or CSV, bad rows reported by
line, the good ones sent; against RabbitMQ, Redis and embedded, run as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import dramatiq

import dramaturg

from .conftest import bin_path, pending_messages, run_cli, write_config

REPO = Path(__file__).resolve().parents[1]


def send(tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    result = run_cli([bin_path("dramaturg"), "send", *argv], cwd=tmp_path, PYTHONPATH=str(REPO), timeout=120)
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
