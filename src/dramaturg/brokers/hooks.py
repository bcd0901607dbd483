"""Middleware hooks called only on the middleware that has them.

Dramatiq's ``Broker.emit_before`` and ``emit_after`` go through every middleware of the
stack for every signal, look the hook up by name, and call it, though most middleware
leave most hooks as :class:`dramatiq.Middleware`'s no-ops: with dramaturg's stack of
about sixteen, that loop was the largest single cost of running a no-op task after its
acknowledgement (a seventh of a Redis worker's time). :class:`HookDispatch` keeps, per
signal, the middleware whose class overrides the hook (or whose instance sets it), and
calls those, in Dramatiq's order and with its error handling: a
:class:`~dramatiq.middleware.MiddlewareError` (``SkipMessage``) from a before-hook goes
to the caller, any other error is logged and the next hook runs. The lists are made
again whenever the stack changes (``add_middleware``, or the list changed in place).
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.middleware import MiddlewareError

__all__ = ["HookDispatch"]

_BASE = dramatiq.Middleware


def _has(middleware: dramatiq.Middleware, hook: str) -> bool:
    """Whether ``middleware`` does anything on ``hook`` (not the base class's no-op)."""
    return hook in vars(middleware) or getattr(type(middleware), hook, None) is not getattr(_BASE, hook, None)


class HookDispatch:
    """A mixin for a :class:`dramatiq.Broker`: its ``emit_before`` and ``emit_after``
    call only the middleware that has the hook (see the module)."""

    middleware: list[dramatiq.Middleware]
    logger: Any

    _hooks_of: tuple[dramatiq.Middleware, ...] = ()
    _hooks: dict[str, tuple[dramatiq.Middleware, ...]]

    def _with(self, hook: str, after: bool) -> tuple[dramatiq.Middleware, ...]:
        stack = tuple(self.middleware)
        if stack != self._hooks_of:  # compared by identity first: as cheap as a tuple of the list
            self._hooks_of, self._hooks = stack, {}
        found = self._hooks.get(hook)
        if found is None:
            found = tuple(m for m in (reversed(stack) if after else stack) if _has(m, hook))
            self._hooks[hook] = found
        return found

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        hook = "before_" + signal
        for middleware in self._with(hook, False):
            try:
                getattr(middleware, hook)(self, *args, **kwargs)
            except MiddlewareError:
                raise
            except Exception:
                self.logger.critical("Unexpected failure in %s of %r.", hook, middleware, exc_info=True)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        hook = "after_" + signal
        for middleware in self._with(hook, True):
            try:
                getattr(middleware, hook)(self, *args, **kwargs)
            except Exception:
                self.logger.critical("Unexpected failure in %s of %r.", hook, middleware, exc_info=True)
