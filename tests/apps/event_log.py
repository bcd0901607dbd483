"""One line per event, appended to the file named by an environment variable.

Each line is one O_APPEND write, so lines from concurrent threads and processes never
interleave: the tests read these files to see what worker processes did.
"""

from __future__ import annotations

import os


def append(variable: str, line: str) -> None:
    """Append ``line`` to the file named by ``$variable`` (nothing when it is unset)."""
    path = os.environ.get(variable)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)
