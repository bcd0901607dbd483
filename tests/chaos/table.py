"""The reliability table: the chaos suite's rows, one line per fault and broker.

``python tests/chaos/table.py ROWS.jsonl docs/RELIABILITY.md`` replaces the table
between the page's ``<!-- chaos-table -->`` markers with the rows of ``ROWS.jsonl`` (one
JSON object per scenario run, written by the suite when ``DRAMATURG_CHAOS_ROWS`` names
the file). ``make chaos`` runs the full suite and then this.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BEGIN = "<!-- chaos-table -->"
END = "<!-- /chaos-table -->"
BROKER_ORDER = {"rabbitmq": 0, "redis": 1, "embedded": 2}
COLUMNS = ("fault", "broker", "runs", "sent", "succeeded", "held", "queued", "lost", "duplicates", "recover")


def _value(row: Any, name: str) -> Any:
    return row[name] if isinstance(row, dict) else getattr(row, name)


def aggregate(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """Rows of one fault and broker added up (runs counted, the slowest recovery kept)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    order: list[tuple[str, str]] = []
    for row in rows:
        key = (_value(row, "fault"), _value(row, "broker"))
        if key not in merged:
            order.append(key)
            merged[key] = {"fault": key[0], "broker": key[1], "runs": 0, "recover": None, "notes": []}
            merged[key].update(dict.fromkeys(("sent", "succeeded", "held", "queued", "lost", "duplicates"), 0))
            merged[key]["unexplained"] = merged[key]["stuck"] = 0
            merged[key]["problems"] = []
        into = merged[key]
        into["runs"] += int(_value(row, "runs"))
        for name in ("sent", "succeeded", "held", "queued", "lost", "duplicates", "unexplained", "stuck"):
            into[name] += int(_value(row, name))
        recover = _value(row, "recover_s")
        if recover == "never":
            recover = float("inf")
        if recover is not None:
            into["recover"] = recover if into["recover"] is None else max(into["recover"], recover)
        into["problems"] += _value(row, "problems")
        into["notes"] += [note for note in _value(row, "notes") if note not in into["notes"]]
    return [merged[key] for key in order]


def _recover(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "never"
    return f"{value:.1f} s"


def _short(note: str, limit: int = 240) -> str:
    """One line of at most ``limit`` characters."""
    text = " ".join(note.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render(rows: Sequence[Any]) -> str:
    """A Markdown table of ``rows`` (Row objects or their dicts), failed lines marked."""
    lines = [
        "| fault | broker | runs | sent | succeeded | held | queued | lost | duplicates (unexplained) | to recover |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for row in aggregate(rows):
        failed = row["lost"] or row["unexplained"] or row["stuck"] or row["problems"]
        mark = " **FAILED**" if failed else ""
        lines.append(
            f"| {row['fault']}{mark} | {row['broker']} | {row['runs']} | {row['sent']} | {row['succeeded']}"
            f" | {row['held']} | {row['queued']} | {row['lost']} | {row['duplicates']} ({row['unexplained']})"
            f" | {_recover(row['recover'])} |"
        )
        if failed:
            found = [_short(note) for note in row["problems"][:3] + row["notes"][:3]]
            notes.append(f"- {row['fault']} on {row['broker']}: " + "; ".join(found))
    return "\n".join(lines + (["", *notes] if notes else []))


def rewrite(page: Path, rows: Sequence[Any]) -> None:
    text = page.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    scales = sorted({_value(row, "scale") for row in rows if isinstance(row, dict) and "scale" in row})
    how = "the full run (`make chaos`)" if scales == ["full"] else f"a {'/'.join(scales) or 'bounded'} run"
    body = f"\n\n_Written on {stamp} from {how}, on a 2-core machine._\n\n{render(rows)}\n\n"
    page.write_text(text[:start] + body + text[stop:])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: table.py ROWS.jsonl PAGE.md", file=sys.stderr)
        return 2
    rows_path, page = Path(argv[0]), Path(argv[1])
    if not rows_path.is_file():
        print(f"{rows_path}: no rows (did the chaos suite run?)", file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    rewrite(page, rows)
    print(f"{page}: {len(aggregate(rows))} lines from {len(rows)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
