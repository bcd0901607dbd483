"""``dramaturg workers [--json]``: the worker processes alive now (see :mod:`dramaturg.workers`).

Exit codes: 0 (also when no worker runs), 3 when the state store does not answer, 78
when there is none (RabbitMQ without ``[state] url``).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from typing import Any

from .. import app
from ..config import load_settings
from ..errors import BrokerUnreachable, ConfigError, StateUnavailable
from ..masking import mask_text
from ..workers import WorkerInfo, workers

EPILOG = """\
examples:
  $ dramaturg workers              # host, pid, queues, tasks running / threads, started, last seen
  $ dramaturg workers --json       # one JSON array of the same

Each worker process writes its record every 5 s and drops off the list 15 s after its
last one (at once when it stops cleanly); the tasks running are as of its last write.
"""

HEADER = ("host", "pid", "queues", "running", "started", "last seen")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "workers",
        help="the worker processes alive now: host, pid, queues, tasks running",
        description="List the worker processes alive now, from their records in the state store.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON array (default: a table)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import redis

    broker = app.bootstrap(load_settings(args.config))
    try:
        found = workers(broker)
    except StateUnavailable as error:
        raise ConfigError(str(error)) from None
    except redis.RedisError as error:
        raise BrokerUnreachable(f"the state store did not answer: {type(error).__name__}: {error}") from None
    if args.json:
        print(json.dumps([info.to_dict() for info in found]))
    else:
        print(mask_text(table(found, int(time.time() * 1000))))
    return 0


def table(found: list[WorkerInfo], now_ms: int) -> str:
    """The workers as aligned columns, or one line saying there are none."""
    if not found:
        return "no worker is running"
    rows = [HEADER] + [
        (
            info.host,
            str(info.pid),
            ",".join(info.queues) or "-",
            f"{info.running}/{info.threads}",
            _at(info.started_at),
            f"{max(now_ms - info.seen_at, 0) / 1000:.0f} s ago",
        )
        for info in found
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _at(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="seconds")
