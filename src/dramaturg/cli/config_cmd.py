"""``dramaturg config show`` and ``dramaturg config check``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import brokers
from ..config import load_settings
from ..masking import mask_url


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "config",
        help="show or check the configuration",
        description="Show the effective settings, or check that the broker answers.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    show = actions.add_parser("show", help="print every setting, its value and where it came from (secrets masked)")
    show.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    show.set_defaults(run=run_show)

    check = actions.add_parser("check", help="connect to the broker and report the round trip")
    check.add_argument("--json", action="store_true", help="print JSON (default: one line)")
    check.set_defaults(run=run_check)


def run_show(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    rows = [(key, value, settings.source_of(key)) for key, value in settings.flat().items()]
    if args.json:
        print(
            json.dumps(
                {
                    "config_file": str(settings.config_file) if settings.config_file else None,
                    "settings": {key: {"value": value, "source": source} for key, value, source in rows},
                },
                indent=2,
            )
        )
        return 0
    print(f"config file: {settings.config_file or '(none found; defaults and environment only)'}")
    shown = [(key, json.dumps(value), source) for key, value, source in rows]
    widths = [max(len(row[i]) for row in [("key", "value", "source"), *shown]) for i in range(3)]
    for row in [("key", "value", "source"), *shown]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def run_check(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    latency_ms = brokers.ping(settings.broker)
    url = mask_url(settings.broker.url)
    if args.json:
        print(json.dumps({"ok": True, "type": settings.broker.type, "url": url, "latency_ms": round(latency_ms, 3)}))
    else:
        print(f"ok: {settings.broker.type} broker at {url} answered in {latency_ms:.1f} ms")
    return 0
