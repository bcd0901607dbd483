"""The quickstart's actor: make a "thumbnail" and record it, idempotently, in SQLite."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading

import dramaturg

DATABASE = os.environ.get("QUICKSTART_DB", "thumbnails.sqlite3")
_local = threading.local()


def connection() -> sqlite3.Connection:
    """One SQLite connection per worker thread."""
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = sqlite3.connect(DATABASE, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS thumbnails (image_id INTEGER PRIMARY KEY, digest TEXT, pid INTEGER)")
    return conn


@dramaturg.actor(queue_name="thumbnails", max_retries=3)
def make_thumbnail(image_id: int, size: int = 128) -> None:
    # Stand-in for real work: a little CPU, then one write. INSERT OR REPLACE makes a
    # second delivery of the same message harmless (at-least-once delivery).
    digest = hashlib.sha256(f"{image_id}:{size}".encode() * 200).hexdigest()
    connection().execute(
        "INSERT OR REPLACE INTO thumbnails (image_id, digest, pid) VALUES (?, ?, ?)", (image_id, digest, os.getpid())
    )
