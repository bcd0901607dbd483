"""Eager mode: the queue switched off. ``send()`` runs the task inline, in the caller.

For adopting a queue gradually (``broker.type = "eager"`` today, ``"redis"`` when the
workers are in place: a configuration change only) and for tests. The task runs with
the same middleware as on a worker: its context, its ttr (the caller's thread is
interrupted when it passes), and the same outcomes:

- a normal return, or ``success()``: ``send()`` returns the message;
- a failure or ``retry()``: run again at once (the backoff is not waited for, the
  caller is waiting), up to ``max_retries``;
- ``hold()``, an exception in ``hold_on``, or retries used up: the task is kept in the
  held store (``dramaturg.held_tasks()``, in memory) and ``send()`` raises
  :class:`dramaturg.TaskHeld` with the reason, so nothing is lost silently.

Tasks sent from inside a handler (follow-ups, retries, pipelines) run after it, in the
order sent, before the outer ``send()`` returns. Delays are not waited for either. There
is nothing to consume: a worker on an eager broker is refused.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from dramatiq import Consumer, Message, Middleware
from dramatiq.asyncio import EventLoopThread, get_event_loop_thread, set_event_loop_thread
from dramatiq.broker import MessageProxy
from dramatiq.middleware import SkipMessage

from ..errors import DramaturgError, TaskHeld
from ..held import HeldTask
from ..task import outcome_of
from .proxy import with_fields
from .stub import StubBroker

if TYPE_CHECKING:
    from ..config import BrokerSettings

__all__ = ["EagerBroker", "create_broker", "ping"]

logger = logging.getLogger("dramaturg.eager")

NO_WORKERS = (
    "the eager broker has no queue to consume: tasks run inline when they are sent;"
    " set broker.type (or broker.url) to a real broker to run workers"
)


class EagerBroker(StubBroker):
    """A broker whose ``enqueue`` runs the message through the middleware and its actor."""

    #: Outcomes holds a task that suspends its queue instead (there is no queue to leave alone).
    runs_inline = True

    def __init__(self, settings: BrokerSettings, *, middleware: list[Middleware]) -> None:
        super().__init__(settings, middleware=middleware)
        self._local = threading.local()

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        self.emit_before("enqueue", message, delay)
        self.emit_after("enqueue", message, delay)
        pending: deque[Message[Any]] | None = getattr(self._local, "pending", None)
        if pending is not None:
            pending.append(message)  # sent from inside a task: runs after it
            return message
        self._local.pending = pending = deque([message])
        held: list[HeldTask] = []
        try:
            while pending:
                task = self._run(pending.popleft())
                if task is not None:
                    held.append(task)
        finally:
            del self._local.pending
        if held:
            first = held[0]
            raise TaskHeld(first.reason, first)
        return message

    def _run(self, message: Message[Any]) -> HeldTask | None:
        """Process one message as a worker thread would; the held task, if it was held."""
        proxy = with_fields(MessageProxy(message))
        _ensure_event_loop()  # async def handlers run on Dramatiq's loop thread, started by workers elsewhere
        try:
            self.emit_before("process_message", proxy)
            actor = self.get_actor(message.actor_name)
            result = actor(*message.args, **message.kwargs)
            self.emit_after("process_message", proxy, result=result)
        except SkipMessage:
            self.emit_after("skip_message", proxy)
        except BaseException as exception:
            proxy.stuff_exception(exception)
            self.emit_after("process_message", proxy, exception=exception)
            if outcome_of(proxy) == "rejected" or proxy.failed:
                raise
        finally:
            proxy.clear_exception()
        if outcome_of(proxy) == "held":
            return self.held.get(message.message_id)
        return None

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        if signal == "worker_boot":
            raise DramaturgError(NO_WORKERS)
        super().emit_before(signal, *args, **kwargs)

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 100) -> Consumer:
        raise DramaturgError(NO_WORKERS)

    def __repr__(self) -> str:
        return "<EagerBroker>"


_loop_lock = threading.Lock()


def _ensure_event_loop() -> None:
    if get_event_loop_thread() is not None:
        return
    with _loop_lock:
        if get_event_loop_thread() is None:
            loop_thread = EventLoopThread(logger)
            loop_thread.daemon = True
            loop_thread.start(timeout=1.0)
            set_event_loop_thread(loop_thread)


def create_broker(settings: BrokerSettings, middleware: list[Middleware]) -> EagerBroker:
    return EagerBroker(settings, middleware=middleware)


def ping(settings: BrokerSettings) -> float:
    return 0.0
