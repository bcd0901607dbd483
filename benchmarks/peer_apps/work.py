"""The work every system runs, and the counter the benchmark reads.

Every task body ends with :func:`processed`, which appends one byte to its worker
process's file in the directory ``BENCH_PROCESSED_DIR`` (``O_APPEND``: atomic across threads;
RQ's forked work horses, with ``BENCH_COUNT_BY_PARENT=1``, share their parent's file).
The runner adds up the files' sizes: the counting costs one small ``write`` per task on
every system, whatever its process model, and a new file tells that one more process is
at work.

The user import (``import_user``) is a self-contained stand-in for the showcase's task:
validate the e-mail address, then upsert the row into the SQLite database named by
``BENCH_SQLITE`` through a connection of the current thread (and process), so that a
task run twice leaves one row.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from typing import Any

#: A deliberately plain check: one "@", no spaces, a dot in the domain, a 2+ letter TLD.
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}")
#: Seconds an "I/O-bound" task waits.
SLEEP_S = 0.010

_fd: tuple[int, int] | None = None  # (pid, fd): a forked child opens its own
_local = threading.local()


def processed() -> None:
    """Count one processed task (called last in every task body)."""
    global _fd
    pid = os.getpid()
    if _fd is None or _fd[0] != pid:
        owner = os.getppid() if os.environ.get("BENCH_COUNT_BY_PARENT") == "1" else pid
        path = os.path.join(os.environ["BENCH_PROCESSED_DIR"], str(owner))
        _fd = (pid, os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    os.write(_fd[1], b".")


def noop(number: int) -> None:
    processed()


def sleep_10ms(number: int) -> None:
    time.sleep(SLEEP_S)
    processed()


def _connection() -> sqlite3.Connection:
    connection: sqlite3.Connection | None = getattr(_local, "connection", None)
    if connection is None or getattr(_local, "pid", None) != os.getpid():
        # WAL with synchronous=NORMAL: a commit appends to the log without an fsync (the
        # database stays consistent; the last commits may be lost on a power cut).
        connection = sqlite3.connect(os.environ["BENCH_SQLITE"], timeout=60, isolation_level=None)
        connection.execute("PRAGMA synchronous=NORMAL")
        _local.connection, _local.pid = connection, os.getpid()
    return connection


def create_database(path: str) -> None:
    """Create the users table (the runner does it once, before any worker starts)."""
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT NOT NULL)")
    connection.commit()
    connection.close()


def count_users(path: str) -> int:
    connection = sqlite3.connect(path)
    (users,) = connection.execute("SELECT count(*) FROM users").fetchone()
    connection.close()
    return int(users)


def import_user(row: dict[str, Any]) -> None:
    """Validate one row and upsert it; a row with a bad e-mail address is skipped."""
    email = str(row["email"]).strip().lower()
    if EMAIL.fullmatch(email):
        _connection().execute(
            "INSERT INTO users (id, email, name) VALUES (?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET email = excluded.email, name = excluded.name",
            (row["id"], email, row["name"]),
        )
    processed()


def user_rows(count: int, *, step: int = 1, offset: int = 0) -> list[dict[str, Any]]:
    """``count`` rows to import, the n-th with the id ``n * step + offset``; one in 50 (by
    n) has a bad address (no "@")."""
    rows = []
    for number in range(count):
        user = number * step + offset
        email = f"user{user}.example.com" if number % 50 == 49 else f"User{user}@Example.com"
        rows.append({"id": user, "email": email, "name": f"User {user}"})
    return rows


def valid_rows(count: int) -> int:
    return count - count // 50


#: Each scenario's task, and the argument of its n-th message.
TASKS = {"noop": noop, "sleep": sleep_10ms, "import": import_user}
