"""``dramaturg batch list|show|watch``: batches of tasks (see :mod:`dramaturg.batches`).

Exit codes: 0 when the batch is known (``watch``: once it is complete; ``cancel``: its
members that had not ended are cancelled), 1 for an unknown (or expired) batch id, 4
when ``cancel`` finds the batch complete already (nothing changed), 3 when the state
store does not answer, 78 when there is no state store.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from typing import Any

from ..batches import BatchStatus, batch_status, batches
from ..cancelling import cancel_batch
from ..errors import BatchNotFound, BrokerUnreachable, ConfigError, StateUnavailable
from ..exit_codes import EXIT_ALREADY_ENDED, EXIT_FAILURE, EXIT_OK
from ..masking import mask_text
from .common import LIMIT_MAX, boot, complain, duration_ms, whole

EPILOG = """\
examples:
  $ dramaturg batch list                       # the newest batches, one line each
  $ dramaturg batch show 6a1f...               # counts, rate, ETA, the running members' progress
  $ dramaturg batch show 6a1f... --json        # the same as one JSON object
  $ dramaturg batch watch 6a1f...              # a progress bar until every member has ended
  $ dramaturg batch cancel 6a1f...             # cancel every member that has not ended
"""

#: Characters of the progress bar ``watch`` draws.
BAR_WIDTH = 30


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="batches of tasks: list, show, watch, cancel",
        description="Show batches of tasks: how many members succeeded, failed, are held, running or"
        " pending, the rate and the time left.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(dest="batch_command", metavar="SUBCOMMAND", required=True)
    listing = commands.add_parser("list", help="the newest batches whose state is kept")
    listing.add_argument("--limit", type=whole(1, LIMIT_MAX), default=50, help="how many, newest first (default: 50)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line (default: text)")
    listing.set_defaults(run=run_list)
    show = commands.add_parser("show", help="where one batch stands")
    show.add_argument("batch_id", metavar="ID", help="the batch's id (batch.id)")
    show.add_argument("--json", action="store_true", help="print one JSON object (default: text)")
    show.set_defaults(run=run_show)
    watch = commands.add_parser("watch", help="a progress bar, redrawn until the batch is complete")
    watch.add_argument("batch_id", metavar="ID", help="the batch's id (batch.id)")
    watch.add_argument("--every", default="1s", help="how often to redraw (default: 1s)")
    watch.set_defaults(run=run_watch)
    cancelling = commands.add_parser(
        "cancel", help="cancel the members that have not ended: skipped if waiting, interrupted if running"
    )
    cancelling.add_argument("batch_id", metavar="ID", help="the batch's id (batch.id)")
    cancelling.add_argument("--by", help="who asks, shown in the batch's status (default: user@host)")
    cancelling.add_argument("--json", action="store_true", help="print one JSON object (default: text)")
    cancelling.set_defaults(run=run_cancel)


def _read(args: argparse.Namespace) -> BatchStatus:
    import redis

    _, broker = boot(args)
    try:
        return batch_status(args.batch_id, broker)
    except StateUnavailable as error:
        raise ConfigError(str(error)) from None
    except redis.RedisError as error:
        raise BrokerUnreachable(f"the state store did not answer: {type(error).__name__}: {error}") from None


def run_list(args: argparse.Namespace) -> int:
    import redis

    _, broker = boot(args)
    try:
        found = list(batches(args.limit, broker))
    except StateUnavailable as error:
        raise ConfigError(str(error)) from None
    except redis.RedisError as error:
        raise BrokerUnreachable(f"the state store did not answer: {type(error).__name__}: {error}") from None
    for status in found:
        print(json.dumps(status.to_dict()) if args.json else one_line(status))
    if not found and not args.json:
        print("no batches")
    return EXIT_OK


def run_show(args: argparse.Namespace) -> int:
    try:
        status = _read(args)
    except BatchNotFound as error:
        return _unknown(error)
    print(json.dumps(status.to_dict()) if args.json else describe(status))
    return EXIT_OK


def run_watch(args: argparse.Namespace) -> int:
    every_s = (duration_ms(args.every, "--every") or 1000) / 1000
    import redis

    _, broker = boot(args)
    tty = sys.stdout.isatty()
    while True:
        try:
            status = batch_status(args.batch_id, broker)
        except BatchNotFound as error:
            return _unknown(error)
        except StateUnavailable as error:
            raise ConfigError(str(error)) from None
        except redis.RedisError as error:
            raise BrokerUnreachable(f"the state store did not answer: {type(error).__name__}: {error}") from None
        line = bar(status)
        if tty:  # redrawn in place
            print("\r" + line.ljust(100), end="", flush=True)
        else:  # a log: one line per redraw
            print(line, flush=True)
        if status.state == "complete":
            print(("\n" if tty else "") + f"complete: {summary_words(status)}")
            return EXIT_OK
        time.sleep(every_s)


def run_cancel(args: argparse.Namespace) -> int:
    import redis

    _, broker = boot(args)
    try:
        answer = cancel_batch(args.batch_id, by=args.by, broker=broker)
    except BatchNotFound as error:
        return _unknown(error)
    except StateUnavailable as error:
        raise ConfigError(str(error)) from None
    except redis.RedisError as error:
        raise BrokerUnreachable(f"the state store did not answer: {type(error).__name__}: {error}") from None
    print(json.dumps(answer.to_dict()) if args.json else f"{args.batch_id}: {answer.detail}")
    return EXIT_ALREADY_ENDED if answer.state == "complete" else EXIT_OK


def _unknown(error: BatchNotFound) -> int:
    complain(str(error), exit_code=EXIT_FAILURE)
    return EXIT_FAILURE


def bar(status: BatchStatus) -> str:
    """``[#########.....]  42.0%  4,200/10,000  350.0/s  ETA 17s``, and "complete" once it is."""
    filled = round(BAR_WIDTH * status.percent / 100)
    rate = f"{status.rate:,.1f}/s" if status.rate is not None else "-/s"
    eta = "complete" if status.state == "complete" else f"ETA {_duration(status.eta_s)}"
    return (
        f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {status.percent:5.1f}%  {status.ended}/{status.total}"
        f"  {rate}  {eta}"
    )


def summary_words(status: BatchStatus) -> str:
    cancelled = f", {status.cancelled} cancelled" if status.cancelled else ""
    return f"{status.succeeded} succeeded, {status.failed} failed ({status.held} held){cancelled} of {status.total}" + (
        f" in {_duration(((status.finished_at or 0) - status.started_at) / 1000)}" if status.finished_at else ""
    )


def one_line(status: BatchStatus) -> str:
    return (
        f"{status.batch_id}  {status.state:<8}  {status.ended:>7}/{status.total:<7}  {status.percent:5.1f}%"
        f"  {_at(status.started_at)}  {mask_text(status.name)}"
    )


def describe(status: BatchStatus) -> str:
    """A headline, then one line per count and time, then the running members' progress."""
    lines = [f"{status.batch_id}: {mask_text(status.name)}: {status.state}, {summary_words(status)}"]
    rows: list[tuple[str, Any]] = [
        ("total", status.total),
        ("succeeded", status.succeeded),
        ("failed", f"{status.failed} ({status.held} held)"),
        ("cancelled", status.cancelled or None),
        ("running", status.running),
        ("pending", status.pending),
        ("percent", f"{status.percent:.1f}%"),
        ("rate", f"{status.rate:,.1f} members/s" if status.rate is not None else None),
        ("eta", _duration(status.eta_s) if status.state != "complete" and status.eta_s is not None else None),
        ("started at", _at(status.started_at)),
        ("finished at", _at(status.finished_at)),
        ("all succeeded", "yes" if status.succeeded_all else None),
        ("parent", status.parent),
        ("cancel", _asked(status.cancel_requested_by, status.cancel_requested_at)),
    ]
    lines += [f"  {name + ':':<14}{value}" for name, value in rows if value is not None]
    for member in status.progress:
        lines.append(f"  {member.message_id}: {member.fraction * 100:.0f}% {mask_text(member.text)}")
    return "\n".join(lines)


def _asked(by: str | None, at: int | None) -> str | None:
    return None if by is None else f"asked by {mask_text(by)} at {_at(at)}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole // 60 % 60:02d}m"


def _at(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="seconds")
