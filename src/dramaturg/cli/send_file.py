"""``dramaturg send [QUEUE:]ACTOR --file rows.jsonl|rows.csv``: see :mod:`dramaturg.cli.send`."""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .. import app, brokers
from ..bulk import BulkSendError, Call
from ..config import load_settings, parse_duration_ms
from ..errors import SendError, did_you_mean
from ..task_context import context
from .common import delay_ms

#: A bad row's line on stderr, and how many of them are printed before they are only counted.
MAX_REPORTED = 100


class Rows:
    """The file's rows as ``Call``s, skipping (and reporting) the bad ones."""

    def __init__(self, path: Path, row_as: str, signature: inspect.Signature, actor_name: str) -> None:
        self.path = path
        self.row_as = row_as
        self.signature = signature
        self.actor_name = actor_name
        self.bad = 0
        self.on_line: Any = None  # called with each line's size in bytes (the progress bar)

    def __iter__(self) -> Iterator[Call]:
        with self.path.open(encoding="utf-8", newline="") as stream:
            rows = self._csv(stream) if self.path.suffix.lower() == ".csv" else self._jsonl(stream)
            for number, row in rows:
                call = self._call(number, row)
                if call is not None:
                    yield call

    def _jsonl(self, stream: IO[str]) -> Iterator[tuple[int, Any]]:
        for number, line in enumerate(stream, start=1):
            if self.on_line is not None:
                self.on_line(len(line.encode()))
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                self._report(number, f"not JSON: {error.msg} at column {error.colno}")

    def _csv(self, stream: IO[str]) -> Iterator[tuple[int, Any]]:
        reader = csv.DictReader(stream)
        for row in reader:
            number = reader.line_num
            if self.on_line is not None:
                self.on_line(sum(len(value or "") + 1 for value in row.values()))  # about its size
            if None in row or any(value is None for value in row.values()):
                self._report(number, f"{len(reader.fieldnames or [])} columns expected, the row has another number")
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
        raise SendError(f"--file: no such file: {path}")
    queue, _, actor_name = args.spec.rpartition(":")
    values = dict(_context_pair(pair) for pair in args.context)
    options: dict[str, Any] = {}
    if args.priority is not None:
        options["priority"] = args.priority
    if args.ttr is not None:
        try:
            options["ttr"] = parse_duration_ms(args.ttr)
        except ValueError as error:
            raise SendError(f"--ttr: {error}") from None
    delay = delay_ms(args.delay)
    if delay is not None:
        options["delay"] = delay
    if args.chunk_size < 1:
        raise SendError(f"--chunk-size must be at least 1, got {args.chunk_size}")

    settings = load_settings(args.config)
    app.bootstrap(settings)
    app.import_actor_modules_or_explain([*settings.worker.modules, "dramaturg.actors.builtin"])
    actors = app.registered_actors()
    actor = actors.get(actor_name)
    if actor is None:
        raise SendError(f"unknown actor {actor_name!r}{did_you_mean(actor_name, actors)}")
    if queue and queue != actor.queue_name:
        raise SendError(f"actor {actor_name!r} uses queue {actor.queue_name!r}, not {queue!r}")
    brokers.ping(settings.broker)

    rows = Rows(path, args.row_as, inspect.signature(actor.handler), actor.actor_name)
    bar = _progress_bar(path)
    if bar is not None:
        rows.on_line = bar.update
    try:
        with context(**values):
            result = actor.send_many(rows, chunk_size=args.chunk_size, **options)
    except BulkSendError as error:
        print(f"dramaturg: {error}", file=sys.stderr)
        return 1
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


def _context_pair(pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise SendError(f"--context: expected KEY=VALUE, got {pair!r}")
    return key, value


def _progress_bar(path: Path) -> Any:
    """A progress bar on stderr when it is a terminal, by bytes read (so its ETA needs no
    first pass over the file), or None."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm  # type: ignore[import-untyped]

    return tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"sending {path.name}", file=sys.stderr)
