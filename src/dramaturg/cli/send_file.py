"""``dramaturg send [QUEUE:]ACTOR --file rows.jsonl|rows.csv``: see :mod:`dramaturg.cli.send`."""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import re
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .. import app, brokers
from ..bulk import Call
from ..errors import BulkSendError, BulkSendInterrupted, SendError, UsageError, did_you_mean
from ..exit_codes import EXIT_INTERRUPTED
from ..task_context import context
from .common import JsonError, boot, complain, duration_ms, loads

#: A bad row's line on stderr, and how many of them are printed before they are only counted.
MAX_REPORTED = 100
#: Rows nested deeper than this are bad rows: far beyond any real data, and deep enough
#: that encoding them could exhaust Python's recursion limit while the chunk is sent.
MAX_DEPTH = 200
#: What ``errors="surrogateescape"`` makes of a byte that is not UTF-8.
_SURROGATE = re.compile("[\udc80-\udcff]")


class Rows:
    """The file's rows as ``Call``s, skipping (and reporting) the bad ones.

    Every problem of one row makes it a bad row, named by its line and skipped: bytes
    that are not UTF-8, JSON that does not parse (also an integer of more than
    ``sys.get_int_max_str_digits()`` digits, or nesting deeper than :data:`MAX_DEPTH`),
    a CSV field over the ``csv`` module's limit, arguments that do not fit the handler.
    The line numbers of the last ``chunk_size`` rows sent are kept, to say which rows a
    failed send concerned.
    """

    def __init__(
        self, path: Path, row_as: str, signature: inspect.Signature, actor_name: str, chunk_size: int = 1_000
    ) -> None:
        self.path = path
        self.row_as = row_as
        self.signature = signature
        self.actor_name = actor_name
        self.bad = 0
        self.on_line: Any = None  # called with each line's size in bytes (the progress bar)
        self.yielded = 0
        self.lines: deque[int] = deque(maxlen=chunk_size)  # the line of each of the last rows yielded
        self.last_line = 0  # the last line read

    def __iter__(self) -> Iterator[Call]:
        if self.path.suffix.lower() == ".csv":
            # surrogateescape: a byte that is not UTF-8 makes that row bad, not the whole file
            with self.path.open(encoding="utf-8", errors="surrogateescape", newline="") as stream:
                yield from self._calls(self._csv(stream))
        else:
            with self.path.open("rb") as binary:
                yield from self._calls(self._jsonl(binary))

    def _calls(self, rows: Iterator[tuple[int, Any]]) -> Iterator[Call]:
        for number, row in rows:
            call = self._call(number, row)
            if call is not None:
                self.yielded += 1
                self.lines.append(number)
                yield call

    def _jsonl(self, stream: IO[bytes]) -> Iterator[tuple[int, Any]]:
        for number, raw in enumerate(stream, start=1):
            self.last_line = number
            if self.on_line is not None:
                self.on_line(len(raw))
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                self._report(number, f"not UTF-8: byte 0x{raw[error.start]:02x} at column {error.start + 1}")
                continue
            if not line.strip():
                continue
            try:
                row = loads(line)
            except JsonError as error:
                self._report(number, f"not JSON: {error}")
                continue
            if line.count("[") + line.count("{") > MAX_DEPTH and _too_deep(row):
                self._report(number, f"not JSON this command sends: nested deeper than {MAX_DEPTH} levels")
                continue
            yield number, row

    def _csv(self, stream: IO[str]) -> Iterator[tuple[int, Any]]:
        reader = csv.DictReader(stream)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:  # a field over the size limit, a NUL byte: that row only
                number = reader.reader.line_num
                self.last_line = number
                self._report(number, f"not CSV this command reads: {error}")
                continue
            number = reader.line_num
            self.last_line = number
            if self.on_line is not None:
                self.on_line(sum(len(value or "") + 1 for value in row.values()))  # about its size
            if None in row or any(value is None for value in row.values()):
                self._report(number, f"{len(reader.fieldnames or [])} columns expected, the row has another number")
                continue
            bad = next((value for value in row.values() if _SURROGATE.search(value)), None)
            if bad is not None:
                byte = ord(_SURROGATE.search(bad)[0]) - 0xDC00  # type: ignore[index]
                self._report(number, f"not UTF-8: byte 0x{byte:02x}")
                continue
            yield number, dict(row)

    def _call(self, number: int, row: Any) -> Call | None:
        if self.row_as == "args":
            if not isinstance(row, list):
                self._report(number, f"expected a JSON array of positional arguments, got {type(row).__name__}")
                return None
            args, kwargs = tuple(row), {}
        elif self.row_as == "kwargs":
            if not isinstance(row, dict):
                self._report(number, f"expected an object of keyword arguments, got {type(row).__name__}")
                return None
            args, kwargs = (), row
        else:
            args, kwargs = (row,), {}
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as error:
            self._report(number, f"arguments do not fit {self.actor_name}: {error}")
            return None
        return Call(*args, **kwargs)

    def _report(self, number: int, reason: str) -> None:
        self.bad += 1
        if self.bad <= MAX_REPORTED:
            print(f"{self.path}:{number}: {reason}; skipped", file=sys.stderr)
        elif self.bad == MAX_REPORTED + 1:
            print(f"{self.path}: more bad rows; only counted from here", file=sys.stderr)


