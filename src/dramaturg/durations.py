"""Durations: one parser and one formatter for the whole package.

Wherever dramaturg takes a duration it takes the same forms: in settings
(``ttr = "5m"``), on the command line (``--budget 50s``), and in code, ``retry(delay)``,
``touch(ms)``, ``SuspendQueue(delay)`` and ``drain(budget=..., grace=...)``:

- an int: milliseconds (``30_000``);
- a :class:`~datetime.timedelta`;
- text: a number and a unit, ``ms``, ``s``, ``m``, ``h`` or ``d`` (``"250ms"``,
  ``"30s"``, ``"1.5m"``, ``"2h"``), or a number alone, in milliseconds (``"1500"``).

The code keeps whole milliseconds (in names ending in ``_ms``). A float is taken as
milliseconds too, its fraction dropped.

>>> parse_ms("5m"), parse_ms(timedelta(seconds=2)), format_ms(90_000)
(300000, 2000, '90s')
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import TypeAlias

from .errors import quoted

__all__ = ["Duration", "format_ms", "parse_ms"]

#: What a duration may be given as (see the module docstring).
Duration: TypeAlias = int | timedelta | str

_TEXT = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}

#: The longest duration taken: 100 years (36,500 days). Past it, what a duration reaches
#: (a sleep, a socket's timeout, a date) overflows the platform's clocks; no wait is longer.
MAX_MS = 36_500 * 86_400_000


def parse_ms(value: Duration | float, *, what: str | None = None) -> int:
    """Whole milliseconds from a duration in any of its forms (see the module docstring).

    Raises :class:`ValueError` naming the value and the forms a duration takes, or, for
    a negative one, saying so; ``what`` (what took it: ``"retry"``, ``"--budget"``)
    starts the message.

    >>> parse_ms("250ms"), parse_ms("30s"), parse_ms(1500)
    (250, 30000, 1500)
    """
    try:
        return _parse_ms(value)
    except ValueError as error:
        raise ValueError(f"{what}: {error}" if what else str(error)) from None


def _parse_ms(value: Duration | float) -> int:
    if isinstance(value, bool):  # an int to Python, never a duration
        raise ValueError(f"{value!r} is not a duration")
    match = _TEXT.match(value) if isinstance(value, str) else None
    amount: int | float
    if isinstance(value, timedelta):
        amount = value.total_seconds() * 1000
    elif isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        amount = value
    elif match:
        amount = float(match["number"]) * _UNIT_MS[match["unit"] or "ms"]
    else:
        raise ValueError(
            f"{value!r} is not a duration; write milliseconds (30000) or a string such as '30s', '5m', '250ms'"
        )
    if amount < 0:
        raise ValueError(f"a duration cannot be negative, got {quoted(value, 40)}")
    if not amount <= MAX_MS:  # also inf, from a number too long for a float
        raise ValueError(f"a duration can be at most 36500d (100 years), got {quoted(value, 40)}")
    return int(amount)


def format_ms(ms: int) -> str:
    """A duration in the largest unit that divides it, as :func:`parse_ms` reads it back.

    >>> format_ms(86_400_000), format_ms(1_800_000), format_ms(90_000), format_ms(1500)
    ('1d', '30m', '90s', '1500ms')
    """
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
