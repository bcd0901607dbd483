"""``@dramaturg.actor``: Dramatiq actors that bind to the configured broker when it exists.

::

    import dramaturg

    @dramaturg.actor(queue_name="imports", max_retries=5)
    def import_user(row: dict) -> None: ...

    import_user.send({"id": 1, "email": "ada@example.com"})   # checked against the signature

The object returned *is* a :class:`dramatiq.Actor` (pipelines, groups and Dramatiq's
own tools accept it); it differs only in when it meets its broker.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import re
from collections.abc import Awaitable, Callable, Iterable
from inspect import iscoroutinefunction
from typing import Any, ParamSpec, Protocol, TypeVar, overload

import dramatiq
from dramatiq.asyncio import async_to_sync
from dramatiq.logging import get_logger

from .. import app, bulk, resources
from ..errors import ActorError, did_you_mean
from ..middleware.ttr import INTERRUPTS
from ..task import Hold, Success, current_run, current_task_or_none

__all__ = ["Actor", "actor"]

P = ParamSpec("P")
R = TypeVar("R")

_QUEUE_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9._-]*")


class Actor(dramatiq.Actor[P, R]):
    """A Dramatiq actor whose broker is the one :func:`dramaturg.bootstrap` built.

    Declaring it does not touch any broker; ``send()`` before any bootstrap bootstraps
    from the configuration. ``actor(...)`` calls the function directly, in this process.
    """

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]] | Callable[P, R],
        *,
        actor_name: str,
        queue_name: str,
        priority: int,
        options: dict[str, Any],
    ) -> None:
        # dramatiq.Actor.__init__ declares the actor on a broker at once; that is the
        # import-order hazard this class exists to remove, so its fields are set here.
        self.logger = get_logger(fn.__module__ or "_", actor_name)
        self.fn = _runner(fn, actor_name)
        self.handler = fn
        self.actor_name = actor_name
        self.queue_name = queue_name
        self.priority = priority
        self.options = options
        self._broker: dramatiq.Broker | None = None

    @property
    def broker(self) -> dramatiq.Broker:  # type: ignore[override]
        """The broker this actor sends to (bootstrapping from the configuration if needed)."""
        broker = self._broker
        if broker is None:
            app.get_broker()
            broker = self._broker
            assert broker is not None, f"{self.actor_name} was not bound by bootstrap()"
        return broker

    def message_with_options(
        self, *, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> dramatiq.Message[R]:
        """Build a message (see Dramatiq). Bootstraps first, so that a pipeline or group
        built from it finds the configured broker as Dramatiq's global one."""
        self.broker  # noqa: B018 (bootstraps when needed)
        return super().message_with_options(args=args, kwargs=kwargs, **options)

    def send_with_options(
        self,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: Any = None,
        **options: Any,
    ) -> dramatiq.Message[R]:
        """Send a message (see Dramatiq); for an actor with a unique key, a duplicate
        returns the task already queued or running (see :mod:`dramaturg.flow`)."""
        if "dramaturg_flow" not in self.options:
            return super().send_with_options(args=args, kwargs=kwargs, delay=delay, **options)
        from ..flow.control import send_with_flow

        return send_with_flow(self, super().send_with_options, args, kwargs, delay, options)

    def send_many(
        self, items: Iterable[Any], *, chunk_size: int = bulk.DEFAULT_CHUNK, **options: Any
    ) -> bulk.BulkResult:
        """Send one message per item, pipelined in chunks (see :mod:`dramaturg.bulk`)."""
        return bulk.send_many(self, items, chunk_size=chunk_size, **options)

    def _bind(self, broker: dramatiq.Broker) -> None:
        if self._broker is broker:
            return
        broker.actors.pop(self.actor_name, None)
        # Declare before publishing: a send racing this call reads ``_broker`` without a
        # lock, and must not find a broker that has no queue for this actor yet.
        broker.declare_actor(self)
        self._broker = broker

    def _unbind(self) -> None:
        self._broker = None

    @property
    def origin(self) -> str:
        """``module:qualname`` of the handler."""
        return f"{self.handler.__module__}:{self.handler.__qualname__}"


