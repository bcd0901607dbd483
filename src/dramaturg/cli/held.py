"""``dramaturg held list|show|kick|purge``: examine and act on held tasks.

The command reads the configuration and imports ``worker.modules``, so it knows the
queues of the application's actors (RabbitMQ cannot list queues; name one to be sure).
A queue name that cannot be one, or an id that looks like a shell pattern and names no
held task (an unmatched ``*`` the shell passed on), is refused with exit code 2: acting
on every held task of a queue takes ``--all``, never an id. A broker that does not
answer, or a connection lost on the way, is one line and exit code 3 (also when there
is no queue to look at: "no held tasks" is never said of a broker that was not asked).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from typing import Any

from .. import brokers
from ..errors import KickError, UsageError
from ..held import HeldStore, HeldTask, held_tasks
from .common import LIMIT_MAX, OFFSET_MAX, boot, complain, duration_ms, whole

EPILOG = """\
examples:
  $ dramaturg held list                      # every queue, oldest first
  $ dramaturg held list imports --limit 20 --offset 20
  $ dramaturg held show 1f0c...              # everything, traceback included
  $ dramaturg held kick imports 1f0c... 9a2b...
  $ dramaturg held kick imports --all --delay 5m
  $ dramaturg held purge imports --all --yes
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "held",
        help="list, show, kick (requeue) or purge held tasks",
        description="Examine held tasks and requeue or delete them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="a table of held tasks: id, queue, actor, reason, attempts, held at")
    listing.add_argument("queue", nargs="?", help="only this queue (default: every queue)")
    listing.add_argument("--limit", type=whole(1, LIMIT_MAX), default=50, help="at most this many (default: 50)")
    listing.add_argument("--offset", type=whole(0, OFFSET_MAX), default=0, help="skip this many first (default: 0)")
    listing.add_argument("--json", action="store_true", help="print JSON lines (default: a table)")
    listing.set_defaults(run=run_list)

    show = actions.add_parser("show", help="everything about one held task, traceback included")
    show.add_argument("message_id", metavar="ID")
    show.add_argument("--queue", help="look only in this queue (default: every queue)")
    show.add_argument("--json", action="store_true", help="print JSON (default: text)")
    show.set_defaults(run=run_show)

    for name, verb in (("kick", "requeue"), ("purge", "delete")):
        action = actions.add_parser(name, help=f"{verb} held tasks of a queue")
        action.add_argument("queue", metavar="QUEUE")
        action.add_argument("message_ids", nargs="*", metavar="ID", help=f"the tasks to {verb}")
        action.add_argument("--all", action="store_true", help=f"{verb} every held task of the queue")
        if name == "kick":
            action.add_argument("--delay", help="run them no earlier than this from now: 30s, 5m (default: now)")
            action.set_defaults(run=run_kick)
        else:
            action.add_argument("--yes", "-y", action="store_true", help="do not ask before purging --all")
            action.set_defaults(run=run_purge)


#: Characters of a shell pattern: an id holding one was probably meant for the shell.
_GLOB = frozenset("*?[")


def _store(args: argparse.Namespace) -> HeldStore:
    settings, broker = boot(args)
    store = held_tasks(broker)
    queue = getattr(args, "queue", None)
    if queue is not None:  # a typed name: refused with one line before the broker is asked
        store.check_queue(queue)
    brokers.ping(settings.broker)  # unreachable: one line, exit 3 (a list of no queue asks it nothing)
    return store


def _millis(ms: int) -> str:
    if ms <= 0:
        return "?"
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="seconds")


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _ids(args: argparse.Namespace) -> list[str] | None:
    if args.all and args.message_ids:
        raise UsageError("give message ids or --all, not both")
    if not args.all and not args.message_ids:
        raise UsageError("give the message ids to act on, or --all")
    return None if args.all else list(args.message_ids)


def _refuse_patterns(store: HeldStore, queue: str, ids: list[str] | None) -> None:
    """Refuse an id that looks like a shell pattern unless a held task has exactly that id."""
    for message_id in ids or ():
        if _GLOB.intersection(message_id) and store.get(message_id, queue) is None:
            raise UsageError(
                f"no held task with id {message_id!r} in {queue}; it looks like a shell pattern that matched"
                " no file: to act on every held task of the queue, give --all"
            )


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Mute a library's logger for the duration of a command step (this process only)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _report_unreadable(tasks: list[HeldTask]) -> None:
    unreadable = [task.message_id for task in tasks if task.is_unreadable]
    if unreadable:
        complain(
            f"{len(unreadable)} held entr{'ies' if len(unreadable) != 1 else 'y'} could not be read"
            f" ({', '.join(unreadable[:5])}{', ...' if len(unreadable) > 5 else ''}): listed as unreadable;"
            " `dramaturg held show ID` prints what is stored, `dramaturg held purge QUEUE ID` deletes it",
            level=logging.WARNING,
        )


