"""Simulated work for tests and their worker apps."""

from __future__ import annotations

import time


def busy(seconds: float) -> None:
    """Work in Python for ``seconds`` (an interrupt lands between the short sleeps)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.005)
