"""Log formats: readable text lines, or one JSON object per line for log collectors.

``dramaturg --log-format json COMMAND`` (or ``[log] format = "json"``, or
``DRAMATURG_LOG_FORMAT=json``) switches every log line of the command to JSON: the
``dramaturg`` CLI's own, and under ``dramaturg worker`` those of Dramatiq's main
process, its worker processes and the metrics server too. ``dramatiq dramaturg.worker``
reads the same setting in its worker processes (Dramatiq's main process there is not
dramaturg's, so its few lines, "booting up" and "sending signal", stay text).

Each line is one object; these fields are always there::

    {"ts": "2026-05-01T12:00:00.123Z", "level": "WARNING", "logger": "dramaturg.outcomes",
     "message": "...", "process": 4711, "thread": "Thread-3"}

Lines logged while a task runs (by dramaturg, Dramatiq or the handler itself) add
``actor``, ``message_id``, ``queue`` and ``attempt``; the one line each failed task gets
adds ``max_attempts``, ``exception_type``, ``exception_message``, ``origin``
(``path/to/file.py:42``, where it was raised), ``traceback`` and ``next`` (what happens
to the task: ``"retrying in 2500 ms (at 2026-05-01T12:00:02.623Z)"`` with ``retry_at``,
``"held: retries exhausted"``, ``"interrupted as its worker stopped; requeued untouched,
it will run again"``, ...). Any ``extra={...}`` an application passes to its logger
becomes fields as well; a line logged with an exception has ``traceback``.

Passwords in URLs are masked in every field (:mod:`dramaturg.masking`). The text format
is unchanged: Dramatiq's own layout in workers, ``LEVEL logger: message`` in the CLI.

The formatter is our own (about forty lines) rather than python-json-logger: it must
mask each value before encoding (masking the encoded line could cut through quotes),
add the running task's fields, and flatten dramaturg's structured fields, which would
be as much code around that library as without it, and JSON logs need no extra.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .masking import mask_text

__all__ = [
    "LOG_FORMATS",
    "LOG_FORMAT_ENV",
    "JsonFormatter",
    "apply",
    "apply_to_dramatiq_cli",
    "current_format",
    "iso_utc",
    "json_line",
]

LOG_FORMATS: tuple[str, ...] = ("text", "json")
#: The environment variable that carries the choice to worker processes (the same as ``[log] format``).
LOG_FORMAT_ENV = "DRAMATURG_LOG_FORMAT"

# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_format: str = "text"


def iso_utc(timestamp: float) -> str:
    """``2026-05-01T12:00:00.123Z`` for a Unix time."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        task = _running_task()
        if task is not None:
            message = task.message
            entry.update(
                actor=message.actor_name,
                message_id=message.message_id,
                queue=task.queue_name,
                attempt=task.attempt,
            )
        for key, value in record.__dict__.items():
            if key == "dramaturg" and isinstance(value, dict):
                entry.update(value)
            elif key not in _STANDARD and not key.startswith("_"):
                entry.setdefault(key, value)  # an application's extra= never hides the fields above
        if record.exc_info and record.exc_info[0] is not None and "traceback" not in entry:
            # exc_text: the masked text masking.py may have set already
            entry["traceback"] = record.exc_text or self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps({key: _masked(value) for key, value in entry.items()}, default=str, ensure_ascii=False)


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(item) for item in value]
    return value


def _running_task() -> Any:
    from .task import current_task_or_none

    return current_task_or_none()


def json_line(level: int, logger: str, message: str, **fields: Any) -> str:
    """One JSON log line, for what is printed before any logging is set up."""
    record = logging.LogRecord(logger, level, __file__, 0, message, None, None)
    record.dramaturg = fields
    return JsonFormatter().format(record)


def current_format() -> str:
    """The format chosen last with :func:`apply` (``text`` until then)."""
    return _format


def apply(log_format: str | None) -> None:
    """Use ``log_format`` for the handlers the root logger has now, and for the JSON
    lines :func:`json_line` callers print. ``None`` (or an unknown name, which the
    settings report) changes nothing; ``text`` leaves the handlers' own format."""
    global _format
    if log_format is None or log_format not in LOG_FORMATS:
        return
    _format = log_format
    if log_format == "json":
        _format_root_handlers()


def _format_root_handlers() -> None:
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(JsonFormatter())


def apply_to_dramatiq_cli() -> None:
    """In json mode, make Dramatiq's CLI log JSON in every process it starts.

    It calls ``logging.basicConfig`` with its text format in its main process, each
    worker process and each fork process: their handlers are formatted as JSON right
    after. Call it before ``dramatiq.cli.main``; the processes it forks inherit it.
    """
    if _format != "json":
        return
    import dramatiq.cli as dramatiq_cli

    for name in ("setup_parent_logging", "setup_worker_logging", "setup_fork_logging"):
        setup = getattr(dramatiq_cli, name)
        if not getattr(setup, "_dramaturg_json", False):
            setattr(dramatiq_cli, name, _then_json(setup))


def _then_json(setup: Callable[..., Any]) -> Callable[..., Any]:
    def setup_then_json(*args: Any, **kwargs: Any) -> Any:
        logger = setup(*args, **kwargs)
        _format_root_handlers()
        return logger

    setup_then_json._dramaturg_json = True  # type: ignore[attr-defined]
    return setup_then_json
