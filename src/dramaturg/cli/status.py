"""``dramaturg status ID``: what became of one task (see :mod:`dramaturg.status`).

Exit codes: 0 when the task is known, 1 when it is unknown (never sent, or its record
expired after ``[state] ttl``), 3 when the state store does not answer, 78 when there
is no state store.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from ..errors import BrokerUnreachable, ConfigError
from ..masking import mask_text
from ..status import StateUnavailable, TaskStatus, task_status
from .common import boot

EPILOG = """\
examples:
  $ dramaturg status 1f0c2d7e-...            # one line of what it is doing, then the details
  $ dramaturg status 1f0c2d7e-... --json     # the same as one JSON object

states: queued, delayed, running, succeeded, retrying, held, failed, cancelled, purged, unknown
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        help="what became of a task, by its message id",
        description="Tell what became of a task: queued, delayed, running, succeeded, retrying, held, failed,"
        " cancelled or unknown, with the last error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("message_id", metavar="ID", help="the message id send() returned")
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: text)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import redis

    _, broker = boot(args)  # the actors' queues, for the held store
    try:
        status = task_status(args.message_id, broker)
    except StateUnavailable as error:
        raise ConfigError(str(error)) from None
    except redis.RedisError as error:
        raise BrokerUnreachable(f"the state store did not answer: {type(error).__name__}: {error}") from None
    if args.json:
        print(json.dumps(status.to_dict()))
    else:
        print(describe(status))
    return 0 if status.state != "unknown" else 1


def describe(status: TaskStatus) -> str:
    """A headline (the state, in words), then one line per known detail."""
    lines = [f"{status.message_id}: {headline(status)}"]
    rows = [
        ("actor", status.actor),
        ("queue", status.queue),
        ("attempt", status.attempt),
        ("enqueued at", _at(status.enqueued_at)),
        ("worker", status.worker),
        ("started at", _at(status.started_at)),
        ("finished at", _at(status.finished_at)),
        ("duration", f"{status.duration_ms} ms" if status.duration_ms is not None else None),
        ("progress", _progress(status)),
        ("reason", status.reason),
        ("last error", status.last_error),
        ("cancel", _asked(status)),
        ("updated at", _at(status.updated_at)),
    ]
    lines += [f"  {name + ':':<13}{mask_text(str(value))}" for name, value in rows if value is not None]
    return "\n".join(lines)


def headline(status: TaskStatus) -> str:
    state = status.state
    if state == "delayed":
        return f"delayed until {_at(status.eta)}"
    if state == "retrying":
        return f"retrying: attempt {status.attempt} runs at {_at(status.eta)}"
    if state == "running":
        return f"running on {status.worker} since {_at(status.started_at)}"
    if state == "succeeded":
        return f"succeeded at {_at(status.finished_at)} after {status.duration_ms} ms"
    if state == "held":
        return f"held: {status.reason}"
    if state == "waiting":
        return f"{status.reason}; next try at {_at(status.eta)}"
    if state == "failed":
        return "failed: it could not be retried or held, and was rejected into the dead-letter queue"
    if state == "cancelled":
        return f"cancelled at {_at(status.finished_at)}" + (
            f" (asked by {status.cancel_requested_by})" if status.cancel_requested_by else ""
        )
    if state == "purged":
        return f"purged at {_at(status.finished_at)}: dropped from its queue before it ran"
    if state == "unknown":
        return "unknown" + (f": {status.reason}" if status.reason else " (never sent, or its record expired)")
    return state


def _asked(status: TaskStatus) -> str | None:
    if status.cancel_requested_by is None:
        return None
    return f"asked by {status.cancel_requested_by} at {_at(status.cancel_requested_at)}"


def _progress(status: TaskStatus) -> str | None:
    if status.progress is None:
        return None
    return f"{status.progress * 100:.0f}%" + (f" {status.progress_text}" if status.progress_text else "")


def _at(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="milliseconds")
