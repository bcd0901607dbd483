"""The ``dramaturg`` command: ``worker``, ``workers``, ``drain``, ``send``, ``held``, ``queue``, ``stats``, ``status``,
``cancel``, ``batch``, ``scheduler``, ``schedule``, ``locks``, ``limits``, ``config``, ``dashboard``.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and
``run(args) -> int``; what they share (loading the application: ``common.boot``) is in
:mod:`dramaturg.cli.common`. Errors are one line on stderr and a named exit code
(:mod:`dramaturg.exit_codes`; a command line mistake is a
:class:`~dramaturg.errors.UsageError`, 2), never a traceback; secrets in URLs are masked
in everything printed. ``--log-format json`` makes every log line, and that error line,
one JSON object (see :mod:`dramaturg.logs`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .. import logs
from ..__about__ import __version__
from ..config import load_settings
from ..errors import BrokerNotInstalled, BrokerUnreachable, ConfigError, DramaturgError, UsageError
from ..exit_codes import (
    EXIT_BROKER_UNREACHABLE,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
)
from ..masking import install_log_masking
from . import (
    batch,
    cancel,
    config_cmd,
    dashboard,
    drain,
    flow,
    held,
    queue,
    schedule,
    scheduler,
    send,
    stats,
    status,
    worker,
    workers,
)
from .common import complain

__all__ = [
    "EXIT_BROKER_UNREACHABLE",
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
    "run",
]

EPILOG = """\
examples:
  # Run workers with the processes, threads and modules from dramaturg.toml
  $ dramaturg worker

  # Send one message to the built-in echo actor and print its id
  $ dramaturg send default:echo:'["hello"]'

  # From cron: process the imports queue for 50 seconds, then exit
  $ dramaturg drain imports --budget 50s

  # List held tasks, look at one, requeue a queue's held tasks
  $ dramaturg held list
  $ dramaturg held show 1f0c2d7e-...
  $ dramaturg held kick imports --all

  # How many tasks are ready, delayed, in flight, held, dead; how many workers, per queue
  $ dramaturg stats
  $ dramaturg stats imports --watch 2s

  # Queues: their counts, the next waiting tasks, drop the waiting ones, remove one
  $ dramaturg queue list
  $ dramaturg queue peek imports --limit 5
  $ dramaturg queue purge imports --yes
  $ dramaturg queue delete old-imports

  # What became of a task: queued, running, succeeded, retrying, held, ...
  $ dramaturg status 1f0c2d7e-...

  # Cancel a task (skipped if waiting, interrupted if running, purged if held), or a batch
  $ dramaturg cancel 1f0c2d7e-...
  $ dramaturg batch cancel 6a1f...

  # Where a batch stands; a progress bar until it ends
  $ dramaturg batch show 6a1f...
  $ dramaturg batch watch 6a1f...

  # The worker processes alive now: host, pid, queues, tasks running
  $ dramaturg workers

  # Fire the periodic tasks (on every host if you like: each slot fires once)
  $ dramaturg scheduler
  $ dramaturg schedule list

  # A web page of queues and held tasks (kick, purge) on http://127.0.0.1:8700
  $ dramaturg dashboard

  # Locks held now; limits declared and the keys in use
  $ dramaturg locks list
  $ dramaturg limits

  # Show the effective settings and where each came from; then test the broker
  $ dramaturg config show
  $ dramaturg config check

  # Use another config file (or set DRAMATURG_CONFIG)
  $ dramaturg --config deploy/dramaturg.toml worker --processes 4

  # Log one JSON object per line; serve Prometheus metrics on 127.0.0.1:9191
  $ dramaturg --log-format json worker --metrics-port 9191
"""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dramaturg",
        description="Reliable background work on Dramatiq.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"dramaturg {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="the config file to read (default: $DRAMATURG_CONFIG, else the nearest dramaturg.toml"
        " or pyproject.toml [tool.dramaturg])",
    )
    parser.add_argument(
        "--log-format",
        choices=logs.LOG_FORMATS,
        help="text lines, or one JSON object per line, for this command and its worker processes"
        " (default: log.format, else text)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (
        worker,
        scheduler,
        drain,
        send,
        held,
        queue,
        stats,
        status,
        cancel,
        batch,
        schedule,
        flow,
        config_cmd,
        dashboard,
        workers,
    ):
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    install_log_masking()
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command != "worker":  # Dramatiq's CLI sets up logging for its processes
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logs.apply(args.log_format or _configured_log_format(args.config) or "text")
    try:
        code: int = args.run(args)
        sys.stdout.flush()  # here, not at exit: a reader gone away is answered below
        return code
    except ConfigError as error:
        return fail(f"configuration error: {error}", EXIT_CONFIG)
    except BrokerUnreachable as error:
        return fail(str(error), EXIT_BROKER_UNREACHABLE)
    except BrokerNotInstalled as error:
        return fail(str(error), EXIT_CONFIG)
    except UsageError as error:
        return fail(str(error), EXIT_USAGE)
    except DramaturgError as error:  # SendError (unknown actor or queue, arguments that do not fit) and the rest
        return fail(str(error), EXIT_USAGE)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read the output stopped (``| head``): nothing more to say, and no
        # traceback; stdout goes nowhere, so that its flush at exit does not raise again.
        _quiet_stdout()
        return EXIT_FAILURE


def _quiet_stdout() -> None:
    """Point stdout's descriptor at /dev/null (not where it has none: a test's capture)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # io.UnsupportedOperation: no descriptor
        pass
    finally:
        os.close(devnull)


def fail(message: str, code: int) -> int:
    """Print ``dramaturg: <message>`` (masked) to stderr and return ``code``.

    In json mode the line is a JSON object with ``exit_code``."""
    complain(message, exit_code=code)
    return code


def _configured_log_format(config: str | None) -> str | None:
    """``log.format`` from the environment or the config file; None when they cannot be
    read (the command itself then reports why, in the default format)."""
    if os.environ.get(logs.LOG_FORMAT_ENV) in logs.LOG_FORMATS:
        return os.environ[logs.LOG_FORMAT_ENV]
    try:
        return load_settings(config).log.format
    except DramaturgError:
        return None


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
