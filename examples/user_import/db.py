"""Where imported users go: SQLite by default, PostgreSQL when the URL says so.

::

    users = open_users("sqlite:///data/users.sqlite3")      # or postgresql://user:pw@host/db
    existing = users.add(User(4711, "ada@example.com", "Ada Lovelace", line=12))
    # None: inserted; else the row that already has id 4711 (nothing was written)

``add`` is one statement, ``INSERT ... ON CONFLICT (id) DO NOTHING``, committed at once:
running it twice for the same row changes nothing, which is what makes the import safe
to repeat when a task runs again (delivery is at least once). The caller compares what
``add`` returns with its row to tell a repeat of itself from another row with its id.

SQLite runs in WAL mode with ``synchronous=NORMAL`` (a commit appends to the log without
waiting for the disk; the database stays consistent after a crash, and loses at most
the last commits of a power cut) and a busy timeout, so the worker processes' threads
take turns at the one write lock instead of failing. PostgreSQL needs ``psycopg``
(``pip install 'psycopg[binary]'``); it is imported only for a ``postgresql://`` URL.
"""

from __future__ import annotations

import importlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = ["User", "Users", "open_users"]

#: How long a writer waits for another process's write lock before failing (ms).
BUSY_TIMEOUT_MS = 30_000

_COLUMNS = "id, email, name, line"


@dataclass(frozen=True)
class User:
    """One imported user; ``line`` is the line of the input file it came from."""

    id: int
    email: str
    name: str
    line: int

    def same_data(self, other: User) -> bool:
        return (self.email, self.name) == (other.email, other.name)


class Users(Protocol):
    """The users table of one database connection (one per thread: not thread-safe)."""

    url: str

    def add(self, user: User) -> User | None:
        """Insert ``user`` unless its id exists; returns the existing row then, else None."""

    def count(self) -> int:
        """Rows in the table."""

    def all(self) -> Iterator[User]:
        """Every row, by id."""

    def reset(self) -> None:
        """Drop every row (the demo starts afresh)."""

    def close(self) -> None: ...


def open_users(url: str) -> Users:
    """A connection to the users table at ``url``, created if missing.

    ``sqlite:///relative/path.sqlite3``, ``sqlite:////absolute/path.sqlite3``, or
    ``postgresql://user:password@host:5432/database``.
    """
    scheme = url.split("://", 1)[0].lower()
    if scheme == "sqlite":
        return SqliteUsers(url)
    if scheme in {"postgresql", "postgres"}:
        return PostgresUsers(url)
    raise ValueError(f"unknown database URL {url!r}; use sqlite:///path.sqlite3 or postgresql://user@host/db")


class _SqlUsers:
    """What both databases share: the statements differ only in their placeholder."""

    conn: Any
    #: The DB-API paramstyle mark: "?" (sqlite3) or "%s" (psycopg).
    mark = "?"
    reset_statement = "DELETE FROM users"

    def add(self, user: User) -> User | None:
        marks = ", ".join([self.mark] * 4)
        inserted = self.conn.execute(
            f"INSERT INTO users ({_COLUMNS}) VALUES ({marks}) ON CONFLICT (id) DO NOTHING",
            (user.id, user.email, user.name, user.line),
        ).rowcount
        if inserted:
            return None
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM users WHERE id = {self.mark}", (user.id,)).fetchone()
        return User(*row)

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM users").fetchone()[0])

    def all(self) -> Iterator[User]:
        for row in self.conn.execute(f"SELECT {_COLUMNS} FROM users ORDER BY id"):
            yield User(*row)

    def reset(self) -> None:
        self.conn.execute(self.reset_statement)

    def close(self) -> None:
        self.conn.close()


class SqliteUsers(_SqlUsers):
    def __init__(self, url: str) -> None:
        self.url = url
        path = Path(url.split("://", 1)[1][1:] or "users.sqlite3")  # sqlite:///rel, sqlite:////abs
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit (isolation_level=None): each statement is its own short transaction.
        self.conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS users"
            " (id INTEGER PRIMARY KEY, email TEXT NOT NULL, name TEXT NOT NULL, line INTEGER NOT NULL)"
        )


class PostgresUsers(_SqlUsers):
    mark = "%s"
    reset_statement = "TRUNCATE users"

    def __init__(self, url: str) -> None:
        try:
            psycopg: Any = importlib.import_module("psycopg")  # optional: only for this URL
        except ImportError:
            raise ValueError(f"{url.split('://')[0]}:// needs psycopg: pip install 'psycopg[binary]'") from None
        self.url = url
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS users"
            " (id BIGINT PRIMARY KEY, email TEXT NOT NULL, name TEXT NOT NULL, line INTEGER NOT NULL)"
        )
