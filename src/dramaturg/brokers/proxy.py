"""Message proxies that hold their message's fields as attributes of their own.

Dramatiq's :class:`~dramatiq.broker.MessageProxy` (what a consumer hands the worker) finds
the message's fields (``options``, ``message_id``, ``actor_name``...) in ``__getattr__``,
which Python calls only once its own lookup has failed; on Python 3.11 that failure builds
an ``AttributeError`` with its text formatted, then drops it. The worker and the
middleware of dramaturg's stack read a field through the proxy about 27 times a task:
with them set on the proxy, a no-op task's worker ran a fifth fewer instructions (664k to
518k, ``benchmarks/batch_instructions.py``, 2026-12-03). :func:`with_fields`
puts the fields in the proxy's own ``__dict__``, where the first lookup finds them. A
:class:`~dramatiq.Message` is a frozen dataclass, so they are the message's own objects
and cannot go stale (``options`` is the same dict); its methods (``copy()``,
``asdict()``) are still found through ``__getattr__``.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from dramatiq import Message
from dramatiq.broker import MessageProxy

__all__ = ["with_fields"]

_FIELDS = tuple(field.name for field in dataclasses.fields(Message))

P = TypeVar("P", bound=MessageProxy)


def with_fields(proxy: P) -> P:
    """``proxy``, with its message's fields set as its own attributes."""
    message = proxy._message
    vars(proxy).update({name: getattr(message, name) for name in _FIELDS})
    return proxy
