"""``dramaturg queue list|peek|purge|delete``: administer queues (see :mod:`dramaturg.queue_admin`).

A name with a reserved suffix (``imports.DQ``) or one no queue has is refused with one
line naming the closest known queue (exit 2). Purging and deleting ask first at a
terminal and need ``--yes`` otherwise (exit 2 without it); a delete refused because the
queue is in use exits 1; a broker that does not answer, 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .. import app
from ..errors import BrokerUnreachable, QueueInUse, UsageError
from ..exit_codes import EXIT_FAILURE
from ..queue_admin import (
    MAX_PEEK,
    QueueAdmin,
    as_dicts,
    check_queue,
    delete_queue,
    finish_left_purges,
    list_queues,
    peek_queue,
    purge_queue,
    queue_admin,
)
from ..stats import queue_stats
from .common import boot, complain
from .stats import document, table

EPILOG = """\
examples:
  $ dramaturg queue list                      # every known queue with its counts
  $ dramaturg queue peek imports --limit 5    # the next five waiting tasks, not taken
  $ dramaturg queue purge imports             # asks, then drops the waiting tasks
  $ dramaturg queue purge imports --delayed --yes
  $ dramaturg queue delete old-imports --yes  # refused while workers consume it or tasks are held
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "queue",
        help="list, peek at, purge or delete queues",
        description="Administer queues: the same on RabbitMQ, Redis and embedded.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="the known queues with their counts (as dramaturg stats)")
    listing.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    listing.set_defaults(run=run_list)

    peek = actions.add_parser("peek", help="the next waiting tasks, without taking them")
    peek.add_argument("queue", metavar="QUEUE")
    peek.add_argument("--limit", type=int, default=10, help=f"at most this many, up to {MAX_PEEK} (default: 10)")
    peek.add_argument("--json", action="store_true", help="print JSON lines (default: a table)")
    peek.set_defaults(run=run_peek)

    purge = actions.add_parser("purge", help="drop the waiting tasks of a queue (never held or running ones)")
    purge.add_argument("queue", metavar="QUEUE")
    purge.add_argument("--delayed", action="store_true", help="drop the delayed tasks too (default: keep them)")
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask (default: ask at a terminal)")
    purge.set_defaults(run=run_purge)

    delete = actions.add_parser("delete", help="remove an unused queue with its delay, dead-letter and held queues")
    delete.add_argument("queue", metavar="QUEUE")
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask (default: ask at a terminal)")
    delete.add_argument(
        "--force", action="store_true", help="delete even while workers consume it or tasks are held (default: refuse)"
    )
    delete.set_defaults(run=run_delete)


def run_list(args: argparse.Namespace) -> int:
    _, broker = boot(args, ping_first=True)
    try:
        _finish_left_purges(broker)
        rows = list_queues(broker)
        print(json.dumps(document(rows), indent=2) if args.json else table(rows))
        return 0
    finally:
        app.shutdown()


def run_peek(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= MAX_PEEK:
        raise UsageError(f"--limit must be from 1 to {MAX_PEEK}, not {args.limit}")
    _, broker = boot(args, ping_first=True)
    try:
        tasks = peek_queue(args.queue, args.limit, broker)
        if args.json:
            for task in as_dicts(tasks):
                print(json.dumps(task))
            return 0
        if not tasks:
            print(f"no tasks waiting in {args.queue}")
            return 0
        header = ("id", "actor", "arguments", "enqueued at", "priority", "due")
        rows = [
            (t.message_id, t.actor, t.arguments, _at(t.enqueued_at), str(t.priority), _at(t.due_at) or "now")
            for t in tasks
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        return 0
    finally:
        app.shutdown()


def run_purge(args: argparse.Namespace) -> int:
    _, broker = boot(args, ping_first=True)
    try:
        check_queue(args.queue, broker)
        what = "waiting and delayed" if args.delayed else "waiting"
        if not _confirmed(args, lambda: _purge_question(broker, args.queue, what, args.delayed)):
            print("nothing purged")
            return EXIT_FAILURE
        purged = purge_queue(args.queue, delayed=args.delayed, broker=broker)
        print(f"purged {purged} {what} task{'s' if purged != 1 else ''} of {args.queue}")
        return 0
    finally:
        app.shutdown()


def run_delete(args: argparse.Namespace) -> int:
    _, broker = boot(args, ping_first=True)
    try:
        check_queue(args.queue, broker)
        queue_admin(broker)  # no administration on this broker: said before asking
        if not _confirmed(
            args, lambda: f"Delete queue {args.queue} and every task waiting in it? This cannot be undone."
        ):
            print("nothing deleted")
            return EXIT_FAILURE
        try:
            deleted = delete_queue(args.queue, force=args.force, broker=broker)
        except QueueInUse as error:
            complain(str(error), exit_code=EXIT_FAILURE)
            return EXIT_FAILURE
        removed = ", ".join(deleted.removed) or "nothing left on the broker"
        print(f"deleted queue {args.queue}: {deleted.dropped} task(s) dropped; removed {removed}")
        return 0
    finally:
        app.shutdown()


def _finish_left_purges(broker: Any) -> None:
    """Finish what purges that died left behind (saying so in one WARNING line), so that the
    counts listed include it; a state store that does not answer leaves it for later."""
    if isinstance(getattr(broker, "queue_admin", None), QueueAdmin):
        try:
            finish_left_purges(broker)
        except BrokerUnreachable as error:
            logging.getLogger("dramaturg.queue_admin").warning("a purge that stopped midway is not finished: %s", error)


def _confirmed(args: argparse.Namespace, question: Callable[[], str]) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError(f"dramaturg queue {args.action} {args.queue} needs --yes when not asked at a terminal")
    return input(f"{question()} [y/N] ").strip().lower() in {"y", "yes"}


def _purge_question(broker: Any, queue: str, what: str, delayed: bool) -> str:
    """The question says how many (RabbitMQ's count may lag by a few seconds)."""
    row = queue_stats([queue], broker)[0]
    count = (row.ready or 0) + ((row.delayed or 0) if delayed else 0)
    return f"Drop the {count} {what} task{'s' if count != 1 else ''} of {queue}? This cannot be undone."


def _at(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="seconds")
