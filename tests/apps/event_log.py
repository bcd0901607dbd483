"""One line per event, appended to the file named by an environment variable.

Each line is one O_APPEND write, so lines from concurrent threads and processes never
interleave: the tests read these files to see what worker processes did.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable


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


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Inside a worker process: return once ``check()`` is true, looking every 10 ms, or
    raise after ``timeout_s``. For what another process changes (a file the test writes,
    another worker's line): no event reaches this one. The short steps also let an
    interrupt (TTR, a stopping worker) land while it waits."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.01)
