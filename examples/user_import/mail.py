"""The welcome e-mail, and the outbox it is delivered to: an mbox file.

::

    with Outbox(Path("data/outbox.mbox")) as outbox:
        outbox.deliver(welcome_message(4711, "ada@example.com", "Ada Lovelace"))

The outbox stands in for a mail server, the way a local SMTP sink would, and anyone can
check it: ``mutt -f data/outbox.mbox``, Python's :mod:`mailbox`, or :func:`read_outbox`.
Each delivery appends one message with one ``write`` on a file opened for appending,
under an exclusive ``flock``, so messages from many threads and processes never
interleave. (One file per message, renamed into place, was the first version: every
create and rename takes the folder's lock, and 16 threads paid ~0.4 ms a message for
it; an append costs microseconds.)

Like a real mail server, the outbox is at least once: a welcome whose task ran twice
(its worker was killed after delivering) is in it twice, with the same Message-ID, which
is what the receiving side uses to drop repeats. :func:`read_outbox` reports repeats.
"""

from __future__ import annotations

import fcntl
import mailbox
import os
import time
from collections.abc import Iterator
from email.header import Header
from email.utils import formatdate
from pathlib import Path
from types import TracebackType

__all__ = ["ADMIN", "SENDER", "Outbox", "read_outbox", "read_reports", "report_message", "welcome_message"]

SENDER = "Example Site <welcome@example.com>"
#: Who is told when an import has ended.
ADMIN = "Site Administrator <admin@example.com>"


def _header(text: str) -> str:
    """``text`` as a header value: as it is when ASCII, else RFC 2047 encoded."""
    return text if text.isascii() else Header(text, "utf-8").encode()


def welcome_message(user_id: int, email: str, name: str) -> bytes:
    """The welcome for one user, as the bytes of an RFC 5322 message.

    Its Message-ID is the same for every delivery of one user's welcome. Written out by
    hand: :class:`email.message.EmailMessage` took a millisecond a message, more CPU
    than the rest of the import.
    """
    body = f"Hello {name},\n\nyour account {user_id} is ready.\n\n-- Example Site\n"
    return (
        f"From: {SENDER}\n"
        f"To: {email}\n"
        f"Subject: {_header(f'Welcome, {name}!')}\n"
        f"Date: {formatdate(localtime=True)}\n"
        f"Message-ID: <welcome-{user_id}@users.example.com>\n"
        f"X-User-Id: {user_id}\n"
        "MIME-Version: 1.0\n"
        'Content-Type: text/plain; charset="utf-8"\n'
        "Content-Transfer-Encoding: 8bit\n"
        f"\n{body}"
    ).encode()


def report_message(batch_id: str, subject: str, body: str) -> bytes:
    """The administrator's report of one import (one per batch: its Message-ID is the
    batch's, so a repeat can be told apart as a welcome's can)."""
    return (
        f"From: {SENDER}\n"
        f"To: {ADMIN}\n"
        f"Subject: {_header(subject)}\n"
        f"Date: {formatdate(localtime=True)}\n"
        f"Message-ID: <import-{batch_id}@users.example.com>\n"
        f"X-Import-Batch: {batch_id}\n"
        "MIME-Version: 1.0\n"
        'Content-Type: text/plain; charset="utf-8"\n'
        "Content-Transfer-Encoding: 8bit\n"
        f"\n{body}"
    ).encode()


class Outbox:
    """An mbox file opened for appending; thread-safe, and safe across processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def deliver(self, message: bytes) -> None:
        """Append ``message`` (with its mbox ``From`` line; body lines that start with
        "From " are quoted, as mbox wants)."""
        envelope = f"From welcome@example.com {time.asctime()}\n".encode()
        data = envelope + message.replace(b"\nFrom ", b"\n>From ") + b"\n"
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            written = os.write(self._fd, data)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        if written != len(data):  # a full disk; a short append would corrupt the mbox
            raise OSError(f"{self.path}: only {written} of {len(data)} bytes written")

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def read_outbox(path: Path) -> Iterator[tuple[int, str]]:
    """``(user id, recipient)`` of each welcome in the mbox at ``path``, repeats included."""
    if not path.exists():
        return
    box = mailbox.mbox(path, create=False)
    try:
        for message in box:
            if message["X-User-Id"] is not None:
                yield int(message["X-User-Id"]), str(message["To"])
    finally:
        box.close()


def read_reports(path: Path) -> list[tuple[str, str, str]]:
    """``(batch id, subject, body)`` of each import report in the mbox at ``path``."""
    if not path.exists():
        return []
    box = mailbox.mbox(path, create=False)
    try:
        return [
            (str(message["X-Import-Batch"]), str(message["Subject"]), str(message.get_payload()))
            for message in box
            if message["X-Import-Batch"] is not None
        ]
    finally:
        box.close()
