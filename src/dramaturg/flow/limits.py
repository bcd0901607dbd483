"""Limits and unique keys declared on actors, and the key templates they are named by.

::

    @dramaturg.actor(queue_name="api", limits=[
        dramaturg.concurrency(2, key="tenant:{store}"),     # at most 2 running per store
        dramaturg.rate(100, per="1m", key="shopify"),         # at most 100 starts in any minute
    ])
    def sync(order_id: int) -> None: ...

    @dramaturg.actor(unique=dramaturg.unique(key="reindex:{0}", until="started"))
    def reindex(product_id: int) -> None: ...

A key is a template (``str.format`` fields): ``{0}``, ``{1}`` are the task's arguments
by position, ``{name}`` its argument ``name`` (passed by position or by keyword) when
the handler has such a parameter, else the value ``name`` of the task's store context
(``dramaturg.context(store="fr")``: ``tenant:{store}`` -> ``tenant:fr``). A template
naming a position or a name the handler cannot have fails at decoration
(:class:`~dramaturg.ActorError`); one naming a context value the message does not carry
fails at send (:class:`~dramaturg.FlowSendError`, naming the key).
"""

from __future__ import annotations

import inspect
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..durations import Duration, parse_ms
from ..errors import ActorError

__all__ = ["Concurrency", "KeyTemplate", "Rate", "Unique", "check_actor_options", "concurrency", "rate", "unique"]


class KeyTemplate:
    """A key template bound to a handler's signature (see the module)."""

    __slots__ = ("_parts", "constant", "text")

    def __init__(self, text: str, parts: list[tuple[str, Any, str, int]]) -> None:
        self.text = text
        #: The key itself when the template has no fields (made once, not per task).
        self.constant: str | None = "".join(p[0] for p in parts) if all(p[1] is None for p in parts) else None
        #: (literal text, field kind: None | "arg" | "ctx", name, position) per piece.
        self._parts = parts

    @classmethod
    def parse(cls, text: str, handler: Callable[..., Any] | None, where: str) -> KeyTemplate:
        if not isinstance(text, str) or not text:
            raise ActorError(f"{where}: a key must be a non-empty string (a template such as 'tenant:{{store}}')")
        try:
            pieces = list(string.Formatter().parse(text))
        except ValueError as error:
            raise ActorError(f"{where}: key {text!r} is not a valid template: {error}") from None
        params: list[inspect.Parameter] = []
        if handler is not None:
            try:
                params = list(inspect.signature(handler).parameters.values())
            except (TypeError, ValueError):
                params = []
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        var_positional = any(p.kind is p.VAR_POSITIONAL for p in params)
        by_name = {p.name: i for i, p in enumerate(positional)}
        named = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
        parts: list[tuple[str, Any, str, int]] = []
        for literal, name, spec, conversion in pieces:
            if name is None:
                parts.append((literal, None, "", -1))
                continue
            if spec or conversion or not name or any(c in name for c in ".["):
                raise ActorError(
                    f"{where}: key {text!r}: write fields as {{0}} or {{name}}, without formats or"
                    f" attributes (found {{{name}{'!' + conversion if conversion else ''}"
                    f"{':' + spec if spec else ''}}})"
                )
            if name.isdigit():
                index = int(name)
                if handler is not None and index >= len(positional) and not var_positional:
                    raise ActorError(
                        f"{where}: key {text!r} names argument {{{index}}}, and the handler takes"
                        f" {len(positional)} positional argument(s)"
                    )
                pname = positional[index].name if index < len(positional) else ""
                parts.append((literal, "arg", pname, index))
            elif name in by_name:
                parts.append((literal, "arg", name, by_name[name]))
            elif name in named:
                parts.append((literal, "arg", name, -1))
            else:
                parts.append((literal, "ctx", name, -1))  # a store context value, checked at send
        return cls(text, parts)

    def matches(self, key: str) -> bool:
        """Whether ``key`` could have been made by this template (for ``dramaturg limits``)."""
        pattern = "".join(re.escape(literal) + ("" if kind is None else ".+?") for literal, kind, _, _ in self._parts)
        return re.fullmatch(pattern, key) is not None

    def render(self, args: Sequence[Any], kwargs: Mapping[str, Any], context: Mapping[str, Any]) -> str:
        """The key for one message; raises KeyError naming what it lacks."""
        out = []
        for literal, kind, name, index in self._parts:
            out.append(literal)
            if kind is None:
                continue
            if kind == "arg":
                if 0 <= index < len(args):
                    value = args[index]
                elif name and name in kwargs:
                    value = kwargs[name]
                else:
                    raise KeyError(f"argument {{{name or index}}}")
            elif name in context:
                value = context[name]
            else:
                raise KeyError(f"store context value {{{name}}} (send it inside dramaturg.context({name}=...))")
            out.append(str(value))
        return "".join(out)

    def __repr__(self) -> str:
        return repr(self.text)


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a whole number of 1 or more, not {value!r}")
    return value