def run_file(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"--file: no such file: {path}")
    queue, _, actor_name = args.spec.rpartition(":")
    values = dict(_context_pair(pair) for pair in args.context)
    options: dict[str, Any] = {}
    if args.priority is not None:
        options["priority"] = args.priority
    if args.ttr is not None:
        options["ttr"] = duration_ms(args.ttr, "--ttr")
    delay = duration_ms(args.delay, "--delay")
    if delay is not None:
        options["delay"] = delay
    if args.chunk_size < 1:
        raise UsageError(f"--chunk-size must be at least 1, got {args.chunk_size}")

    settings, _ = boot(args, echo="also")
    actors = app.registered_actors()
    actor = actors.get(actor_name)
    if actor is None:
        raise SendError(f"unknown actor {actor_name!r}{did_you_mean(actor_name, actors)}")
    if queue and queue != actor.queue_name:
        raise SendError(f"actor {actor_name!r} uses queue {actor.queue_name!r}, not {queue!r}")
    brokers.ping(settings.broker)

    rows = Rows(path, args.row_as, inspect.signature(actor.handler), actor.actor_name, args.chunk_size)
    bar = _progress_bar(path)
    if bar is not None:
        rows.on_line = bar.update
    try:
        with context(**values):
            result = actor.send_many(rows, chunk_size=args.chunk_size, **options)
    except BulkSendError as error:
        if bar is not None:
            bar.close()
            bar = None
        _report_failure(error, rows, args, actor.actor_name)
        return 1
    except BulkSendInterrupted as interrupted:  # Ctrl-C: say what was sent, in one line
        if bar is not None:
            bar.close()
            bar = None
        _report_failure(interrupted.progress, rows, args, actor.actor_name, interrupted=True)
        return EXIT_INTERRUPTED
    finally:
        if bar is not None:
            bar.close()
        app.shutdown()
    summary = {
        "actor": actor.actor_name,
        "sent": result.sent,
        "bad_rows": rows.bad,
        "seconds": round(result.seconds, 3),
        "rate": round(result.rate),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        bad = f"; {rows.bad:,} bad rows skipped (listed above)" if rows.bad else ""
        print(f"sent {result.sent:,} tasks to {actor.actor_name} in {result.seconds:.1f} s ({result.rate:,.0f}/s){bad}")
    return 2 if rows.bad else 0


def _report_failure(
    error: BulkSendError, rows: Rows, args: argparse.Namespace, actor_name: str, *, interrupted: bool = False
) -> None:
    """Say what a send that stopped did: how many tasks were sent, which rows of the
    failing chunk are unknown (written, but no answer came: maybe on the queue) or not
    sent, and from where nothing was sent. Never "not sent" for what may be on the queue.
    ``interrupted`` (Ctrl-C): all of it in one line."""
    chunk = error.unsent or error.unknown
    # Every chunk but the last is chunk_size long, so the failing one starts here.
    start = (error.next_item - 1) // args.chunk_size * args.chunk_size if chunk else error.next_item
    first_kept = rows.yielded - len(rows.lines)

    def line_of(index: int) -> int | None:
        return rows.lines[index - first_kept] if first_kept <= index < rows.yielded else None

    lines = (line_of(start), line_of(error.next_item - 1)) if chunk else None
    after = line_of(error.next_item - 1) if error.next_item else 0
    if args.json:
        print(
            json.dumps(
                {
                    "actor": actor_name,
                    "error": error.reason,
                    "sent": error.sent,
                    "unknown": len(error.unknown),
                    "not_sent": len(error.unsent),
                    "failed_lines": list(lines) if lines else None,
                    "nothing_sent_after_line": after,
                    "bad_rows": rows.bad,
                    "unknown_ids": [message.message_id for message in error.unknown],
                    "not_sent_ids": [message.message_id for message in error.unsent],
                }
            )
        )
    if not interrupted:
        complain(f"sending stopped: {error.reason}")
    unknown = "being sent at the Ctrl-C" if interrupted else "written, but no answer came"
    parts = [f"sent {error.sent:,} tasks to {actor_name}"]
    if lines:
        parts.append(
            f"of the chunk of rows on lines {lines[0]:,}-{lines[1]:,} of {rows.path}, {error.sent - start:,} were sent,"
            f" {len(error.unknown):,} are unknown ({unknown}: they may be on the queue; look for"
            f" them before sending them again) and {len(error.unsent):,} were not sent"
        )
        for what, messages in (("unknown", error.unknown), ("not sent", error.unsent)):
            if messages and not args.json:
                more = f" and {len(messages) - 3:,} more (--json lists them all)" if len(messages) > 3 else ""
                parts.append(f"{what}: {', '.join(m.message_id for m in messages[:3])}{more}")
    parts.append(f"nothing after line {after:,} was sent" if after else "nothing was sent")
    if rows.bad:
        parts.append(f"{rows.bad:,} bad rows skipped (listed above)")
    print(("dramaturg: interrupted (Ctrl-C): " if interrupted else "") + "; ".join(parts), file=sys.stderr)


def _too_deep(value: Any) -> bool:
    """Whether ``value`` (parsed JSON) nests lists and objects deeper than :data:`MAX_DEPTH`."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > MAX_DEPTH:
                    return True
                stack.append((child, depth + 1))
    return False


def _context_pair(pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise UsageError(f"--context: expected KEY=VALUE, got {pair!r}")
    return key, value


def _progress_bar(path: Path) -> Any:
    """A progress bar on stderr when it is a terminal, by bytes read (so its ETA needs no
    first pass over the file), or None."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm  # type: ignore[import-untyped]

    return tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"sending {path.name}", file=sys.stderr)
