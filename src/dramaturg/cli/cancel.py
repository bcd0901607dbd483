"""``dramaturg cancel ID...``: cancel tasks by message id (see :mod:`dramaturg.cancelling`).

One line per id: what was done (requested: skipped when taken, or interrupted; purged:
it was held) or how it had already ended. Exit codes: 0 when every task is cancelled or
will be (one cancelled before counts); 1 when an id is unknown (never sent, or its
record expired; the others are still cancelled); 4 (``EXIT_ALREADY_ENDED``) when,
no id being unknown, a task had already ended otherwise (succeeded, failed): nothing
was changed for it; 3 when the state store does not answer, 78 when there is none.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..cancelling import request_cancel, settle
from ..errors import BrokerUnreachable, ConfigError, StateUnavailable, TaskNotFound
from ..exit_codes import EXIT_ALREADY_ENDED, EXIT_FAILURE, EXIT_OK
from ..masking import mask_text
from .common import boot, complain

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  $ dramaturg cancel 1f0c2d7e-...                  # skipped if waiting, interrupted if running, purged if held
  $ dramaturg cancel 1f0c2d7e-... 9a3b... --by ops # several at once; who asks shows in their status
  $ dramaturg cancel 1f0c2d7e-... --json           # one JSON object per id
  $ dramaturg batch cancel 6a1f...                 # every member of a batch that has not ended

exit codes: 0 cancelled (or will be), 1 an unknown id, 4 a task had already ended (succeeded
or failed), 3 the state store did not answer, 78 no state store ([state] url)
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "cancel",
        help="cancel tasks by message id: skipped if waiting, interrupted if running, purged if held",
        description="Cancel tasks: a waiting task is skipped when a worker takes it, a running one is"
        " interrupted within a second, a held one is purged. Each ends as cancelled, never retried.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("message_ids", metavar="ID", nargs="+", help="the message id send() returned")
    parser.add_argument("--by", help="who asks, shown in the task's status (default: user@host)")
    parser.add_argument("--json", action="store_true", help="one JSON object per id (default: text)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import redis

    _, broker = boot(args)
    code = EXIT_OK
    requested = False
    for message_id in args.message_ids:
        try:
            answer = request_cancel(message_id, by=args.by, broker=broker)
        except TaskNotFound as error:
            complain(str(error))
            code = EXIT_FAILURE
            continue
        except StateUnavailable as error:
            raise ConfigError(str(error)) from None
        except redis.RedisError as error:
            raise BrokerUnreachable(f"the state store did not answer: {type(error).__name__}: {error}") from None
        if args.json:
            print(json.dumps(answer.to_dict()))
        else:
            verb = {"requested": "cancel requested", "purged": "cancelled"}.get(answer.outcome, "not cancelled")
            if answer.outcome == "ended" and answer.state == "cancelled":
                verb = "already cancelled"
            print(f"{message_id}: {verb}: {mask_text(answer.detail)}")
        if answer.outcome == "ended" and answer.state != "cancelled" and code == EXIT_OK:
            code = EXIT_ALREADY_ENDED
        requested = requested or answer.outcome == "requested"
    if requested:
        settle()  # once for all: then no worker starts them
    return code