def _runner(handler: Callable[..., Any], actor_name: str) -> Callable[..., Any]:
    """Wrap ``handler`` so that outcomes and bad arguments are settled at the call.

    - ``success()`` inside the handler returns normally (Dramatiq's callbacks, pipelines
      and results see a success);
    - ``before_task`` / ``after_task`` hooks run around it (see :mod:`dramaturg.resources`);
    - arguments that do not fit the signature become ``Hold`` with a reason that says so
      (checked only after a TypeError, so the happy path pays nothing);
    - an ``async def`` handler runs on Dramatiq's event loop thread, with the worker
      thread's contextvars carried over (the task handle, the task's context, what
      restorers set): they do not cross to that thread by themselves.
    """
    if iscoroutinefunction(handler):

        async def in_context(carried: contextvars.Context, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            # This coroutine runs in an asyncio Task with a context of its own: set in it
            # what the worker thread had (the task handle, its context, restored contextvars).
            for var, value in carried.items():
                var.set(value)
            return await handler(*args, **kwargs)

        run_async = async_to_sync(in_context)

        def call(*args: Any, **kwargs: Any) -> Any:
            return run_async(contextvars.copy_context(), args, kwargs)

    else:
        call = handler

    def call_with_hooks(finished: list[bool], *args: Any, **kwargs: Any) -> Any:
        task = current_task_or_none()
        if task is None:
            return call(*args, **kwargs)
        before, after = resources.hooks_for(task.queue_name)
        for hook in before:
            hook(task)
        error: BaseException | None = None
        try:
            return call(*args, **kwargs)
        except Success:
            raise
        except BaseException as exception:
            error = exception
            raise
        finally:
            for hook in after:
                hook(task, error)
            finished[0] = True  # an interrupt landing after this point is too late

    def enter(entered: list[bool], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # An interrupt pending when this frame starts lands before the next line: the
        # handler was never called. Nothing between that line and the call can take one.
        entered[0] = True
        return call(*args, **kwargs)

    @functools.wraps(handler)
    def run(*args: Any, **kwargs: Any) -> Any:
        finished = [False]
        entered = [False]
        try:
            hooked = resources.any_hooks()
            result = call_with_hooks(finished, *args, **kwargs) if hooked else enter(entered, args, kwargs)
        except Success as outcome:
            result = outcome.value
        except INTERRUPTS as interrupt:
            # Raised once the handler (and its hooks) had returned: at the end of the call
            # that ran it (in `enter` or here, with the handler entered), or after the
            # hooks: the task finished in time. Landing here or in `enter` before the
            # handler was called, it did not: the task was interrupted, not done.
            if not (finished[0] or (entered[0] and _landed_in_wrapper(interrupt, enter.__code__))):
                raise
            result = None
        except TypeError as error:
            problem = _misfit(handler, args, kwargs)
            if problem is not None:
                raise Hold(f"arguments do not fit {actor_name}{problem}") from error
            raise
        # Disarm the deadline first thing, so a finished task is not interrupted. (Not
        # contextlib.suppress: an interrupt could land in its __enter__, outside it.)
        try:  # noqa: SIM105
            _disarm_current_deadline()
        except INTERRUPTS:
            pass  # delivered while disarming: the handler had returned
        return result

    return run


def _landed_in_wrapper(interrupt: BaseException, enter: Any) -> bool:
    """True when ``interrupt`` was raised in the frame that caught it or in one running
    the code ``enter``, not in anything they called."""
    first = tb = interrupt.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and (tb is first or tb.tb_frame.f_code is enter)


def _disarm_current_deadline() -> None:
    run = current_run()
    if run is not None and run.deadline is not None:
        run.deadline.disarm()


def _misfit(handler: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """``"(sig): why"`` when the arguments cannot bind to ``handler``'s signature, else None."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        return f"{signature.replace(return_annotation=inspect.Signature.empty)}: {error}"
    return None


class ActorDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Actor[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Actor[P, R]: ...


@overload
def actor(fn: Callable[P, Awaitable[R]]) -> Actor[P, R]: ...
@overload
def actor(fn: Callable[P, R]) -> Actor[P, R]: ...
@overload
def actor(
    *,
    actor_name: str | None = None,
    queue_name: str = "default",
    priority: int = 0,
    **options: Any,
) -> ActorDecorator: ...


def actor(
    fn: Callable[..., Any] | None = None,
    *,
    actor_name: str | None = None,
    queue_name: str = "default",
    priority: int = 0,
    **options: Any,
) -> Any:
    """Declare a function as an actor: ``@dramaturg.actor`` or ``@dramaturg.actor(...)``.

    ``actor_name`` defaults to the function's name; ``queue_name`` to ``"default"``;
    ``priority`` (0 = most urgent) orders messages a worker already holds. Any option a
    middleware of the stack declares is accepted (``max_retries``, ``min_backoff``,
    ``ttr``, ``max_age``, ...); anything else fails here, at decoration time, with the
    closest valid name, or for a Dramatiq option dramaturg replaces (``time_limit``,
    ``throws``, ``retry_when``, ``on_retry_exhausted``) what to use instead.
    """

    def decorator(fn: Callable[..., Any]) -> Actor[Any, Any]:
        name = actor_name or fn.__name__
        where = f"@actor {name!r}"
        if not isinstance(queue_name, str) or not _QUEUE_NAME.fullmatch(queue_name):
            raise ActorError(
                f"{where}: queue_name {queue_name!r} is not valid; start with a letter or '_',"
                " then letters, digits, '.', '_' or '-'"
            )
        known = known_actor_options()
        for option in options:
            if option not in known:
                hint = _RENAMED.get(option) or did_you_mean(option, known)
                raise ActorError(
                    f"{where}: unknown option {option!r}{hint}"
                    + ("" if hint else f" (options: {', '.join(sorted(known))})")
                )
        _check_option_values(where, options)
        if "limits" in options or "unique" in options:
            from ..flow.limits import check_actor_options

            check_actor_options(where, fn, options)
        declared = Actor(fn, actor_name=name, queue_name=queue_name, priority=priority, options=options)
        previous = app.registered_actor(name)
        if previous is not None and previous.origin != declared.origin:
            raise ActorError(f"{where}: the name is taken by {previous.origin}; pass actor_name= to tell them apart")
        functools.update_wrapper(declared, fn, updated=())
        app.register(declared)
        return declared

    if fn is None:
        return decorator
    return decorator(fn)


#: Dramatiq options dramaturg replaces, with the hint to give.
_RENAMED = {
    "time_limit": "; dramaturg's time limit is ttr (it moves with touch()): use ttr=",
    "throws": "; to stop retrying on an exception, hold it: use hold_on=",
    "retry_when": (
        "; decide in the handler: catch the exception and call task.retry() or task.hold(),"
        " or list the exceptions never to retry in hold_on="
    ),
    "on_retry_exhausted": (
        "; a task whose retries are used up is held (dramaturg held list/kick); to act on it,"
        " use on_failure= and check message_data['options']['retries'] > max_retries"
    ),
}


def _check_option_values(where: str, options: dict[str, Any]) -> None:
    hold_on = options.get("hold_on")
    if hold_on is not None:
        classes = hold_on if isinstance(hold_on, tuple) else (hold_on,)
        if not all(isinstance(c, type) and issubclass(c, BaseException) for c in classes):
            raise ActorError(f"{where}: hold_on must be an exception class or a tuple of them, not {hold_on!r}")
        options["hold_on"] = classes
    for name in ("max_retries", "min_backoff", "max_backoff", "ttr"):
        value = options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ActorError(f"{where}: {name} must be a whole number >= 0 (milliseconds for backoffs), not {value!r}")


@functools.cache
def _framework_actor_options() -> frozenset[str]:
    from ..middleware import framework_middleware

    # The middleware that take actor options are in the stack whatever the settings say:
    # those of the current broker serve (a worker's, read without pydantic), else the defaults.
    settings = app.current_settings_or_none()
    if settings is None:
        from ..config import Settings

        settings = Settings.model_construct()
    names: set[str] = set()
    for middleware in framework_middleware(settings):
        names |= set(middleware.actor_options)
    return frozenset(names)


def known_actor_options() -> frozenset[str]:
    """Options an actor may set: those of the current broker's middleware, else the stack's."""
    broker = app.current_broker_or_none()
    if broker is not None:
        return frozenset(broker.actor_options) | _framework_actor_options()
    return _framework_actor_options()
