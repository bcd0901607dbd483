"""``dramaturg stats [QUEUE...] [--json] [--watch 2s]``: the state of the queues.

The same columns on every broker (see :mod:`dramaturg.stats`): ready, delayed, in flight,
held, dead, workers, the per-minute counts of a counter store (``-`` without one), and
the tasks waiting for a concurrency slot or a rate token (``-`` without a state store).
Without queue names: the queues of ``worker.modules``' actors, those with held tasks and
those the broker holds messages or workers for.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

from .. import app
from ..errors import UsageError, did_you_mean
from ..schedules import missed_slots
from ..stats import QueueStats, queue_stats, stats_reader, totals
from .common import boot, complain, duration_ms

EPILOG = """\
examples:
  $ dramaturg stats                          # every known queue, a total row when several
  $ dramaturg stats imports emails --json
  $ dramaturg stats --watch 2s               # redraw every 2 seconds until Ctrl-C
  $ dramaturg stats --watch 5s --json        # one JSON object per line, every 5 seconds
"""

#: (header, QueueStats field), in the order shown.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("queue", "queue"),
    ("ready", "ready"),
    ("delayed", "delayed"),
    ("in flight", "in_flight"),
    ("held", "held"),
    ("dead", "dead"),
    ("workers", "workers"),
    ("processed/min", "processed_per_min"),
    ("failed/min", "failed_per_min"),
    ("retried/min", "retried_per_min"),
    ("held/min", "held_per_min"),
    ("waiting for limits", "waiting_for_limits"),
)
#: The shortest --watch interval.
MIN_WATCH_MS = 100


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="ready, delayed, in flight, held, dead and workers per queue",
        description="Show the state of queues: the same columns on every broker.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument(
        "queues",
        nargs="*",
        metavar="QUEUE",
        help="only these queues (default: the actors' queues, those with held tasks and those on the broker)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    parser.add_argument(
        "--watch", metavar="INTERVAL", help="refresh every INTERVAL (2s, 1m) until Ctrl-C (default: once)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    interval_ms = _interval_ms(args.watch)
    # An unreachable broker: one line, before any reader warns on its own.
    _, broker = boot(args, ping_first=True)
    try:
        queues = list(args.queues) or None
        while True:
            rows = queue_stats(queues, broker)
            try:
                missed = missed_slots(broker)
            except Exception:  # a ledger that cannot be read leaves the queues' numbers alone
                missed = {}
            if args.json:
                print(json.dumps(document(rows, missed), indent=None if interval_ms else 2), flush=True)
            else:
                if interval_ms and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")  # home and clear: redraw in place
                if interval_ms:
                    print(f"every {args.watch.strip()}, {_now()} (Ctrl-C to stop)")
                print(table(rows), flush=True)
                if missed:
                    print(schedules_line(missed), flush=True)
            if queues is not None and interval_ms is None:
                _note_unknown(rows, stats_reader(broker).known_queues())
            if interval_ms is None:
                return 0
            time.sleep(interval_ms / 1000)
    except KeyboardInterrupt:
        return 0
    finally:
        app.shutdown()


def _interval_ms(text: str | None) -> int | None:
    interval = duration_ms(text, "--watch")
    if interval is None:
        return None
    if interval < MIN_WATCH_MS:
        raise UsageError(f"--watch: {text!r} is {interval} ms, under {MIN_WATCH_MS} ms; write e.g. 2s")
    return interval


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def document(rows: Sequence[QueueStats], missed: dict[str, int] | None = None) -> dict[str, Any]:
    """The JSON of one refresh: ``{"time": ..., "queues": [row, ...], "missed_slots": {schedule: n}}``
    (``null``: unknown; ``missed_slots``: the registered schedules', see :mod:`dramaturg.schedules`)."""
    return {"time": _now(), "queues": [asdict(row) for row in rows], "missed_slots": dict(missed or {})}


def schedules_line(missed: dict[str, int]) -> str:
    """``schedules: 2, missed slots: 3 (nightly 3)``"""
    late = ", ".join(f"{schedule_id} {count}" for schedule_id, count in missed.items() if count)
    return f"schedules: {len(missed)}, missed slots: {sum(missed.values())}" + (f" ({late})" if late else "")


def table(rows: Sequence[QueueStats]) -> str:
    """Fixed columns, numbers right-aligned, ``-`` for unknown; a total row when several."""
    header = tuple(title for title, _ in COLUMNS)
    lines = [tuple(_cell(getattr(row, field)) for _, field in COLUMNS) for row in rows]
    if len(rows) > 1:
        summed = {"queue": "total", **totals(rows), "workers": ""}
        lines.append(tuple(_cell(summed[field]) for _, field in COLUMNS))
    if not rows:
        return "no queues (name one: dramaturg stats QUEUE)"
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def render(line: tuple[str, ...]) -> str:
        numbers = [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        return "  ".join([line[0].ljust(widths[0]), *numbers]).rstrip()

    return "\n".join(render(line) for line in [header, *lines])


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def _note_unknown(rows: Sequence[QueueStats], known: set[str]) -> None:
    """A queue nobody declared that the broker has nothing for is most likely a typo."""
    for row in rows:
        counts = [getattr(row, field) for _, field in COLUMNS[1:7]]
        if row.queue not in known and not any(counts):
            hint = did_you_mean(row.queue, sorted(known))
            complain(
                f"note: queue {row.queue!r} is not one of worker.modules' actors' and is empty{hint}",
                level=logging.WARNING,
            )
