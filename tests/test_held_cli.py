"""`dramaturg held` against real brokers, run as a user runs it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import dramatiq
import pytest

import dramaturg

from .conftest import bin_path, pending_messages, run_cli, write_config
from .test_held import held_task

REPO = Path(__file__).resolve().parents[1]


def cli(tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    result = run_cli([bin_path("dramaturg"), "held", *argv], cwd=tmp_path, PYTHONPATH=str(REPO))
    return result.returncode, result.stdout, result.stderr


def test_held_list_show_kick_purge(settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path) -> None:
    # Given a project whose actors use the "imports" queue, and three tasks held there
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])
    store = dramaturg.held_tasks()
    tasks = [held_task("imports", n) for n in range(3)]
    tasks[1] = dataclasses.replace(tasks[1], context={"store": "fr", "locale": "fr_FR"})
    for task in tasks:
        store.hold(task)

    # list: a table with the columns a user scans
    code, out, err = cli(tmp_path, "list")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["id", "queue", "actor", "reason", "attempts", "held", "at"]
    assert [row.split()[0] for row in rows] == [t.message_id for t in tasks]
    assert "row 1 has no email" in rows[1]

    code, out, _ = cli(tmp_path, "list", "imports", "--limit", "2", "--json")
    assert [json.loads(line)["message_id"] for line in out.splitlines()] == [t.message_id for t in tasks[:2]]

    # show: everything about one task
    code, out, _ = cli(tmp_path, "show", tasks[1].message_id)
    assert code == 0
    assert f"id:          {tasks[1].message_id}" in out
    assert "reason:      row 1 has no email" in out
    assert 'args:        [{"id": 1}]' in out
    assert 'context:     {"store": "fr", "locale": "fr_FR"}' in out

    # kick one: it is requeued and no longer held
    code, out, _ = cli(tmp_path, "kick", "imports", tasks[0].message_id)
    assert (code, out.strip()) == (0, "requeued 1 held task of imports")
    assert pending_messages(broker, "imports") == 1

    # purge --all refuses without --yes when nobody can be asked
    code, _, err = cli(tmp_path, "purge", "imports", "--all")
    assert code == 2 and "needs --yes" in err
    code, out, _ = cli(tmp_path, "purge", "imports", "--all", "--yes")
    assert (code, out.strip()) == (0, "purged 2 held tasks of imports")
    assert store.count("imports") == 0


def test_held_errors_are_clear(settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path) -> None:
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])

    assert cli(tmp_path, "show", "nope")[0:3:2] == (2, "dramaturg: no held task with id 'nope'\n")
    code, _, err = cli(tmp_path, "kick", "imports")
    assert code == 2 and "give the message ids to act on, or --all" in err
    code, out, _ = cli(tmp_path, "list")
    assert (code, out.strip()) == (0, "no held tasks")


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_commands_import_the_modules_of_the_folder_they_run_in(
    broker_kind: str, settings: dramaturg.Settings, tmp_path: Path
) -> None:
    # Given a project folder with its actor module beside dramaturg.toml, and no PYTHONPATH
    # (dramaturg worker finds the module there: Dramatiq's CLI puts "." on sys.path)
    (tmp_path / "signup_tasks.py").write_text(
        "import dramaturg\n\n@dramaturg.actor(queue_name='signups')\ndef sign_up(user_id: int) -> None: ...\n"
    )
    write_config(tmp_path, settings, modules=["signup_tasks"])

    # When a command that imports worker.modules runs there
    result = run_cli([bin_path("dramaturg"), "held", "list"], cwd=tmp_path)

    # Then it finds the module too
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no held tasks"
