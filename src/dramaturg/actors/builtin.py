"""Actors that ship with dramaturg, so a fresh install can test the whole path.

``dramaturg send default:echo:'["hello"]'`` then a worker logs ``echo: 'hello'``.
"""

from __future__ import annotations

import logging
from typing import Any

from . import actor

__all__ = ["echo"]

logger = logging.getLogger("dramaturg.echo")


@actor(actor_name="echo", queue_name="default")
def echo(*args: Any, **kwargs: Any) -> None:
    """Log the arguments it was sent with (at INFO, on the worker)."""
    shown = ", ".join([*map(repr, args), *(f"{key}={value!r}" for key, value in kwargs.items())])
    logger.info("echo: %s", shown)
