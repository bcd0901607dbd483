"""The queues page's chart of the last hour: one small inline SVG per queue, made here.

Each minute of :meth:`~dramaturg.status.StateStore.minute_history` is a bar as tall as
the attempts that ended in it (``processed``), its failed part drawn over its foot in
red, and a held mark above it when tasks were held; bars share one scale per queue (the
busiest minute fills the height). No JavaScript: the page's htmx refresh brings the
chart anew with the table. This module only computes numbers and text; the template
``_chart.html`` writes the SVG, so everything in it is escaped by Jinja.

>>> chart = minute_chart("imports", [(1764580800, {"processed": 4, "failed": 1, "retried": 0, "held": 1})])
>>> chart.bars[0].height, chart.bars[0].failed_height
(26.0, 6.5)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from ..status.store import HISTORY_MINUTES

__all__ = ["BAR_W", "HEIGHT", "WIDTH", "Bar", "MinuteChart", "minute_chart"]

#: A bar's width and the gap after it, px; the chart's size.
BAR_W = 3
GAP = 1
WIDTH = HISTORY_MINUTES * (BAR_W + GAP)
#: The chart's height, px: the bars' (``BARS_H``), the held marks' row above them.
HEIGHT = 30
HELD_H = 3
BARS_H = HEIGHT - HELD_H - 1


@dataclass(frozen=True)
class Bar:
    """One minute with something in it: where it is drawn and what it says."""

    minute: int  # the minute's start, s since the epoch
    x: int
    height: float  # processed, px
    failed_height: float
    processed: int
    failed: int
    retried: int
    held: int

    @property
    def y(self) -> float:
        return HEIGHT - self.height

    @property
    def failed_y(self) -> float:
        return HEIGHT - self.failed_height

    @property
    def label(self) -> str:
        """The bar's tooltip: ``12:34 UTC: 10 processed, 2 failed, 1 retried, 0 held``."""
        at = datetime.fromtimestamp(self.minute, UTC).strftime("%H:%M UTC")
        return (
            f"{at}: {self.processed:,} processed, {self.failed:,} failed, {self.retried:,} retried, {self.held:,} held"
        )


@dataclass(frozen=True)
class MinuteChart:
    """A queue's last hour, ready to draw (``bars``: only the minutes with counts)."""

    queue: str
    minutes: int
    bars: tuple[Bar, ...]
    totals: Mapping[str, int]
    peak: int  # the busiest minute's processed count: the height's scale

    @property
    def label(self) -> str:
        """What a screen reader says of the chart (its ``aria-label`` and ``<title>``)."""
        if not self.bars:
            return f"{self.queue}: nothing processed or held in the last {self.minutes} minutes"
        t = self.totals
        return (
            f"{self.queue}, last {self.minutes} minutes: {t['processed']:,} processed, {t['failed']:,} failed, "
            f"{t['retried']:,} retried, {t['held']:,} held; at most {self.peak:,} in a minute"
        )


def minute_chart(queue: str, history: Sequence[tuple[int, Mapping[str, int]]]) -> MinuteChart:
    """The chart of ``history``: minutes oldest first, the current one last (at the right)."""
    history = list(history)[-HISTORY_MINUTES:]
    names = ("processed", "failed", "retried", "held")
    totals = {name: sum(counts.get(name, 0) for _, counts in history) for name in names}
    peak = max((counts.get("processed", 0) for _, counts in history), default=0)
    offset = HISTORY_MINUTES - len(history)  # fewer minutes: drawn at the right, now stays at the edge
    bars = []
    for n, (minute, counts) in enumerate(history):
        processed, failed = counts.get("processed", 0), counts.get("failed", 0)
        held, retried = counts.get("held", 0), counts.get("retried", 0)
        if not (processed or held or failed or retried):
            continue
        height = round(BARS_H * processed / peak, 1) if peak else 0.0
        if processed:
            height = max(height, 1.0)  # one task in a busy hour still shows
        failed_height = round(height * min(failed, processed) / processed, 1) if processed else 0.0
        bars.append(
            Bar(
                minute=minute,
                x=(offset + n) * (BAR_W + GAP),
                height=height,
                failed_height=failed_height,
                processed=processed,
                failed=failed,
                retried=retried,
                held=held,
            )
        )
    return MinuteChart(queue=queue, minutes=HISTORY_MINUTES, bars=tuple(bars), totals=totals, peak=peak)
