"""Store context: the context a task was sent in travels with it.

A web shop sends "reindex product 42" while serving its French store; the worker must
run that task in the French store, with its locale, user and request id::

    with dramaturg.context(store="fr", locale="fr_FR", request_id=request.id):
        reindex.send(42)

    @dramaturg.actor
    def reindex(product_id: int) -> None:
        dramaturg.current_task().context["store"]      # "fr"

Applications that keep such things in contextvars of their own bind them once, and
they are read at send time and set back around the handler::

    current_store: ContextVar[str] = ContextVar("current_store")
    dramaturg.bind_contextvar("store", current_store)

For anything else, register a provider (``() -> mapping``, called at send time) and a
restorer (``(context) -> undo``, called before the handler; ``undo()`` after it), in
code or by name in the config (``[context] providers = ["shop.ctx:tenant_context"]``,
``restorers = [...]``); ``[context] default`` applies to tasks sent with none.

When: the context is captured when a message is first enqueued, as the option
``dramaturg_context``, and never again: retries, delayed-queue moves, kicks and
republishes keep it. It must be JSON (checked at send time: a clear error in the
sender, not a crash in the worker). Later values win: default < providers < the
innermost ``context(...)`` (inside a handler: the task's own context, so follow-up
tasks inherit it).

Around the handler: ``current_task().context`` and :func:`current_context` give it,
restorers set the application's contextvars, and all of it is undone after the task
(also after a failed or skipped one). Each worker thread has its own: two threads
running tasks of two stores never see each other's.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, TypeVar

import dramatiq

from .errors import ConfigError, ContextError
from .task import run_of, start_run

__all__ = [
    "ContextError",
    "ContextMiddleware",
    "bind_contextvar",
    "context",
    "context_provider",
    "context_restorer",
    "current_context",
]

logger = logging.getLogger("dramaturg.context")

#: The message option that carries the context.
OPTION = "dramaturg_context"

Provider = Callable[[], Mapping[str, Any] | None]
Undo = Callable[[], object]
Restorer = Callable[[Mapping[str, Any]], Undo | None]
T = TypeVar("T")

_EMPTY: Mapping[str, Any] = MappingProxyType({})
#: The innermost context(...) on the sending side, or the running task's context.
_explicit: ContextVar[Mapping[str, Any]] = ContextVar("dramaturg_context", default=_EMPTY)
_providers: list[Provider] = []
_restorers: list[Restorer] = []


@contextlib.contextmanager
def context(**values: Any) -> Iterator[Mapping[str, Any]]:
    """Send tasks with these context values (merged over any outer context)."""
    _check_json(values, "dramaturg.context()")
    merged = MappingProxyType({**_explicit.get(), **values})
    token = _explicit.set(merged)
    try:
        yield merged
    finally:
        _explicit.reset(token)


def context_provider(fn: Provider) -> Provider:
    """Register ``fn() -> mapping | None``, called at each send; returns ``fn`` (a decorator)."""
    if fn not in _providers:
        _providers.append(fn)
    return fn


def context_restorer(fn: Restorer) -> Restorer:
    """Register ``fn(context) -> undo | None``, called before each handler; ``undo()`` runs after."""
    if fn not in _restorers:
        _restorers.append(fn)
    return fn


def bind_contextvar(key: str, var: ContextVar[T]) -> None:
    """Carry ``var`` as ``key``: read at send time (when set), set back around the handler."""

    def provide() -> Mapping[str, Any] | None:
        try:
            return {key: var.get()}
        except LookupError:
            return None

    def restore(values: Mapping[str, Any]) -> Undo | None:
        if key not in values:
            return None
        token = var.set(values[key])
        return lambda: var.reset(token)

    provide.__qualname__ = restore.__qualname__ = f"bind_contextvar({key!r})"
    context_provider(provide)
    context_restorer(restore)


def current_context() -> Mapping[str, Any]:
    """The context a task sent here and now would get (inside a handler: the task's)."""
    return MappingProxyType(_gather(_EMPTY))


def _gather(default: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(default)
    for provider in _providers:
        try:
            provided = provider()
        except Exception as error:
            name = getattr(provider, "__qualname__", repr(provider))
            raise ContextError(f"context provider {name} failed: {type(error).__name__}: {error}") from error
        if provided:
            values.update(provided)
    values.update(_explicit.get())
    return values


def _check_json(values: Mapping[str, Any], where: str) -> None:
    for key, value in values.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ContextError(
                f"{where}: context value {key!r} = {value!r} is not JSON ({error}); pass plain values"
                " (str, int, float, bool, None, and lists or dicts of them), e.g. an id instead of an object"
            ) from None


def load_callables(names: list[str], key: str) -> list[Callable[..., Any]]:
    """Import ``module:attribute`` names from the config, or a ConfigError naming ``key``."""
    loaded = []
    for name in names:
        module_name, _, attribute = name.partition(":")
        try:
            if not attribute:
                raise ValueError("write it as module:function")
            loaded.append(getattr(importlib.import_module(module_name), attribute))
        except (ImportError, AttributeError, ValueError) as error:
            raise ConfigError(f"{key}: cannot load {name!r}: {error}", key=key) from None
    return loaded


class ContextMiddleware(dramatiq.Middleware):
    """Captures the context at first enqueue; restores it around each handler."""

    def __init__(
        self,
        default: Mapping[str, Any] | None = None,
        providers: list[str] | None = None,
        restorers: list[str] | None = None,
    ) -> None:
        self.default: Mapping[str, Any] = MappingProxyType(dict(default or {}))
        _check_json(self.default, "context.default")
        for provider in load_callables(providers or [], "context.providers"):
            context_provider(provider)
        for restorer in load_callables(restorers or [], "context.restorers"):
            context_restorer(restorer)

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        options = message.options
        if OPTION in options:
            return  # captured when it was first sent
        if not (_providers or self.default or _explicit.get()):
            options[OPTION] = {}
            return
        values = _gather(self.default)
        _check_json(values, f"sending {message.actor_name}")
        options[OPTION] = values

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        values = MappingProxyType(dict(message.options.get(OPTION) or {}))
        run = start_run(message)
        run.context_outside = _explicit.get()  # eager mode runs in the sender's thread
        _explicit.set(values)
        undo: list[Undo] = []
        run.context_undo = undo
        for restorer in _restorers:
            try:
                done = restorer(values)
            except Exception as error:
                # A MiddlewareError: the task fails (and is retried or held) instead of
                # running in a half-restored context; the after-hook undoes the rest.
                name = getattr(restorer, "__qualname__", repr(restorer))
                raise ContextError(f"context restorer {name} failed: {type(error).__name__}: {error}") from error
            if done is not None:
                undo.append(done)

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        run = run_of(message)
        if run is None:  # skipped before its before-hook ran
            _explicit.set(_EMPTY)
            return
        for done in reversed(run.context_undo):
            try:
                done()
            except Exception:
                logger.exception("undoing the context of message %s failed", message.message_id)
        run.context_undo = ()
        _explicit.set(_EMPTY if run.context_outside is None else run.context_outside)

    after_skip_message = after_process_message
