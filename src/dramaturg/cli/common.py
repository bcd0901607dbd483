"""Helpers the subcommands share."""

from __future__ import annotations

import json
import sys
from typing import Any

from ..config import parse_duration_ms
from ..errors import SendError


def delay_ms(text: str | None, option: str = "--delay") -> int | None:
    """A duration option (``--delay`` unless ``option`` names another) as milliseconds
    (``30s``, ``5m``, ``1500``), or None when not given."""
    if text is None:
        return None
    try:
        return parse_duration_ms(text)
    except ValueError as error:
        raise SendError(f"{option}: {error}") from None


class JsonError(ValueError):
    """Text that :func:`loads` cannot read; the message says why, in a few words."""


def loads(text: str | bytes) -> Any:
    """``json.loads``, with every way it can fail as a :class:`JsonError`: a syntax error
    (``Expecting ',' delimiter at column 12``), an integer longer than Python converts
    (``sys.get_int_max_str_digits()``, 4,300 digits by default), or nesting deeper than
    the parser's recursion allows."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise JsonError(f"{error.msg} at column {error.colno}") from None
    except RecursionError:
        raise JsonError("nested deeper than the JSON reader allows") from None
    except UnicodeDecodeError as error:
        raise JsonError(f"byte 0x{error.object[error.start]:02x} at {error.start + 1} is not UTF-8") from None
    except ValueError as error:  # the only other: an integer of too many digits
        if "integer string conversion" in str(error):
            limit = sys.get_int_max_str_digits()
            raise JsonError(f"an integer of more than {limit} digits") from None
        raise JsonError(str(error)) from None


def shorten(text: str, limit: int = 80) -> str:
    """``repr(text)``, cut to about ``limit`` characters for an error line."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f" ... ({len(text):,} characters)"
