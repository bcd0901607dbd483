"""``dramaturg send QUEUE:ACTOR:JSON_ARGS``: enqueue one message and print its id;
``dramaturg send ACTOR --file rows.jsonl|rows.csv``: one message per row, in bulk.

``JSON_ARGS`` is a JSON array of positional arguments or an object of keyword
arguments. Everything is checked before anything is sent: the actor must be declared
(the built-in ``echo``, or one in ``worker.modules``; a worker runs ``echo`` when
``worker.modules`` is empty or lists ``dramaturg.actors.builtin``), the queue must be one the
declared actors use, the JSON must parse, and the arguments must fit the handler's
signature. Any failure prints one line and exits 2 with nothing sent.

With ``--file``, the file is streamed (constant memory) and sent with
:func:`dramaturg.bulk.send_many`. Each JSON line (or CSV row, as an object keyed by the
header) is, by ``--as``: the one argument (``arg``, the default), a JSON array of
positional arguments (``args``) or an object of keyword arguments (``kwargs``). A row
that does not parse or does not fit the handler is reported on stderr with its line
number and why, and the others are sent; the exit code is then 2. A progress bar with
rate and ETA (tqdm) is shown when stderr is a terminal; a summary line always.
"""

from __future__ import annotations

import argparse
import inspect
import json
from typing import Any

from .. import app, brokers
from ..errors import SendError, UsageError, did_you_mean, quoted
from .common import CHUNK_MAX, PRIORITY_MAX, JsonError, boot, duration_ms, loads, whole


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "send",
        help="send one message",
        description="Send one message to an actor and print its message id.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  $ dramaturg send default:echo:'[\"hello\"]'\n"
        '  $ dramaturg send imports:import_user:\'{"row": {"id": 7}}\' --delay 30s\n',
    )
    parser.add_argument(
        "spec", metavar="QUEUE:ACTOR:JSON_ARGS", help="where, to whom and with what (with --file: [QUEUE:]ACTOR)"
    )
    parser.add_argument("--file", metavar="PATH", help="send one message per row of a .jsonl or .csv file")
    parser.add_argument(
        "--as",
        dest="row_as",
        choices=["arg", "args", "kwargs"],
        default="arg",
        help="with --file, each row is: the one argument, positional arguments, or keyword arguments (default: arg)",
    )
    parser.add_argument(
        "--priority",
        type=whole(-PRIORITY_MAX, PRIORITY_MAX),
        help="with --file: the messages' priority (default: the actor's)",
    )
    parser.add_argument("--ttr", help="with --file: the messages' time to run: 30s, 5m (default: the actor's)")
    parser.add_argument(
        "--context", action="append", default=[], metavar="KEY=VALUE", help="with --file: context for every message"
    )
    parser.add_argument(
        "--chunk-size", type=whole(1, CHUNK_MAX), default=1_000, help="with --file: messages per round trip"
    )
    parser.add_argument("--delay", help="run no earlier than this from now: 30s, 5m, 1500 (ms) (default: now)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (default: the id)")
    parser.set_defaults(run=run)


def parse_spec(spec: str) -> tuple[str, str, list[Any], dict[str, Any]]:
    """Split ``QUEUE:ACTOR:JSON_ARGS`` into queue, actor, args and kwargs."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise UsageError(f"expected QUEUE:ACTOR:JSON_ARGS, e.g. default:echo:'[\"hello\"]'; got {spec!r}")
    queue, actor_name, raw = parts
    try:
        payload = loads(raw)
    except JsonError as error:
        raise UsageError(f"JSON_ARGS is not valid JSON: {error}: {quoted(raw)}") from None
    if isinstance(payload, list):
        return queue, actor_name, payload, {}
    if isinstance(payload, dict):
        return queue, actor_name, [], payload
    raise UsageError(
        f"JSON_ARGS must be an array of positional arguments or an object of keyword arguments; got {raw!r}"
    )


def run(args: argparse.Namespace) -> int:
    if args.file:
        from .send_file import run_file

        return run_file(args)
    queue, actor_name, positional, keywords = parse_spec(args.spec)
    delay = duration_ms(args.delay, "--delay")

    settings, broker = boot(args, echo="also")

    actors = app.registered_actors()
    actor = actors.get(actor_name)
    if actor is None:
        hint = did_you_mean(actor_name, actors)
        raise SendError(
            f"unknown actor {actor_name!r}{hint} (declared: {', '.join(sorted(actors))};"
            " add the module that declares it to worker.modules)"
        )
    queues = {declared.queue_name for declared in actors.values()}
    if queue not in queues:
        hint = did_you_mean(queue, queues)
        raise SendError(f"unknown queue {queue!r}{hint} (queues of declared actors: {', '.join(sorted(queues))})")
    signature = inspect.signature(actor.handler)
    try:
        signature.bind(*positional, **keywords)
    except TypeError as error:
        shown = signature.replace(return_annotation=inspect.Signature.empty)
        raise SendError(f"arguments do not fit {actor.actor_name}{shown}: {error}") from None

    brokers.ping(settings.broker)
    message = actor.message_with_options(args=tuple(positional), kwargs=keywords)
    if queue != actor.queue_name:
        message = message.copy(queue_name=queue)
    broker.enqueue(message, delay=delay)
    if args.json:
        print(json.dumps({"message_id": message.message_id, "queue": queue, "actor": actor.actor_name}))
    else:
        print(message.message_id)
    app.shutdown()
    return 0
