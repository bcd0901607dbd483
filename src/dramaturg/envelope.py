"""The envelope of a message taken from a broker, checked before Dramatiq's worker sees it.

Dramatiq trusts every message it decodes. One that another client (or a broken
producer) put on a queue may be valid JSON and still break the worker: ``options``
that is a number, or ``options.priority`` that is a word, raises in the consumer
(which restarts, and the deliveries it held run again); a ``queue_name`` other than
the queue it came from kills a worker thread for good; a ``ttr`` that is a word runs
the task with no time limit. So each consumer reads a body with :func:`decode`, which
checks every field and each option that dramaturg or Dramatiq reads, and raises
:class:`Poison` with a reason naming the field and its value::

    options.priority: expected an integer, got 'high'

The consumer holds such a message (as it holds an undecodable body) and acknowledges
it; the worker goes on. A message whose ``queue_name`` is another spelling of the
queue it was taken from (its delay queue ``.DQ``, a priority lane ``.P1``/``.P2``)
is accepted and carries the exact name of that queue from then on, so that Dramatiq
acknowledges it on the consumer it came from.

What is checked (``null`` stands for "not set" where the reader treats it so):

- ``queue_name``, ``actor_name``, ``message_id``: non-empty strings; the queue is the
  consumer's; ``message_timestamp``: ms since the epoch (a number >= 0);
  ``args``: an array; ``kwargs``: an object; ``options``: an object; every field
  present and no other;
- ``options.priority``: an integer; ``broker_priority``: an integer 0-255 (RabbitMQ's);
- ``eta``: ms since the epoch; ``ttr``, ``min_backoff``, ``max_backoff``, ``max_age``,
  ``delay``: durations in ms (numbers >= 0);
- ``retries``, ``dramaturg_kicks``: whole numbers >= 0 (not null); ``max_retries``: one, or null;
- ``dramaturg_context``: an object; ``dramaturg_last_error``: a string;
  ``redis_message_id``: a non-empty string;
- ``on_success``, ``on_failure``: actor names; ``pipe_target``: a message, checked the
  same way (and its own ``pipe_target``, and so on);
- ``throws``, ``hold_on``: null (exception classes are the actor's; JSON cannot carry them).

Other options are left alone. The checks cost about a microsecond per message (type
tests and dictionary look-ups; the JSON decoding was done anyway).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.errors import DecodeError

from .errors import Poison
from .queues import canonical_queue
from .unknown_actors import UNKNOWN_ACTOR_SINCE

__all__ = ["Poison", "decode", "problem"]

#: The fields of Dramatiq's message, every one required.
FIELDS = frozenset({"queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp"})

#: Integers beyond this do not fit the 64-bit fields of the brokers and clocks that read them.
_LIMIT = 2**63


def decode(body: bytes, queue_name: str) -> dramatiq.Message[Any]:
    """The message in ``body``, taken from the queue ``queue_name`` (its exact name).

    Raises :class:`Poison` when the body does not decode, a field is wrong (see the
    module docstring), or the message names another queue.
    """
    try:
        fields = dramatiq.get_encoder().decode(body)
    except DecodeError as error:
        raise Poison(f"undecodable message: {error.error!r}", body) from None
    except Exception as error:  # a >4,300-digit integer, nesting past the recursion limit
        raise Poison(f"undecodable message: {error!r}", body) from None
    reason = problem(fields)
    if reason is not None:
        raise Poison(reason, body, fields)
    named = fields["queue_name"]
    fields["args"] = tuple(fields["args"])
    if named != queue_name:
        # Another spelling of the same queue (its delay queue, a lane) is that queue; from
        # here on the message names it exactly, so Dramatiq acknowledges it where it came from.
        fields["queue_name"] = queue_name
        if canonical_queue(named) != canonical_queue(queue_name):
            reason = (
                f"queue_name: the message names queue {named!r} but was taken from queue"
                f" {canonical_queue(queue_name)!r}"
            )
            raise Poison(reason, body, fields, dramatiq.Message(**fields))
    return dramatiq.Message(**fields)


def problem(fields: Any) -> str | None:
    """What is wrong with a decoded message (``"<field>: expected ..., got ..."``), or None.

    The queue is not compared here (:func:`decode` does that).

    >>> problem({"queue_name": "imports", "actor_name": "import_user", "args": [], "kwargs": {},
    ...          "options": {"priority": "high"}, "message_id": "m-1", "message_timestamp": 0})
    "options.priority: expected an integer, got 'high'"
    """
    prefix = ""
    while True:  # a pipeline's next message, and the one after it, ... (a loop: no recursion limit)
        reason = _problem(fields, prefix)
        if reason is not None:
            return reason
        fields = fields["options"].get("pipe_target")
        if fields is None:
            return None
        prefix += "options.pipe_target."


def _problem(fields: Any, prefix: str) -> str | None:
    if type(fields) is not dict:
        return f"{prefix or 'message'}: expected an object, got {_show(fields)}"
    if fields.keys() != FIELDS:
        missing = sorted(FIELDS - fields.keys())
        if missing:
            return f"{prefix}{missing[0]}: missing"
        return f"{prefix}{sorted(fields.keys() - FIELDS)[0]}: unexpected field"
    for name in ("queue_name", "actor_name", "message_id"):
        value = fields[name]
        if type(value) is not str or not value:
            return f"{prefix}{name}: expected a non-empty string, got {_show(value)}"
    if not _is_time(fields["message_timestamp"]) or fields["message_timestamp"] is None:
        return f"{prefix}message_timestamp: expected {_TIME}, got {_show(fields['message_timestamp'])}"
    if type(fields["args"]) is not list:
        return f"{prefix}args: expected an array, got {_show(fields['args'])}"
    kwargs = fields["kwargs"]
    if type(kwargs) is not dict:
        return f"{prefix}kwargs: expected an object, got {_show(kwargs)}"
    for key in kwargs:  # JSON's keys are strings; another encoder's might not be
        if type(key) is not str:
            return f"{prefix}kwargs: expected string keys, got {_show(key)}"
    options = fields["options"]
    if type(options) is not dict:
        return f"{prefix}options: expected an object, got {_show(options)}"
    for name, value in options.items():
        check = _OPTIONS.get(name)
        if check is not None and not check[0](value):
            return f"{prefix}options.{name}: expected {check[1]}, got {_show(value)}"
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# The checks of single values. ``type(x) is int`` leaves out bool, which JSON keeps apart.


def _is_integer(value: Any) -> bool:
    kind = type(value)
    if kind is int:
        return bool(-_LIMIT < value < _LIMIT)
    return kind is float and value.is_integer() and -_LIMIT < value < _LIMIT


def _is_count(value: Any) -> bool:
    """A whole number >= 0."""
    return _is_integer(value) and value >= 0


def _is_time(value: Any) -> bool:
    """A number of ms >= 0 (finite), or None."""
    kind = type(value)
    if kind is int:
        return bool(0 <= value < _LIMIT)
    if kind is float:
        return math.isfinite(value) and 0 <= value < _LIMIT
    return value is None


def _is_optional_integer(value: Any) -> bool:
    return value is None or _is_integer(value)


def _is_optional_count(value: Any) -> bool:
    return value is None or _is_count(value)


def _is_byte(value: Any) -> bool:
    return value is None or (type(value) is int and 0 <= value <= 255)


def _is_optional_object(value: Any) -> bool:
    return value is None or type(value) is dict


def _is_optional_name(value: Any) -> bool:
    return value is None or type(value) is str


def _is_id(value: Any) -> bool:
    return type(value) is str and value != ""


def _is_null(value: Any) -> bool:
    return value is None


_TIME = "a number of ms >= 0"
_CLASSES = "null (exception classes are set on the actor; a message cannot carry them)"

#: option -> (check, what it expects), for every option dramaturg or Dramatiq reads in a worker.
_OPTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "priority": (_is_optional_integer, "an integer"),
    "broker_priority": (_is_byte, "an integer from 0 to 255"),
    "eta": (_is_time, "a time in ms since the epoch (a number >= 0)"),
    "ttr": (_is_time, _TIME),
    "min_backoff": (_is_time, _TIME),
    "max_backoff": (_is_time, _TIME),
    "max_age": (_is_time, _TIME),
    "delay": (_is_time, _TIME),
    "retries": (_is_count, "a whole number >= 0"),
    "max_retries": (_is_optional_count, "a whole number >= 0"),
    "dramaturg_kicks": (_is_count, "a whole number >= 0"),
    UNKNOWN_ACTOR_SINCE: (_is_time, "a time in ms since the epoch (a number >= 0)"),
    "dramaturg_last_error": (_is_optional_name, "a string"),
    "dramaturg_context": (_is_optional_object, "an object"),
    "redis_message_id": (_is_id, "a non-empty string"),
    "on_success": (_is_optional_name, "an actor name (a string)"),
    "on_failure": (_is_optional_name, "an actor name (a string)"),
    "pipe_target": (_is_optional_object, "a message (an object)"),
    "throws": (_is_null, _CLASSES),
    "hold_on": (_is_null, _CLASSES),
}
