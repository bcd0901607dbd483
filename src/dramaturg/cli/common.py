"""Helpers the subcommands share."""

from __future__ import annotations

from ..config import parse_duration_ms
from ..errors import SendError


def delay_ms(text: str | None) -> int | None:
    """``--delay`` as milliseconds (``30s``, ``5m``, ``1500``), or None when not given."""
    if text is None:
        return None
    try:
        return parse_duration_ms(text)
    except ValueError as error:
        raise SendError(f"--delay: {error}") from None
