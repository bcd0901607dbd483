"""The import's actors: ``import_user`` for each row of the file, ``send_welcome_email`` after it.

Settings of the example itself (dramaturg.toml is dramaturg's, and holds only its own),
read from the environment by the workers and by ``demo.py``:

- ``USER_IMPORT_DATABASE``: ``sqlite:///data/users.sqlite3`` (default), or a
  ``postgresql://`` URL (needs psycopg);
- ``USER_IMPORT_OUTBOX``: the mbox file welcome e-mails are delivered to (default
  ``data/outbox.mbox``; see mail.py);
- ``USER_IMPORT_EMAILS``: ``queued`` (default): ``import_user`` sends a
  ``send_welcome_email`` task for each user it imports, and the workers deliver them after
  the imports; ``eager``: ``import_user`` delivers the welcome itself, inline, and no
  e-mail task is queued.

A row that cannot be imported is held, never dropped, with a reason that names the file,
the line and the problem (``dramaturg held list users`` lists them):

- ``users.csv line 1235 (id 5233): missing e-mail``
- ``users.csv line 2210 (id 6208): malformed e-mail 'grace.hopper.6208(at)example.com'``
- ``users.csv line 3001: duplicate id 1450, already imported from line 452 with other data
  ('ada.turing.1450@example.com', 'Ada Turing'; here 'ken.wirth.3999@example.org', 'Ken Wirth')``

Which of two rows with one id is imported, and which is held, depends on which a worker
runs first; the other one is always held, naming both lines.

The import runs as a batch (see demo.py): its members are the ``import_user`` tasks and
the welcomes they send, and when every one has ended the batch sends ``report_import``,
which mails the administrator what was imported, what was held and why, and how long it
took.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from db import User, Users, open_users
from mail import Outbox, report_message, welcome_message

import dramaturg

DATABASE = os.environ.get("USER_IMPORT_DATABASE", "sqlite:///data/users.sqlite3")
OUTBOX = Path(os.environ.get("USER_IMPORT_OUTBOX", "data/outbox.mbox"))
EMAILS = os.environ.get("USER_IMPORT_EMAILS", "queued")
if EMAILS not in {"queued", "eager"}:
    raise ValueError(f"USER_IMPORT_EMAILS={EMAILS!r}: write 'queued' (a task per e-mail) or 'eager' (sent inline)")

#: Something, an @, something with a dot: what an import can check without a mail server.
VALID_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


@dramaturg.resource(per_thread=True)
def users() -> Iterator[Users]:
    """Each worker thread's own connection (an sqlite3 connection is not for sharing)."""
    connection = open_users(DATABASE)
    yield connection
    connection.close()


@dramaturg.resource
def outbox() -> Iterator[Outbox]:
    """The outbox, opened once per process (appends are locked, threads share it)."""
    box = Outbox(OUTBOX)
    yield box
    box.close()


@dramaturg.actor(queue_name="users", max_retries=5, min_backoff=1_000, max_backoff=60_000)
def import_user(line: int, row: dict[str, str]) -> None:
    """Import one row of the file (``line`` is its line number there); idempotent."""
    task = dramaturg.current_task()
    where = f"{task.context.get('source', 'input')} line {line}"
    try:
        user_id = int(row["id"])
    except (KeyError, ValueError):
        task.hold(f"{where}: malformed id {row.get('id')!r}")
    email, name = row.get("email", "").strip(), row.get("name", "").strip()
    if not email:
        task.hold(f"{where} (id {user_id}): missing e-mail")
    if not VALID_EMAIL.fullmatch(email):
        task.hold(f"{where} (id {user_id}): malformed e-mail {email!r}")

    user = User(user_id, email, name, line)
    existing = users().add(user)
    # existing == user: this very row was imported by an earlier run of this task (a
    # worker died after the insert). Its welcome may not have gone out: send it again
    # (at least once; the Message-ID tells a repeat).
    if existing is not None and existing != user:
        if existing.same_data(user):
            task.hold(f"{where}: duplicate id {user_id}, the same user as line {existing.line}; nothing imported")
        task.hold(
            f"{where}: duplicate id {user_id}, already imported from line {existing.line} with other data"
            f" ({existing.email!r}, {existing.name!r}; here {email!r}, {name!r})"
        )
    if EMAILS == "eager":
        outbox().deliver(welcome_message(user.id, user.email, user.name))
    else:
        send_welcome_email.send(user.id, user.email, user.name)


@dramaturg.actor(queue_name="emails", max_retries=10)
def send_welcome_email(user_id: int, email: str, name: str) -> None:
    """Deliver one welcome to the outbox (see mail.py)."""
    outbox().deliver(welcome_message(user_id, email, name))


#: The kinds of problem a held row's reason names (the reasons above, without their details).
PROBLEM = re.compile(r": (missing e-mail|malformed e-mail|malformed id|duplicate id)")


@dramaturg.actor(queue_name="reports", max_retries=10)
def report_import(source: str, summary: dict[str, Any]) -> None:
    """The import batch's ``on_complete``: mail the administrator a report of it.

    ``summary`` is the batch's status when its last member ended (Dramatiq passes it last;
    see :meth:`dramaturg.BatchStatus.to_dict`). The held rows, and why, come from the held
    store: those of the ``users`` queue held since the batch started.
    """
    held = [
        task
        for task in dramaturg.held_tasks().list("users", limit=max(summary["failed"], 1) * 2 + 100)
        if task.held_at >= summary["started_at"]
    ]
    kinds = Counter(match.group(1) if (match := PROBLEM.search(task.reason)) else "other" for task in held)
    elapsed_s = ((summary["finished_at"] or summary["started_at"]) - summary["started_at"]) / 1000
    imported = users().count()
    why = ", ".join(f"{n:,} {kind}" for kind, n in sorted(kinds.items()))
    subject = f"Import of {source}: {imported:,} users imported, {len(held):,} rows held"
    lines = [
        f"The import of {source} has ended ({summary['total']:,} tasks in batch {summary['batch_id']}).",
        "",
        f"imported   {imported:>9,} users",
        f"held       {len(held):>9,} rows" + (f": {why}" if held else ""),
        f"elapsed    {elapsed_s:>9.1f} s",
        "",
        *(f"  {task.reason}" for task in held[:20]),
        *(["  ..."] if len(held) > 20 else []),
        *(["", "dramaturg held list users   # all of them; kick a row once it is fixed"] if held else []),
        "",
    ]
    outbox().deliver(report_message(summary["batch_id"], subject, "\n".join(lines)))
