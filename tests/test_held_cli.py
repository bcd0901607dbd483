"""`dramaturg held` against real brokers, run as a user runs it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import dramaturg

from .conftest import bin_path, held_task, pending_messages, run_cli, write_config
from .test_held_faults import put_held_entry, rabbitmq_queue_exists

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def imports_queue(broker: Any) -> None:
    """The "imports" queue is the application's (on RabbitMQ the broker fixture deletes it,
    its held queue included, after each test)."""
    broker.declare_queue("imports")


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


def test_an_id_that_looks_like_a_shell_pattern_is_refused(
    settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path
) -> None:
    # Given three held tasks (and an unmatched glob the shell passed on as it is)
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])
    store = dramaturg.held_tasks()
    tasks = [held_task("imports", n) for n in range(3)]
    for task in tasks:
        store.hold(task)

    # When purging or kicking the id '*'
    for action in ("purge", "kick"):
        code, out, err = cli(tmp_path, action, "imports", "*")

        # Then it is refused in one line naming --all, and nothing happened
        assert (code, out) == (2, "")
        assert err == (
            "dramaturg: no held task with id '*' in imports; it looks like a shell pattern that matched no file:"
            " to act on every held task of the queue, give --all\n"
        )
    assert store.count("imports") == 3
    assert pending_messages(broker, "imports") == 0

    # An id that really holds such a character is taken as it is
    odd = dataclasses.replace(held_task("imports", 9), message_id="report-[2024]*")
    store.hold(odd)
    assert cli(tmp_path, "purge", "imports", odd.message_id)[:2] == (0, "purged 1 held task of imports\n")
    assert store.count("imports") == 3


SECRET = "s3cr3t-Pa55"


def test_show_and_list_never_print_a_password(
    settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path
) -> None:
    # Given a held task whose error names a URL with its password, stored in clear (as
    # versions before masking stored it)
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])
    task = held_task("imports", 1)
    clear = json.loads(task.to_json()) | {
        "reason": f"cannot reach postgresql://app:{SECRET}@db/shop",
        "exception_type": "OperationalError",
        "exception_message": f"cannot reach postgresql://app:{SECRET}@db/shop",
        "traceback": f"Traceback (most recent call last):\nOperationalError: postgresql://app:{SECRET}@db/shop\n",
    }
    put_held_entry(broker, "imports", task.message_id, json.dumps(clear).encode())

    # When it is shown and listed
    outputs = [cli(tmp_path, "show", task.message_id), cli(tmp_path, "list", "--json"), cli(tmp_path, "list")]

    # Then the password is masked everywhere
    for code, out, err in outputs:
        assert code == 0, err
        assert SECRET not in out + err
    assert "error:       OperationalError: cannot reach postgresql://app:***@db/shop" in outputs[0][1]


def test_unreadable_entries_are_reported_and_skipped(
    settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path
) -> None:
    # Given a held task and an entry that is not JSON beside it
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])
    task = held_task("imports", 1)
    dramaturg.held_tasks().hold(task)
    put_held_entry(broker, "imports", "broken-1", b"\x80 not json")

    # When they are listed, then both are, the broken one as unreadable, with one line about it
    code, out, err = cli(tmp_path, "list", "imports")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {task.message_id, "broken-1"}
    assert "unreadable held entry: not JSON" in rows["broken-1"]
    assert err.startswith("dramaturg: 1 held entry could not be read (broken-1): listed as unreadable;")
    assert err.count("\n") == 1

    # When the queue is kicked, the task is requeued and the broken entry stays held, said in one line
    code, out, err = cli(tmp_path, "kick", "imports", "--all")
    assert (code, out) == (1, "requeued 1 held task of imports\n")
    assert err.startswith("dramaturg: broken-1 stays held: unreadable held entry: not JSON")
    assert err.count("\n") == 1
    assert pending_messages(broker, "imports") == 1
    assert [t.message_id for t in dramaturg.held_tasks().list("imports")] == ["broken-1"]


@pytest.mark.parametrize(
    "argv",
    [
        ["list", ""],
        ["kick", "", "--all"],
        ["purge", "bad name", "--all", "--yes"],
        ["kick", "imports.HQ", "--all"],
        ["show", "x", "--queue=-x"],
        ["list", "amq.gen"],
        ["list", "q" * 300],
    ],
)
def test_queue_names_are_checked_before_the_broker_is_asked(
    argv: list[str], settings: dramaturg.Settings, broker: Any, tmp_path: Path
) -> None:
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])
    code, out, err = cli(tmp_path, *argv)
    if broker.settings.type != "rabbitmq" and argv[1] in ("amq.gen", "q" * 300):
        assert (code, out) == (0, f"no held tasks in {argv[1]}\n")  # names RabbitMQ alone refuses
        return
    assert (code, out) == (2, "")
    assert err.startswith("dramaturg: ") and ("is not a queue name" in err or "the queue name is empty" in err)
    assert err.count("\n") == 1


@pytest.mark.parametrize("broker_kind", ["rabbitmq"])
def test_a_mistyped_queue_is_not_created_on_rabbitmq(
    broker_kind: str, settings: dramaturg.Settings, broker: Any, tmp_path: Path
) -> None:
    write_config(tmp_path, settings, modules=["tests.apps.shop_tasks"])

    assert cli(tmp_path, "list", "imprts") == (0, "no held tasks in imprts\n", "")
    assert cli(tmp_path, "kick", "imprts", "--all") == (0, "requeued 0 held tasks of imprts\n", "")
    assert cli(tmp_path, "purge", "imprts", "--all", "--yes") == (0, "purged 0 held tasks of imprts\n", "")

    assert not rabbitmq_queue_exists(broker, "imprts.HQ")
