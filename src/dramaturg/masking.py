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

__all__ = ["install_log_masking", "mask_text", "mask_url"]

# scheme://AUTHORITY: the authority runs to the next '/', '?', '#' or line end; its
# userinfo (user:password) runs to its *last* '@', since passwords may hold '@', quotes
# or spaces that a careless URL did not encode.
_AUTHORITY = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<authority>[^/?#\r\n]*)")
# ?password=... in a query string (redis-py accepts it)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<secret>[^&\s'\"]+)", re.IGNORECASE)

MASK = "***"


def mask_text(text: str) -> str:
    """Replace every password inside URLs found in ``text`` with ``***``."""
    if "://" not in text and "password=" not in text.lower():
        return text
    text = _AUTHORITY.sub(_mask_authority, text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", text)


def _mask_authority(match: re.Match[str]) -> str:
    authority = match["authority"]
    userinfo, at, host = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return match[0]
    user = userinfo.split(":", 1)[0]
    return f"{match['scheme']}{user}:{MASK}@{host}"


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
