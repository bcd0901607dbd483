"""Passwords in broker URLs never reach a log line, a repr or the CLI's output.

``mask_url("amqp://shop:s3cret@mq:5672/")`` gives ``"amqp://shop:***@mq:5672/"``;
:func:`install_log_masking` applies the same rewrite to every log record the process
creates, whoever logs it (dramaturg, Dramatiq, pika, redis-py, the application), and
to the text of any traceback attached to it.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

__all__ = ["install_log_masking", "mask_text", "mask_url", "maskable", "userinfo_end"]

# Where a URL's user information may start: right after "scheme://".
_SCHEME = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://")
# What follows the '@' that ends the user information: a host (a name, an address, an
# [IPv6] literal, or nothing), an optional port, then the end of the authority.
_HOST = re.compile(r"(?:\[[^\]\s/]*\]|[^\s/?#@:'\"\\,;()<>\[\]{}|`]*)(?::\d*)?(?=[\s/?#'\"\\,;()<>\]{}|`]|$)")
_LINE_END = re.compile(r"[\r\n]")
# ?password=... in a query string (redis-py accepts it)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<secret>[^&\s'\"]+)", re.IGNORECASE)
# A value that is one URL as masking reads it: a scheme, then no space.
_WHOLE_URL = re.compile(_SCHEME.pattern + r"\S*")

MASK = "***"


def maskable(value: object) -> bool:
    """Whether :func:`mask_text` finds every password in ``value``, a setting's value: a
    string that is one URL with its scheme (``admin:pw@mq:15672`` is not, nor is
    ``admin:pw@mq http://x``), a list of them, or a number."""
    if isinstance(value, str):
        return _WHOLE_URL.fullmatch(value) is not None
    if isinstance(value, (list, tuple)):
        return all(maskable(item) for item in value)
    return isinstance(value, (int, float, bool)) or value is None


def mask_text(text: str) -> str:
    """Replace every password inside URLs found in ``text`` with ``***``.

    A URL's user information runs from ``scheme://`` to the *last* ``@`` before its host,
    on the same line and before the next URL: a password that was not percent-encoded
    may hold ``@``, ``/``, ``?``, ``#``, quotes or spaces, and is masked whole. When in
    doubt more is masked (text up to a later ``@host`` on the line), never less.

    >>> mask_text("amqp://shop:pa/ss@mq:5672/")
    'amqp://shop:***@mq:5672/'
    """
    if "://" not in text and "password=" not in text.lower():
        return text
    if "@" in text:
        text = _mask_userinfo(text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", text)


def userinfo_end(text: str, start: int, stop: int) -> int | None:
    """The index of the ``@`` ending the user information of a URL whose authority
    starts at ``text[start]`` (right after ``scheme://``), looking no further than
    ``stop``; None when there is none. The last ``@`` that a host follows wins."""
    at = text.rfind("@", start, stop)
    while at >= 0:
        if _HOST.match(text[at + 1 : stop]):
            return at
        at = text.rfind("@", start, at)
    return None


def _mask_userinfo(text: str) -> str:
    schemes = [(match.start(), match.end()) for match in _SCHEME.finditer(text)]
    pieces = []
    done = 0
    for index, (_, start) in enumerate(schemes):
        if start < done:  # inside the user information of the URL before
            continue
        line_end = _LINE_END.search(text, start)
        stop = len(text) if line_end is None else line_end.start()
        if index + 1 < len(schemes):  # the next URL ends this one
            stop = min(stop, schemes[index + 1][0])
        at = userinfo_end(text, start, stop)
        if at is None or ":" not in text[start:at]:
            continue
        user = text[start:at].split(":", 1)[0]
        pieces += [text[done:start], f"{user}:{MASK}"]
        done = at
    return "".join(pieces) + text[done:] if pieces else text


def mask_url(url: str | None) -> str | None:
    """The URL with its password replaced by ``***`` (``None`` stays ``None``)."""
    return None if url is None else mask_text(url)


_install_lock = threading.Lock()
_installed = False


def install_log_masking() -> None:
    """Mask URL passwords in every log record created from now on, in this process.

    Idempotent. It wraps the log record factory rather than a handler's filter, so it
    also covers handlers that are added later (Dramatiq's CLI sets up its own).
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _mask_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


def _mask_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a malformed record is the logging module's to report, not ours
        return
    masked = mask_text(message)
    if masked != message:
        record.msg, record.args = masked, None
    if record.exc_info and record.exc_info[0] is not None:
        text = logging.Formatter().formatException(record.exc_info)
        masked_text = mask_text(text)
        if masked_text != text:
            record.exc_text = masked_text
