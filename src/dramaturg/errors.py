"""Every error dramaturg raises on purpose derives from one root.

::

    DramaturgError
     +-- ConfigError            bad configuration: names the key, the bad value and the fix
     +-- BrokerUnreachable      the broker did not answer (also a dramatiq ConnectionFailed,
     |                          so Dramatiq's worker exits with its "connect" code)
     +-- BrokerNotInstalled     the broker's extra is missing (pip install 'dramaturg[redis]')
     +-- ActorError             a bad @actor declaration (unknown option, duplicate name)
     +-- SendError              a message that cannot be sent (unknown actor or queue,
     |                          arguments that do not fit the handler, non-JSON arguments)
     +-- TaskHeld               eager mode: a task sent with send() was held (its reason)

Messages say what was wrong and how to fix it; library errors are translated at the
boundary (``raise ConfigError(...) from None``) so that no traceback from deep inside
pika or redis reaches a user who only mistyped a key.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from dramatiq.errors import ConnectionFailed

__all__ = [
    "ActorError",
    "BrokerNotInstalled",
    "BrokerUnreachable",
    "ConfigError",
    "DramaturgError",
    "SendError",
    "TaskHeld",
    "did_you_mean",
]


class DramaturgError(Exception):
    """The root of every error dramaturg raises on purpose."""


class ConfigError(DramaturgError):
    """The configuration is invalid.

    ``key`` is the dotted settings key (``broker.type``) when one is to blame, and
    ``source`` where its value came from (a file path or an environment variable).
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.source = source


class BrokerUnreachable(DramaturgError, ConnectionFailed):
    """The broker could not be reached. The URL in the message is always masked."""

    def __init__(self, message: str) -> None:
        DramaturgError.__init__(self, message)
        self.message = message


class BrokerNotInstalled(DramaturgError):
    """The client library for the configured broker is not installed."""


class ActorError(DramaturgError):
    """An actor was declared wrongly (unknown option, name already taken)."""


class TaskHeld(DramaturgError):
    """Eager mode: a task sent with ``send()`` was held (``reason``); nothing is lost.

    ``task`` is the :class:`~dramaturg.HeldTask`, also in ``dramaturg.held_tasks()``.
    """

    def __init__(self, reason: str, task: Any = None) -> None:
        super().__init__(f"task held: {reason}")
        self.reason = reason
        self.task = task


class SendError(DramaturgError):
    """A message could not be sent: unknown actor or queue, or arguments that do not fit."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or ``""`` when none is close."""
    matches = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {matches[0]!r}?" if matches else ""
