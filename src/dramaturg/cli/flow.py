"""``dramaturg locks list`` and ``dramaturg limits``: what flow control holds now
(see :mod:`dramaturg.flow`).

Exit codes: 0, 3 when the state store does not answer, 78 when there is none.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import BrokerUnreachable, ConfigError, StateUnavailable
from ..exit_codes import EXIT_OK
from ..flow import held_locks, limit_usage
from ..flow.control import declared_of
from ..masking import mask_text
from .common import boot

LOCKS_EPILOG = """\
examples:
  $ dramaturg locks list            # every lock held now: name, fencing token, holder, time left
  $ dramaturg locks list --json     # one JSON object per line
"""

LIMITS_EPILOG = """\
examples:
  $ dramaturg limits                # the limits the actors declare, and each key in use now
  $ dramaturg limits --json         # one JSON object per line
"""


def add_parser(subparsers: Any) -> None:
    locks = subparsers.add_parser(
        "locks",
        help="locks held now (dramaturg.lock)",
        description="Show the locks held now across every process: name, fencing token, holder, time left.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=LOCKS_EPILOG,
    )
    commands = locks.add_subparsers(dest="locks_command", metavar="SUBCOMMAND", required=True)
    listing = commands.add_parser("list", help="every lock held now")
    listing.add_argument("--json", action="store_true", help="one JSON object per line (default: text)")
    listing.set_defaults(run=run_locks)
    limits = subparsers.add_parser(
        "limits",
        help="concurrency and rate limits: declared, and in use now",
        description="Show the limits the actors of worker.modules declare, and for each key in use now"
        " how many slots are taken (concurrency) or starts are in the window (rate).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=LIMITS_EPILOG,
    )
    limits.add_argument("--json", action="store_true", help="one JSON object per line (default: text)")
    limits.set_defaults(run=run_limits)


def _read(args: argparse.Namespace, read: Any) -> tuple[Any, list[Any]]:
    import redis

    _, broker = boot(args)
    try:
        return broker, list(read(broker))
    except StateUnavailable as error:
        raise ConfigError(str(error)) from None
    except redis.RedisError as error:
        raise BrokerUnreachable(f"the state store did not answer: {type(error).__name__}: {error}") from None


def run_locks(args: argparse.Namespace) -> int:
    _, found = _read(args, held_locks)
    for held in found:
        if args.json:
            print(
                json.dumps(
                    {
                        "name": held.name,
                        "token": held.token,
                        "holder": held.holder,
                        "expires_in_ms": held.expires_in_ms,
                    }
                )
            )
        else:
            print(f"{mask_text(held.name)}  token {held.token}  {held.holder}  {held.expires_in_ms / 1000:.1f}s left")
    if not found and not args.json:
        print("no locks held")
    return EXIT_OK


def run_limits(args: argparse.Namespace) -> int:
    broker, found = _read(args, limit_usage)
    declared = []
    for name in sorted(broker.actors):
        flow = declared_of(broker, name)
        if flow is not None:
            declared += [(name, limit, template) for limit, template in flow.limits]
    for name, limit, _ in declared:
        if args.json:
            print(json.dumps({"actor": name, "limit": limit.describe}))
        else:
            print(f"{name}: {limit.describe}")
    for usage in found:
        # The limits whose key template could have made this key (by the actors of worker.modules).
        matching = [limit for _, limit, template in declared if template.matches(usage.key)]
        slots = sorted({str(limit.limit) for limit in matching if limit.kind == "c"})
        rates = sorted({str(limit.limit) for limit in matching if limit.kind == "r"})
        if args.json:
            print(
                json.dumps(
                    {
                        "key": usage.key,
                        "in_use": usage.in_use,
                        "concurrency": [int(n) for n in slots] or None,
                        "started": usage.started,
                        "rate": [int(n) for n in rates] or None,
                        "waiting": usage.waiting,
                    }
                )
            )
            continue
        parts = []
        if usage.in_use or slots:
            parts.append(f"{usage.in_use} in use" + (f" of {'/'.join(slots)}" if slots else ""))
        if usage.started or rates:
            parts.append(f"{usage.started} started in the window" + (f" of {'/'.join(rates)}" if rates else ""))
        parts.append(f"{usage.waiting} waiting")
        print(f"  {mask_text(usage.key)}: {', '.join(parts)}")
    if not found and not args.json:
        print("no limit key in use")
    return EXIT_OK
