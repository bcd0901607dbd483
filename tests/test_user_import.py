"""examples/user_import end to end, as a user runs it: demo.py with `dramaturg worker`
subprocesses, on each real broker; then the database, the outbox and `dramaturg held list`
must add up to the input file exactly."""

from __future__ import annotations

import csv
import importlib.util
import json
import mailbox
import re
import shutil
import sqlite3
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import dramaturg

from .conftest import bin_path, broker_url, delete_rabbitmq_queues, run_cli, write_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "user_import"
USERS, SEED = 300, 14
#: What users.py makes of USERS and SEED (checked below against the file itself).
BAD = {"missing e-mail": 6, "malformed e-mail": 3, "duplicate id": 9}
LINE = re.compile(r"^users\.csv line (\d+)\b")

pytestmark = pytest.mark.slow


@pytest.fixture
def settings(broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dramaturg.Settings:
    """As conftest's, with the private Redis as RabbitMQ's state store: the import runs as
    a batch on every broker."""
    base: dramaturg.Settings = request.getfixturevalue("settings")  # conftest's
    if broker_kind != "rabbitmq":
        return base
    server = request.getfixturevalue("redis_server")
    return dramaturg.Settings(
        broker=base.broker.model_dump(), worker={"threads": 4}, state={"url": f"redis://{server.host}:{server.port}/0"}
    )


def example_copy(tmp_path: Path, settings: dramaturg.Settings) -> Path:
    """The example's code in a folder of its own, its dramaturg.toml pointing at this test's broker."""
    folder = tmp_path / "user_import"
    folder.mkdir()
    for source in EXAMPLE.glob("*.py"):
        shutil.copy(source, folder)
    write_config(folder, settings, modules=["tasks"], processes=2, threads=4)
    return folder


def run_demo(folder: Path, *flags: str) -> str:
    result = run_cli(
        [sys.executable, "demo.py", "--users", str(USERS), "--seed", str(SEED), *flags], cwd=folder, timeout=240
    )
    log = folder / "data" / "worker.log"
    output = result.stdout + result.stderr + (log.read_text() if log.exists() else "")
    assert result.returncode == 0, output
    return result.stdout


def check_import(folder: Path) -> None:
    """The database, the outbox and the held tasks add up to the file, row by row."""
    with (folder / "data" / "users.csv").open(newline="") as stream:
        reader = csv.DictReader(stream)
        rows = {}
        for row in reader:
            rows[reader.line_num] = row
    assert len(rows) == USERS

    with sqlite3.connect(folder / "data" / "users.sqlite3") as conn:
        imported = {line: (str(uid), email, name) for uid, email, name, line in conn.execute("SELECT * FROM users")}
    conn.close()
    held = run_cli([bin_path("dramaturg"), "held", "list", "users", "--json", "--limit", "1000"], cwd=folder)
    assert held.returncode == 0, held.stderr
    reasons = [json.loads(line)["reason"] for line in held.stdout.splitlines()]
    held_lines = [int(LINE.match(reason).group(1)) for reason in reasons]  # type: ignore[union-attr]

    # Every line of the file is imported or held, none both, none twice.
    assert len(held_lines) == len(set(held_lines)) == sum(BAD.values())
    assert not set(held_lines) & set(imported)
    assert set(held_lines) | set(imported) == set(rows)
    assert len(imported) == USERS - sum(BAD.values())

    # An imported row is the file's row, unchanged.
    for line, user in imported.items():
        assert user == (rows[line]["id"], rows[line]["email"], rows[line]["name"])

    # A held row's reason names its problem, which is the row's.
    kinds: Counter[str] = Counter()
    ids_by_line = {line: row["id"] for line, row in rows.items()}
    for line, reason in zip(held_lines, reasons, strict=True):
        row = rows[line]
        if reason.endswith(": missing e-mail"):
            kinds["missing e-mail"] += 1
            assert row["email"] == "", reason
        elif "malformed e-mail" in reason:
            kinds["malformed e-mail"] += 1
            assert row["email"] and reason.endswith(f"malformed e-mail {row['email']!r}"), reason
        else:
            kinds["duplicate id"] += 1
            match = re.search(r"duplicate id (\d+), already imported from line (\d+) with other data", reason)
            assert match, reason
            other = int(match.group(2))
            assert match.group(1) == row["id"] == ids_by_line[other], reason
            assert other in imported, reason  # the line it clashed with is the one imported
    assert kinds == BAD

    # Each imported user has exactly one welcome, to their address; nobody else has one.
    box = mailbox.mbox(folder / "data" / "outbox.mbox", create=False)
    messages = list(box)
    box.close()
    welcomes = sorted((str(m["X-User-Id"]), str(m["To"])) for m in messages if m["X-Import-Batch"] is None)
    assert welcomes == sorted((uid, email) for uid, email, _ in imported.values())


def report_of(folder: Path) -> tuple[str, str]:
    """The subject and body of the one import report in the outbox."""
    box = mailbox.mbox(folder / "data" / "outbox.mbox", create=False)
    reports = [(str(m["Subject"]), str(m.get_payload())) for m in box if m["X-Import-Batch"] is not None]
    box.close()
    assert len(reports) == 1, reports
    return reports[0]


def test_the_user_import_adds_up_on_every_broker(
    broker_kind: str, settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path
) -> None:
    # Given the example pointed at this broker (so that the test's broker fixture deletes
    # the example's RabbitMQ queues afterwards, they are declared here too)
    folder = example_copy(tmp_path, settings)
    for queue in ("users", "emails", "reports"):
        broker.declare_queue(queue)

    # When the demo imports 300 users, 18 of them bad, with e-mails queued
    out = run_demo(folder)

    # Then its summary says so, and the database, outbox and held tasks add up to the file
    assert "held              18 rows: 9 duplicate id, 3 malformed e-mail, 6 missing e-mail" in out, out
    assert "e-mails          282 welcomes in data/outbox.mbox (queued)" in out, out
    assert "OK: every row is imported or held" in out, out
    check_import(folder)
    assert dramaturg.queue_stats(["emails"])[0].processed_per_min == USERS - sum(BAD.values())

    # And the batch's on_complete mailed the administrator a report that says the same
    batch_id = re.search(r"as batch ([0-9a-f-]{36})", out).group(1)  # type: ignore[union-attr]
    subject, body = report_of(folder)
    assert subject == "Import of users.csv: 282 users imported, 18 rows held"
    assert "held              18 rows: 9 duplicate id, 3 malformed e-mail, 6 missing e-mail" in body, body
    assert f"({USERS + 282} tasks in batch {batch_id})" in body, body  # the imports and the welcomes they sent
    status = dramaturg.batch_status(batch_id)
    assert (status.state, status.total, status.held, status.failed) == ("complete", USERS + 282, 18, 18)


def test_without_a_state_store_the_import_runs_without_a_batch_and_says_so(
    rabbitmq_server: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Given the example on RabbitMQ with no [state] url
    settings = dramaturg.Settings(
        broker={
            "url": broker_url("rabbitmq", request, tmp_path),
            "namespace": f"test-{uuid.uuid4().hex[:8]}",
            "management_url": rabbitmq_server.management_url,
        }
    )
    broker = dramaturg.bootstrap(settings)
    folder = example_copy(tmp_path, settings)
    for queue in ("users", "emails", "reports"):
        broker.declare_queue(queue)
    try:
        # When the demo runs
        out = run_demo(folder)

        # Then it says why there is no batch, and the import still adds up, without a report
        check_import(folder)
    finally:
        delete_rabbitmq_queues(broker)
    assert "no batch (batches need a state store, and the rabbitmq broker has none of its own:" in out, out
    assert 'set [state] url = "redis://..."' in out, out
    assert "OK: every row is imported or held" in out, out
    assert "report     mailed" not in out, out


@pytest.mark.parametrize("broker_kind", ["embedded"])
def test_eager_e_mails_are_sent_inside_the_import(
    broker_kind: str, settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path
) -> None:
    # Given the example with e-mails switched to eager
    folder = example_copy(tmp_path, settings)

    # When the demo runs
    out = run_demo(folder, "--emails", "eager")

    # Then the welcomes were delivered by import_user itself: no e-mail task was ever sent
    assert "e-mails          282 welcomes in data/outbox.mbox (eager)" in out, out
    assert dramaturg.queue_stats(["emails"])[0].processed_per_min == 0
    assert dramaturg.queue_stats(["users"])[0].processed_per_min == USERS  # held ones included
    check_import(folder)


def test_the_generated_file_has_the_bad_rows_the_tests_count_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the example's generator (loaded under a name of its own: "users" is too common)
    spec = importlib.util.spec_from_file_location("user_import_users", EXAMPLE / "users.py")
    assert spec is not None and spec.loader is not None
    users = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, users)  # its dataclass looks itself up there
    spec.loader.exec_module(users)

    # When it writes SEED's file twice
    counts = users.generate(tmp_path / "users.csv", USERS, seed=SEED)
    users.generate(tmp_path / "again.csv", USERS, seed=SEED)

    # Then both are the same, with the bad rows the tests above count on
    assert (tmp_path / "again.csv").read_bytes() == (tmp_path / "users.csv").read_bytes()
    assert (counts.missing_email, counts.malformed_email, counts.duplicate_id) == tuple(BAD.values())
