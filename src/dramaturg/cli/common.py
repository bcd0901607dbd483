"""What the subcommands share: the prelude that loads the application, option parsing.

Every command that works with the application's broker and actors starts with
:func:`boot`: the settings (``--config``), the broker built from them, and the actor
modules imported, each failure one line and a named exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any, Literal

import dramatiq

from .. import app, brokers, logs
from ..app import BUILTIN_ACTORS
from ..config import Settings, load_settings
from ..durations import parse_ms
from ..errors import UsageError
from ..masking import mask_text


def boot(
    args: argparse.Namespace, *, echo: Literal["no", "also", "as_worker"] = "no", ping_first: bool = False
) -> tuple[Settings, dramatiq.Broker]:
    """The settings ``args.config`` names, the broker :func:`dramaturg.bootstrap` builds from
    them, and the actor modules of ``worker.modules`` imported (a failure: a one-line
    :class:`~dramaturg.ConfigError`, and the broker is closed again).

    ``echo``: the built-in ``echo`` actor is imported too: ``"also"`` always (a command
    that may send to it), ``"as_worker"`` while ``worker.modules`` names none, as a worker
    does (a command that runs tasks). ``ping_first``: check that the broker answers before
    anything is built (:class:`~dramaturg.BrokerUnreachable`, exit 3); a command that
    checks its arguments against the actors first pings later, itself.
    """
    settings = load_settings(args.config)
    if ping_first:
        brokers.ping(settings.broker)
    broker = app.bootstrap(settings)
    modules = list(settings.worker.modules)
    if echo == "also" or (echo == "as_worker" and not modules):
        modules.append(BUILTIN_ACTORS)
    try:
        app.import_actor_modules_or_explain(modules)
    except BaseException:
        app.shutdown()
        raise
    return settings, broker


def complain(message: str, *, level: int = logging.ERROR, **fields: object) -> None:
    """Print ``dramaturg: <message>`` (masked) to stderr: a command's error line (or a note,
    at ``level`` WARNING), in the log format chosen (``--log-format json``: a JSON object,
    with ``fields``)."""
    if logs.current_format() == "json":
        print(logs.json_line(level, "dramaturg.cli", message, **fields), file=sys.stderr)
    else:
        print(f"dramaturg: {mask_text(message)}", file=sys.stderr)


def whole(low: int, high: int) -> Any:
    """An argparse ``type`` for a whole number from ``low`` to ``high``: outside them (or not
    a number) argparse's own usage error, exit 2, naming the range.

    >>> whole(1, 10)("3")
    3
    """

    def parse(text: str) -> int:
        try:
            number = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text[:40]!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"expected {low:,} to {high:,}, got {text[:40]}")
        return number

    parse.__name__ = "whole number"  # what argparse calls the type in its messages
    return parse


#: Bounds of the commands' counts: what a listing shows at once, a page's start, a priority
#: (a 64-bit integer, as a worker reads it), a round trip's messages.
LIMIT_MAX = 1_000_000
OFFSET_MAX = 10**12
PRIORITY_MAX = 2**63 - 1
CHUNK_MAX = 100_000


def duration_ms(text: str | None, option: str) -> int | None:
    """The duration option ``option`` (``--delay``, ``--budget``) as milliseconds
    (``30s``, ``5m``, ``1500``: see :mod:`dramaturg.durations`), or None when not given."""
    if text is None:
        return None
    try:
        return parse_ms(text, what=option)
    except ValueError as error:
        raise UsageError(str(error)) from None


class JsonError(ValueError):
    """Text that :func:`loads` cannot read; the message says why, in a few words."""


def _not_json(name: str) -> float:
    raise JsonError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise JsonError(f"the number {text[:40]} is too large for a float")
    return number


def loads(text: str | bytes) -> Any:
    """``json.loads``, with every way it can fail as a :class:`JsonError`: a syntax error
    (``Expecting ',' delimiter at column 12``), an integer longer than Python converts
    (``sys.get_int_max_str_digits()``, 4,300 digits by default), or nesting deeper than
    the parser's recursion allows; and what is not JSON but Python's reader takes (NaN,
    Infinity, a number too large for a float), which would go on the wire as no JSON."""
    try:
        return json.loads(text, parse_constant=_not_json, parse_float=_finite)
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
