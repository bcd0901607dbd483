"""``dramaturg drain QUEUE... --budget 10s``: process queues for a while and exit 0.

For cron jobs and schedulers that process a queue without a long-running worker. The
summary line (or ``--json``) says what was processed, retried, held, released and left.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from .. import app
from ..drain import drain
from ..errors import UsageError
from .common import boot, duration_ms


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "drain",
        help="process queues for a time budget, then stop (for cron)",
        description="Process the given queues for a time budget (or until they are empty), then exit 0.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  # crontab: every minute, 50 seconds of imports\n"
        "  * * * * *  cd /srv/shop && dramaturg drain imports --budget 50s\n"
        "  $ dramaturg drain imports emails --until-empty --threads 16\n",
    )
    parser.add_argument("queues", nargs="+", metavar="QUEUE")
    parser.add_argument("--budget", help="stop taking tasks after this long: 10s, 5m (default: none)")
    parser.add_argument("--until-empty", action="store_true", help="stop as soon as the queues are empty")
    parser.add_argument("--threads", type=int, default=8, help="tasks run at once (default: 8)")
    parser.add_argument(
        "--grace", default="30s", help="how long running tasks may finish before they are requeued (default: 30s)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON (default: one line)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    budget = duration_ms(args.budget, "--budget")
    grace = duration_ms(args.grace, "--grace") or 0
    if args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    _, broker = boot(args, echo="as_worker", ping_first=True)  # down: one line, exit 3
    summary = drain(
        args.queues,
        budget=budget,
        until_empty=args.until_empty,
        threads=args.threads,
        grace=grace,
        broker=broker,
    )
    print(json.dumps(asdict(summary)) if args.json else summary.line())
    app.shutdown()
    return 0
