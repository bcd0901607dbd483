"""``dramaturg scheduler``: fire the schedules until SIGTERM or SIGINT, then exit 0.

Run it on as many hosts as you like: each slot fires once (see
:mod:`dramaturg.schedules`). It checks every schedule before it starts (exit 78 naming
the schedule, where it was declared and the problem), then registers them (a schedule
no longer declared stops firing everywhere) and sleeps until each next slot.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from .. import app
from ..errors import BrokerUnreachable, ConfigError, StateUnavailable
from ..exit_codes import EXIT_OK
from ..schedules import Scheduler, load_schedules, state_of
from .common import boot

logger = logging.getLogger("dramaturg.schedules")

EPILOG = """\
examples:
  $ dramaturg scheduler                     # the schedules of worker.modules and [[schedules]]
  $ dramaturg scheduler -v                  # log each firing
  $ dramaturg worker --scheduler            # one scheduler beside the worker processes
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "scheduler",
        help="fire the periodic tasks (safe to run on every host)",
        description="Fire the schedules declared with @dramaturg.periodic and [[schedules]], each slot once"
        " however many schedulers run, until SIGTERM or SIGINT.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log each firing (default: warnings only)")
    parser.set_defaults(run=run)


def build(args: argparse.Namespace) -> Scheduler:
    """The scheduler of the configuration ``args.config`` names, its schedules checked
    and its ledger reachable (ConfigError, BrokerUnreachable otherwise)."""
    settings, broker = boot(args, ping_first=True)
    try:
        schedules = load_schedules(settings, broker)
        try:
            state = state_of(broker)
        except StateUnavailable as error:
            raise ConfigError(str(error), key="state.url") from None
        return Scheduler(broker, schedules, state)
    except BaseException:
        app.shutdown()
        raise


def run(args: argparse.Namespace) -> int:
    if args.verbose:
        logging.getLogger("dramaturg").setLevel(logging.INFO)
    scheduler = build(args)
    stop = threading.Event()

    def stopping(signum: int, frame: Any) -> None:
        logger.info("scheduler: %s received; stopping", signal.Signals(signum).name)
        stop.set()
        scheduler.stop()

    previous = {sig: signal.signal(sig, stopping) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        import redis  # every ledger outside eager and stub is in a Redis

        try:
            scheduler.register()
        except redis.RedisError as error:
            raise BrokerUnreachable(f"the state store did not answer: {type(error).__name__}: {error}") from None
        names = ", ".join(scheduler.schedules) or "none"
        print(f"scheduler: firing {len(scheduler.schedules)} schedule(s): {names}", flush=True)
        scheduler.run(register=False)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        app.shutdown()
    return EXIT_OK