@dataclass(frozen=True)
class Concurrency:
    """At most ``limit`` tasks with the same ``key`` run at once, across all workers. Each
    holds a slot, a lease of ``lease_ms`` (default: the task's ttr), renewed by ``touch()``."""

    limit: int
    key: str
    lease_ms: int | None = None
    kind: str = field(default="c", init=False)

    @property
    def describe(self) -> str:
        return f"concurrency({self.limit}, key={self.key!r})"


@dataclass(frozen=True)
class Rate:
    """At most ``limit`` tasks with the same ``key`` start in any window of ``per_ms``."""

    limit: int
    per_ms: int
    key: str
    kind: str = field(default="r", init=False)

    @property
    def describe(self) -> str:
        return f"rate({self.limit}, per={self.per_ms} ms, key={self.key!r})"


@dataclass(frozen=True)
class Unique:
    """One task per ``key`` queued or running (see :func:`unique`)."""

    key: str
    until: Literal["started", "finished"]
    ttl_ms: int
    on_duplicate: Literal["return", "raise"]


def concurrency(limit: int, *, key: str, lease: Duration | None = None) -> Concurrency:
    """At most ``limit`` tasks with the same ``key`` (a template: see the module) running
    at once across every worker. ``lease``: how long a slot outlives a silent worker
    (default: the task's ttr); ``touch()`` renews it. ``limit`` must be 1 or more."""
    return Concurrency(
        _positive(limit, "concurrency: the limit"),
        key,
        None if lease is None else _positive(parse_ms(lease, what="concurrency lease"), "concurrency: the lease"),
    )


def rate(limit: int, *, per: Duration, key: str) -> Rate:
    """At most ``limit`` tasks with the same ``key`` starting in any window of ``per``
    (``"1m"``, ``"1s"``), across every worker; ``limit`` and ``per`` must be more than 0."""
    return Rate(_positive(limit, "rate: the limit"), _positive(parse_ms(per, what="rate per"), "rate: per"), key)


def unique(
    *,
    key: str,
    until: Literal["started", "finished"] = "finished",
    ttl: Duration = "1d",
    on_duplicate: Literal["return", "raise"] = "return",
) -> Unique:
    """One task per ``key`` (a template: see the module): while one is queued (``until=
    "started"``) or queued or running (``"finished"``, the default), sending another
    returns the first's message, id and all, and logs that it did (``on_duplicate=
    "raise"``: raises :class:`~dramaturg.DuplicateTask` instead). The key is released when
    the task starts (``"started"``) or ends whatever the way (succeeded, held, rejected),
    and in any case ``ttl`` after it was taken (default one day; ``ttl="10m"``: at most one
    per key every ten minutes, unless it ends sooner)."""
    if until not in ("started", "finished"):
        raise ValueError(f"unique: until must be 'started' or 'finished', not {until!r}")
    if on_duplicate not in ("return", "raise"):
        raise ValueError(f"unique: on_duplicate must be 'return' or 'raise', not {on_duplicate!r}")
    return Unique(key, until, _positive(parse_ms(ttl, what="unique ttl"), "unique: the ttl"), on_duplicate)


@dataclass(frozen=True)
class Declared:
    """An actor's flow options, checked and bound to its handler once."""

    limits: tuple[tuple[Concurrency | Rate, KeyTemplate], ...]
    unique: tuple[Unique, KeyTemplate] | None


def check_actor_options(where: str, handler: Callable[..., Any], options: dict[str, Any]) -> None:
    """Check ``limits=`` and ``unique=`` of an ``@actor`` at decoration and keep them bound
    to the handler (as the option ``dramaturg_flow``); raises :class:`~dramaturg.ActorError`."""
    limits = options.get("limits")
    found_unique = options.get("unique")
    if limits is None and found_unique is None:
        return
    bound: list[tuple[Concurrency | Rate, KeyTemplate]] = []
    if limits is not None:
        items = [limits] if isinstance(limits, Concurrency | Rate) else limits
        if not isinstance(items, list | tuple):
            raise ActorError(f"{where}: limits must be a list of dramaturg.concurrency(...) and dramaturg.rate(...)")
        for item in items:
            if not isinstance(item, Concurrency | Rate):
                raise ActorError(
                    f"{where}: limits: {item!r} is not a limit; use dramaturg.concurrency(...) or dramaturg.rate(...)"
                )
            bound.append((item, KeyTemplate.parse(item.key, handler, f"{where}: {item.describe}")))
    bound_unique = None
    if found_unique is not None:
        if not isinstance(found_unique, Unique):
            raise ActorError(f"{where}: unique must be dramaturg.unique(key=...), not {found_unique!r}")
        bound_unique = (found_unique, KeyTemplate.parse(found_unique.key, handler, f"{where}: unique"))
    options["dramaturg_flow"] = Declared(tuple(bound), bound_unique)
