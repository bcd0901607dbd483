"""What a schedule is, and when its slots fall.

A :class:`Schedule` is an actor to send with fixed arguments at each *slot*: a point in
time a cron expression (in a time zone) or a fixed interval (``every``) names. A slot is
an instant, kept as milliseconds since the epoch (UTC), so that every scheduler, whatever
its local zone, names the same slot the same way; the hour repeated when clocks go back
is two different instants, hence two slots, and the library decides which of them a
cron expression names.

Cron expressions are read by `cronsim <https://pypi.org/project/cronsim/>`_ (Healthchecks.io's
parser): pure Python, no dependencies, typed, maintained, and it defines daylight-saving
changes the way Debian's cron does, which is what people who write crontabs expect:

- clocks go forward (Europe/Paris, last Sunday of March, 02:00 -> 03:00): a daily
  ``30 2 * * *`` fires at 03:00 that day (the skipped time runs when the clock jumps);
  an hourly ``0 * * * *`` has no 02:00 slot that day (01:00, then 03:00);
- clocks go back (last Sunday of October, 03:00 -> 02:00): ``30 2 * * *`` fires once, at
  the first 02:30; ``0 * * * *`` fires at both 02:00s (they are an hour apart).

``every`` slots are multiples of the interval since the Unix epoch (``every="30s"``:
hh:mm:00 and hh:mm:30 UTC), so that every scheduler agrees on them without talking;
the time zone does not apply.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from ..durations import parse_ms

__all__ = ["OVERLAP_POLICIES", "Overlap", "Schedule", "check_cron", "check_timezone", "config_line"]

Overlap = Literal["queue", "skip", "cancel-previous"]
#: What a slot does while the previous firing has not ended: ``queue`` sends it anyway,
#: ``skip`` leaves the slot out, ``cancel-previous`` cancels the previous firing (see
#: :func:`dramaturg.cancel`) and sends the slot.
OVERLAP_POLICIES: tuple[str, ...] = ("queue", "skip", "cancel-previous")


@dataclass(frozen=True)
class Schedule:
    """One schedule. ``actor`` is the actor's name as the broker knows it (``actor_name``).

    Exactly one of ``cron`` and ``every_ms`` is set. ``catch_up_ms``: after a time with
    no scheduler running, the missed slots of this last window fire, each once, oldest
    first (None: none do; a slot still fires up to ``grace_ms`` late).
    """

    id: str
    actor: str
    cron: str | None = None
    every_ms: int | None = None
    timezone: str = "UTC"
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    overlap: Overlap = "queue"
    catch_up_ms: int | None = None
    #: Where it was declared: ``"code shop.tasks:report"`` or ``"dramaturg.toml line 12"``.
    origin: str = ""
    #: A drain schedule (``actor`` is empty): the queues one scheduler works at each slot,
    #: for ``drain_budget_ms``, with ``drain_threads`` threads.
    drain_queues: tuple[str, ...] = ()
    drain_budget_ms: int | None = None
    drain_threads: int = 8

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every_ms is None):
            raise ValueError("give either a cron expression or every=, not both or neither")
        if self.every_ms is not None and self.every_ms < 1000:
            raise ValueError(f"every={self.every_ms} ms: the shortest interval is 1s")
        if self.cron is not None:
            check_cron(self.cron)
        check_timezone(self.timezone)
        if bool(self.actor) == bool(self.drain_queues):
            raise ValueError("give an actor (module:attribute) or a drain = { queues, budget }, not both or neither")
        if self.drain_queues and not self.drain_budget_ms:
            raise ValueError("a drain needs a budget, e.g. drain = { queues = ['imports'], budget = '50s' }")
        if self.overlap not in OVERLAP_POLICIES:
            raise ValueError(f"overlap {self.overlap!r}: choose one of {', '.join(OVERLAP_POLICIES)}")

    @property
    def expression(self) -> str:
        """``*/5 * * * * (Europe/Paris)`` or ``every 30s``: as ``schedule list`` shows it."""
        if self.cron is not None:
            return self.cron if self.timezone == "UTC" else f"{self.cron} ({self.timezone})"
        return f"every {_format_ms(self.every_ms or 0)}"

    @property
    def what(self) -> str:
        """The actor's name, or ``drain imports, emails for 50s``."""
        if self.drain_queues:
            return f"drain {', '.join(self.drain_queues)} for {_format_ms(self.drain_budget_ms or 0)}"
        return self.actor

    def definition(self) -> dict[str, Any]:
        """What makes the schedule what it is, as JSON-ready data (kept in the state store)."""
        return {
            "actor": self.actor,
            "cron": self.cron,
            "every_ms": self.every_ms,
            "timezone": self.timezone,
            "args": list(self.args),
            "kwargs": dict(self.kwargs),
            "overlap": self.overlap,
            "catch_up_ms": self.catch_up_ms,
            **(
                {"drain": [list(self.drain_queues), self.drain_budget_ms, self.drain_threads]}
                if self.drain_queues
                else {}
            ),
        }

    @property
    def digest(self) -> str:
        """A digest of :meth:`definition`: two schedulers fire a schedule only while they agree on it."""
        text = json.dumps(self.definition(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    # -- slots -----------------------------------------------------------------------------

    def slots_after(self, after_ms: int) -> Iterator[int]:
        """The slots strictly after ``after_ms``, in order (ms since the epoch), without end."""
        if self.every_ms is not None:
            slot = (after_ms // self.every_ms + 1) * self.every_ms
            while True:
                yield slot
                slot += self.every_ms
        assert self.cron is not None
        zone = ZoneInfo(self.timezone)
        # cronsim starts at the next whole second after its start; seconds are its unit.
        start = datetime.fromtimestamp(after_ms // 1000, UTC).astimezone(zone)
        for moment in CronSim(self.cron, start):
            slot = int(moment.timestamp()) * 1000
            if slot > after_ms:
                yield slot

    def next_slot(self, after_ms: int) -> int:
        """The first slot strictly after ``after_ms``."""
        return next(self.slots_after(after_ms))

    def count_between(self, after_ms: int, until_ms: int, cap: int = 100_000) -> int:
        """How many slots fall in ``(after_ms, until_ms]``, counted up to ``cap``."""
        if self.every_ms is not None:
            return min(cap, max(0, until_ms // self.every_ms - after_ms // self.every_ms))
        count = 0
        for slot in self.slots_after(after_ms):
            if slot > until_ms or count >= cap:
                break
            count += 1
        return count

    def slots_between(self, after_ms: int, until_ms: int, limit: int = 10_000) -> list[int]:
        """The slots in ``(after_ms, until_ms]``, oldest first (at most ``limit``, the newest kept)."""
        found: list[int] = []
        for slot in self.slots_after(after_ms):
            if slot > until_ms:
                break
            found.append(slot)
            if len(found) > limit:
                del found[0]
        return found


def check_cron(expression: str) -> None:
    """Raise ValueError (the library's reason) unless ``expression`` is a cron expression."""
    if len(expression.split()) not in (5, 6):
        raise ValueError(f"cron {expression!r} is not valid: write five fields (minute hour day month weekday)")
    try:
        CronSim(expression, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as error:
        raise ValueError(f"cron {expression!r} is not valid: {str(error).lower()}") from None


def check_timezone(name: str) -> None:
    """Raise ValueError unless ``name`` is an IANA time zone zoneinfo knows (``Europe/Paris``)."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}; write an IANA name such as 'Europe/Paris' or 'UTC'") from None


def parse_every(value: str | int | timedelta) -> int:
    """``every="30s"`` (or ms, or a timedelta) as milliseconds."""
    if isinstance(value, timedelta):
        return int(value.total_seconds() * 1000)
    return parse_ms(value, what="every")


def config_line(path: Path | None, schedule_id: str, index: int) -> str:
    """Where the ``index``-th ``[[schedules]]`` table (whose id is ``schedule_id``) is in ``path``:
    ``"dramaturg.toml line 12"`` (the line of its ``id``), else the file, else "the configuration"."""
    if path is None:
        return "the configuration"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return str(path)
    pattern = re.compile(r"""^\s*id\s*=\s*(["'])""" + re.escape(schedule_id) + r"""\1\s*(#.*)?$""")
    for number, line in enumerate(lines, start=1):
        if pattern.match(line):
            return f"{path} line {number}"
    tables = [
        n for n, line in enumerate(lines, start=1) if re.match(r"^\s*\[\[\s*(tool\.dramaturg\.)?schedules\s*\]\]", line)
    ]
    if index < len(tables):
        return f"{path} line {tables[index]}"
    return str(path)


def _format_ms(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
