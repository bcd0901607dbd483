"""``dramaturg schedule list|run|pause|resume``: the periodic tasks (see :mod:`dramaturg.schedules`).

``list`` shows each schedule's expression, next run, last run and its outcome (from its
task status), missed slots and whether it is paused; ``run ID`` fires one now, once (in
eager mode it runs inline); ``pause ID`` / ``resume ID`` stop and restart its firing on
every scheduler. Exit codes: 0; 2 for an unknown schedule id; 3 when the state store
does not answer; 78 for a bad schedule or no state store.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from .. import app
from ..errors import BrokerUnreachable, ConfigError, ScheduleNotFound, StateUnavailable, UsageError
from ..exit_codes import EXIT_OK
from ..schedules import ScheduleInfo, find, load_schedules, pause, resume, run_now, schedule_infos
from .common import boot

EPILOG = """\
examples:
  $ dramaturg schedule list                  # id, expression, next run, last run and its outcome
  $ dramaturg schedule list --json           # one JSON object per schedule
  $ dramaturg schedule run nightly-cleanup   # fire it now, once (prints the message id)
  $ dramaturg schedule pause nightly-cleanup # every scheduler leaves its slots out ...
  $ dramaturg schedule resume nightly-cleanup  # ... until this (the paused slots never fire)
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "schedule",
        help="periodic tasks: list, run, pause, resume",
        description="Show and steer the schedules declared with @dramaturg.periodic and [[schedules]].",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(dest="schedule_command", metavar="SUBCOMMAND", required=True)
    listing = commands.add_parser("list", help="every schedule: next run, last run and its outcome")
    listing.add_argument("--json", action="store_true", help="one JSON object per line (default: a table)")
    listing.set_defaults(run=run_list)
    for name, what, handler in (
        ("run", "fire a schedule now, once", run_run),
        ("pause", "stop firing a schedule (every scheduler)", run_pause),
        ("resume", "fire a paused schedule again from its next slot", run_resume),
    ):
        command = commands.add_parser(name, help=what)
        command.add_argument("schedule_id", metavar="ID", help="the schedule's id (see schedule list)")
        command.set_defaults(run=handler)


def _guarded(args: argparse.Namespace, action: Any) -> Any:
    import redis

    settings, broker = boot(args)
    try:
        schedules = load_schedules(settings, broker)
        return action(schedules, broker)
    except ScheduleNotFound as error:
        raise UsageError(str(error)) from None
    except StateUnavailable as error:
        raise ConfigError(str(error), key="state.url") from None
    except redis.RedisError as error:
        raise BrokerUnreachable(f"the state store did not answer: {type(error).__name__}: {error}") from None
    finally:
        app.shutdown()


def run_list(args: argparse.Namespace) -> int:
    infos: list[ScheduleInfo] = _guarded(args, schedule_infos)
    if args.json:
        for info in infos:
            print(json.dumps(info.to_dict()))
        return EXIT_OK
    if not infos:
        print("no schedules")
        return EXIT_OK
    rows = [("ID", "EXPRESSION", "OVERLAP", "NEXT RUN", "LAST RUN", "OUTCOME", "MISSED", "PAUSED")]
    for info in infos:
        rows.append(
            (
                info.id,
                info.expression,
                info.overlap,
                _at(info.next_run),
                _at(info.last_at),
                info.last_outcome or "-",
                str(info.missed),
                "yes" if info.paused else "no",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def run_run(args: argparse.Namespace) -> int:
    message_id = _guarded(args, lambda schedules, broker: run_now(find(schedules, args.schedule_id), broker))
    print(message_id)
    return EXIT_OK


def run_pause(args: argparse.Namespace) -> int:
    _guarded(args, lambda schedules, broker: pause(find(schedules, args.schedule_id), broker))
    print(f"{args.schedule_id}: paused")
    return EXIT_OK


def run_resume(args: argparse.Namespace) -> int:
    _guarded(args, lambda schedules, broker: resume(find(schedules, args.schedule_id), broker))
    print(f"{args.schedule_id}: resumed")
    return EXIT_OK


def _at(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="seconds")