def run_list(args: argparse.Namespace) -> int:
    store = _store(args)
    tasks = store.list(args.queue, offset=args.offset, limit=args.limit)
    _report_unreadable(tasks)
    if args.json:
        for task in tasks:
            print(json.dumps(asdict(task)))
        return 0
    if not tasks:
        print(f"no held tasks{' in ' + args.queue if args.queue else ''}")
        return 0
    header = ("id", "queue", "actor", "reason", "attempts", "held at")
    rows = [
        (t.message_id, t.queue_name, t.actor_name or "?", _shorten(t.reason, 60), str(t.attempts), _millis(t.held_at))
        for t in tasks
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    total = store.count(args.queue)
    if total > args.offset + len(tasks):
        print(f"({len(tasks)} of {total} shown; next page: --offset {args.offset + len(tasks)})")
    return 0


def run_show(args: argparse.Namespace) -> int:
    task = _store(args).get(args.message_id, args.queue)
    if task is None:
        raise UsageError(f"no held task with id {args.message_id!r}")
    if args.json:
        print(json.dumps(asdict(task), indent=2))
        return 0
    print(describe(task))
    return 0


def describe(task: HeldTask) -> str:
    lines = [
        f"id:          {task.message_id}",
        f"queue:       {task.queue_name}",
        f"actor:       {task.actor_name or '? (undecodable)'}",
        f"reason:      {task.reason}",
        f"attempts:    {task.attempts} (kicked {task.kicks} times)",
        f"enqueued at: {_millis(task.enqueued_at)}",
        f"held at:     {_millis(task.held_at)} on {task.host} (pid {task.pid})",
    ]
    if task.raw is None:
        lines += [f"args:        {json.dumps(task.args)}", f"kwargs:      {json.dumps(task.kwargs)}"]
    if task.context:
        lines.append(f"context:     {json.dumps(task.context)}")
    if task.exception_type:
        lines.append(f"error:       {task.exception_type}: {task.exception_message}")
        lines.append(f"raised at:   {task.origin}")
    if task.raw is not None:
        lines += ["body:", task.raw]
    if task.traceback:
        lines += ["traceback:", task.traceback.rstrip()]
    return "\n".join(lines)


def run_kick(args: argparse.Namespace) -> int:
    ids = _ids(args)
    store = _store(args)
    _refuse_patterns(store, args.queue, ids)
    failures: list[tuple[str, str]] = []
    try:
        with _quiet("pika"):  # a lost connection is reported below, once, not as pika's traceback
            kicked = store.kick(args.queue, ids, delay_ms=duration_ms(args.delay, "--delay"))
    except KickError as error:
        kicked, failures = error.kicked, error.failures
    print(f"requeued {kicked} held task{'s' if kicked != 1 else ''} of {args.queue}")
    by_reason: dict[str, list[str]] = {}
    for message_id, why in failures:
        by_reason.setdefault(why, []).append(message_id)
    for why, failed in by_reason.items():
        named = ", ".join(failed[:3]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
        complain(f"{named} stay{'s' if len(failed) == 1 else ''} held: {why}")
    missing = len(ids) - kicked - len(failures) if ids is not None else 0
    if missing > 0:
        print(f"({missing} of the given ids were not held in {args.queue})", file=sys.stderr)
    return 1 if failures or missing > 0 else 0


def run_purge(args: argparse.Namespace) -> int:
    ids = _ids(args)
    store = _store(args)
    _refuse_patterns(store, args.queue, ids)
    if ids is None and not args.yes:
        count = store.count(args.queue)
        if not sys.stdin.isatty():
            raise UsageError(f"purging all {count} held tasks of {args.queue} needs --yes when not asked at a terminal")
        answer = input(f"Delete all {count} held tasks of {args.queue}? This cannot be undone. [y/N] ")
        if answer.strip().lower() not in {"y", "yes"}:
            print("nothing purged")
            return 1
    purged = store.purge(args.queue, ids)
    print(f"purged {purged} held task{'s' if purged != 1 else ''} of {args.queue}")
    return 0
