"""Shared per-worker resources, and set-up/tear-down around each task.

Tasks of a queue often share something expensive: a database connection pool, an HTTP
session, a loaded model. Declare it once::

    @dramaturg.resource
    def http() -> Iterator[requests.Session]:
        session = requests.Session()
        yield session                 # what tasks get
        session.close()               # at worker shutdown

    @dramaturg.actor(queue_name="fetch")
    def fetch(url: str) -> None:
        http().get(url)               # created on first use in this process, then shared

A resource is created lazily, on first use in each worker process: never at import,
never in a process that only sends. Creation is locked, so threads racing for it get
one instance; the instance itself is shared by the process's threads, so it must be
thread-safe (a pool, a session). For things that are not (an sqlite3 connection),
``@dramaturg.resource(per_thread=True)`` gives each thread its own. At worker shutdown
each is torn down (the code after ``yield``, or nothing for a plain function), a
per-thread one in its own thread; a forked child creates its own instead of using its
parent's.

Around every task, or every task of some queues::

    @dramaturg.before_task(queues=["imports"])
    def open_transaction(task: dramaturg.Task) -> None: ...

    @dramaturg.after_task(queues=["imports"])
    def close_transaction(task: dramaturg.Task, error: BaseException | None) -> None: ...

Both run in the task's thread, inside its ttr and its context; ``after_task`` runs also
when the handler failed (``error`` says how). An exception in either is the task's
failure (retried or held as usual): a transaction that cannot be committed fails it.

The memory rule: whatever a task loads it must let go of. Memory a task keeps (a cache
that only grows, rows held in a module-level list) stays with the worker process until
it exits; keep it in a resource with a bound, or set ``worker.max_tasks_per_child`` /
``worker.max_memory_mb`` so that a worker that grows anyway starts afresh.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar, overload

import dramatiq

__all__ = ["Resource", "Resources", "after_task", "before_task", "close_resources", "resource"]

logger = logging.getLogger("dramaturg.resources")

T = TypeVar("T")
_registry: list[Resource[Any]] = []
_before: list[tuple[frozenset[str] | None, Callable[..., Any]]] = []
_after: list[tuple[frozenset[str] | None, Callable[..., Any]]] = []


class Resource(Generic[T]):
    """A lazily created, per-process (or per-thread) shared object; call it to get it."""

    def __init__(self, factory: Callable[[], T | Iterator[T]], *, per_thread: bool = False) -> None:
        self.factory = factory
        self.per_thread = per_thread
        self.name = f"{factory.__module__}.{factory.__qualname__}"
        self._lock = threading.RLock()  # _make takes it too, inside __call__'s
        self._shared: tuple[T, Iterator[T] | None] | None = None
        self._local = threading.local()
        self._made: list[tuple[T, Iterator[T] | None]] = []  # every instance, for closing

    def __call__(self) -> T:
        if self.per_thread:
            made = getattr(self._local, "made", None)
            if made is None:
                made = self._local.made = self._make()
            return made[0]
        shared = self._shared
        if shared is None:
            with self._lock:
                if self._shared is None:
                    self._shared = self._make()
                shared = self._shared
        return shared[0]

    def _make(self) -> tuple[T, Iterator[T] | None]:
        produced: Any = self.factory()
        generator: Any = produced if inspect.isgenerator(produced) else None
        made: tuple[T, Iterator[T] | None] = (next(produced), generator) if generator else (produced, None)
        with self._lock:
            self._made.append(made)
        logger.debug("resource %s created in process %d", self.name, os.getpid())
        return made

    def _forget(self) -> None:
        """In a forked child: the parent's instances (and lock) are not ours to use."""
        self._lock = threading.RLock()
        self._shared = None
        self._local = threading.local()
        self._made = []

    def close_this_thread(self) -> None:
        """Tear down the calling thread's instance (per-thread resources), in that thread."""
        made = getattr(self._local, "made", None)
        if made is None:
            return
        del self._local.made
        with self._lock:
            self._made = [other for other in self._made if other is not made]
        _teardown(self.name, made[1])

    def close(self) -> None:
        """Tear down every instance this process made (the code after ``yield``)."""
        with self._lock:
            made, self._made = self._made, []
            self._shared = None
            self._local = threading.local()
        for _, generator in made:
            _teardown(self.name, generator)

    def __repr__(self) -> str:
        return f"<Resource {self.name}{' per thread' if self.per_thread else ''}>"


@overload
def resource(factory: Callable[[], Iterator[T]], /) -> Resource[T]: ...
@overload
def resource(factory: Callable[[], T], /) -> Resource[T]: ...
@overload
def resource(*, per_thread: bool = False) -> Callable[[Callable[[], Any]], Resource[Any]]: ...
def resource(factory: Callable[[], Any] | None = None, /, *, per_thread: bool = False) -> Any:
    """Declare a shared resource (see the module docstring)."""

    def declare(fn: Callable[[], Any]) -> Resource[Any]:
        declared: Resource[Any] = Resource(fn, per_thread=per_thread)
        _registry.append(declared)
        return declared

    return declare(factory) if factory is not None else declare


def _teardown(name: str, generator: Iterator[Any] | None) -> None:
    if generator is None:
        return
    try:
        next(generator)
    except StopIteration:
        pass
    except Exception:
        logger.exception("closing resource %s failed", name)
    else:
        logger.warning("resource %s yielded more than once; its teardown stops at the second yield", name)


def _after_fork_in_child() -> None:
    for declared in _registry:
        declared._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


def close_resources() -> None:
    """Tear down every resource this process created (done at worker shutdown)."""
    for declared in reversed(_registry):
        declared.close()


def _hook(
    hooks: list[tuple[frozenset[str] | None, Callable[..., Any]]], fn: Callable[..., Any] | None, queues: Any
) -> Any:
    def register(hook: Callable[..., Any]) -> Callable[..., Any]:
        hooks.append((frozenset(queues) if queues is not None else None, hook))
        return hook

    return register(fn) if fn is not None else register


def before_task(fn: Callable[..., Any] | None = None, /, *, queues: Sequence[str] | None = None) -> Any:
    """Run ``fn(task)`` before each task (of ``queues``, when given)."""
    return _hook(_before, fn, queues)


def after_task(fn: Callable[..., Any] | None = None, /, *, queues: Sequence[str] | None = None) -> Any:
    """Run ``fn(task, error)`` after each task (of ``queues``), also when it failed."""
    return _hook(_after, fn, queues)


def hooks_for(queue: str) -> tuple[list[Callable[..., Any]], list[Callable[..., Any]]]:
    """The before and after hooks that apply to ``queue``."""
    return _matching(_before, queue), _matching(_after, queue)


def _matching(hooks: Iterable[tuple[frozenset[str] | None, Callable[..., Any]]], queue: str) -> list[Any]:
    return [hook for queues, hook in hooks if queues is None or queue in queues]


def any_hooks() -> bool:
    return bool(_before or _after)


class Resources(dramatiq.Middleware):
    """Tears the process's resources down when its worker shuts down: per-thread ones in
    their own thread as it stops (an sqlite3 connection may only be closed there), the
    rest after the worker stopped."""

    def before_worker_thread_shutdown(self, broker: dramatiq.Broker, thread: Any) -> None:
        for declared in _registry:
            if declared.per_thread:
                declared.close_this_thread()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        close_resources()
