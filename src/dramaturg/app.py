"""Bootstrap: settings -> a broker with the framework's middleware, set as Dramatiq's global.

There is no import-order hazard. ``@dramaturg.actor`` only records the actor; it is bound
to a broker when :func:`bootstrap` runs, or, in a process that never calls it, on the
first ``send()``, which bootstraps from the configuration. Dramatiq's silent fallback
(a RabbitMQ broker on localhost) is never used by dramaturg's actors.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import dramatiq

from . import brokers
from .batches.tracker import close_trackers
from .flow.control import close_flow
from .masking import install_log_masking, mask_url
from .middleware import framework_middleware
from .settings_data import SettingsData
from .status.recorder import close_stores

if TYPE_CHECKING:
    from .actors import Actor
    from .config import Settings

__all__ = ["BUILTIN_ACTORS", "bootstrap", "current_settings", "get_broker", "import_actor_modules", "shutdown"]

logger = logging.getLogger("dramaturg")

#: The module of the built-in ``echo`` actor. A worker imports it when ``worker.modules``
#: names nothing (a fresh install); list it in ``worker.modules`` to keep it beside the
#: application's own actors. It is not consumed otherwise, since every queue a worker
#: consumes but never uses costs it CPU (about 10% of the drain rate with two processes
#: on Redis, benchmarks/).
BUILTIN_ACTORS = "dramaturg.actors.builtin"

_lock = threading.RLock()
_broker: dramatiq.Broker | None = None
_settings: Settings | None = None
#: Every actor declared with @dramaturg.actor, by name, in declaration order.
_actors: dict[str, Actor[..., object]] = {}


def bootstrap(settings: Settings | None = None) -> dramatiq.Broker:
    """Build the configured broker with the framework's middleware and make it global.

    ``settings`` default to :func:`dramaturg.load_settings` (config file + environment).
    Actors declared before this call are bound to the new broker; so are actors declared
    after it. Calling it again replaces (and closes) the broker an earlier call built.
    The broker connects lazily: nothing here talks to the network, except the embedded
    broker, which starts its local server.

    >>> import dramaturg
    >>> broker = dramaturg.bootstrap(dramaturg.Settings(broker={"type": "stub"}))
    """
    global _broker, _settings
    install_log_masking()
    _refuse_pickle()
    if not isinstance(settings, SettingsData):  # a worker's settings come resolved, without pydantic
        from .config import load_settings, resolve_broker

        settings = resolve_broker(settings if settings is not None else load_settings())
    with _lock:
        previous = _broker
        broker = brokers.create_broker(settings.broker, framework_middleware(settings))
        # Bind every actor before publishing the broker: get_broker()'s lock-free fast
        # path must never hand out a broker whose actors are not declared on it yet.
        for actor in list(_actors.values()):
            actor._bind(broker)
        dramatiq.set_broker(broker)
        _settings, _broker = settings, broker
        if previous is not None:
            close_stores(previous.middleware)
            close_trackers(previous.middleware)
            close_flow(previous.middleware)
            previous.close()
    logger.debug("dramaturg bootstrapped %s", _describe(settings))
    return broker


def _describe(settings: Settings) -> str:
    """``a redis broker at redis://:***@host/0 (from /srv/shop/dramaturg.toml)``"""
    broker = settings.broker
    return f"a {broker.type} broker at {mask_url(broker.url)} ({settings.source_of('broker.url')})"


def _refuse_pickle() -> None:
    # JSON only on the wire: a message from the network must never be able to run code.
    if isinstance(dramatiq.get_encoder(), dramatiq.PickleEncoder):
        logger.warning("dramaturg: replacing Dramatiq's PickleEncoder with its JSONEncoder (JSON only on the wire)")
        dramatiq.set_encoder(dramatiq.JSONEncoder())


def get_broker() -> dramatiq.Broker:
    """The broker :func:`bootstrap` built; bootstraps from the configuration if none yet."""
    broker = _broker
    if broker is not None:
        return broker
    with _lock:
        if _broker is None:
            broker = bootstrap()
            assert _settings is not None
            logger.info("dramaturg: bootstrap() was not called; using the configured one: %s", _describe(_settings))
            return broker
        return _broker


def current_settings() -> Settings:
    """The settings of the current broker (bootstrapping if needed)."""
    get_broker()
    assert _settings is not None
    return _settings


def shutdown() -> None:
    """Close the broker :func:`bootstrap` built and forget it (tests, clean exits)."""
    global _broker, _settings
    with _lock:
        broker, _broker, _settings = _broker, None, None
        for actor in _actors.values():
            actor._unbind()
        if broker is not None:
            close_stores(broker.middleware)
            close_trackers(broker.middleware)
            close_flow(broker.middleware)
            broker.close()
            if dramatiq.broker.global_broker is broker:
                dramatiq.broker.global_broker = None


def import_actor_modules(modules: Iterable[str]) -> None:
    """Import each module that declares actors (``worker.modules``); errors propagate."""
    for name in modules:
        importlib.import_module(name)


def import_actor_modules_or_explain(
    modules: Iterable[str],
    *,
    given_as: str | None = None,
    raised: Callable[[str], Exception] | None = None,
) -> None:
    """As :func:`import_actor_modules`, for commands: a failure is a one-line ConfigError
    naming ``worker.modules``, or, for modules ``given_as`` a command's arguments (``"a
    MODULE argument"``), a UsageError naming that. ``raised``: what a module that was found
    and raised something else while it ran (not a SyntaxError) becomes instead, given the
    line (``dramaturg worker``: a database not answering yet is worth a restart).

    The working directory goes first on ``sys.path``, as Dramatiq's worker CLI puts it
    (its ``--path .``): a command run where ``dramaturg worker`` runs finds the same modules.
    """
    from .errors import ConfigError, DramaturgError, UsageError

    def failed(message: str) -> DramaturgError:
        if given_as is not None:
            return UsageError(f"{message} ({given_as})")
        return ConfigError(f"worker.modules: {message}", key="worker.modules")

    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise failed(
                f"cannot import {name!r}: {error}; check the name and that its directory is on"
                " sys.path (run from the project root, or set PYTHONPATH)"
            ) from None
        except Exception as error:
            message = f"importing {name!r} failed: {type(error).__name__}: {error}"
            if raised is not None and not isinstance(error, SyntaxError):
                raise raised(f"worker.modules: {message}" if given_as is None else f"{message} ({given_as})") from None
            raise failed(message) from None


def register(actor: Actor[..., object]) -> None:
    """Record a newly declared actor; bind it now if a broker is already built."""
    with _lock:
        _actors[actor.actor_name] = actor
        if _broker is not None:
            actor._bind(_broker)


def registered_actor(name: str) -> Actor[..., object] | None:
    return _actors.get(name)


def registered_actors() -> dict[str, Actor[..., object]]:
    """Every declared actor by name."""
    return dict(_actors)


def current_broker_or_none() -> dramatiq.Broker | None:
    return _broker


def current_settings_or_none() -> Settings | None:
    """The settings of the current broker, or None before :func:`bootstrap` (no side effects)."""
    return _settings
