"""The framework's middleware stack, one middleware per module.

:func:`framework_middleware` is the stack :func:`dramaturg.bootstrap` installs:
Dramatiq's defaults (age limit, shutdown notifications, callbacks, pipelines) with its
retries replaced by :class:`Outcomes` and its time limit by :class:`TimeToRun`, its
AsyncIO support for ``async def`` actors, and dramaturg's own (:class:`Metrics` only
when ``worker.metrics_port`` is set).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dramatiq import Middleware
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    Pipelines,
    ShutdownNotifications,
)

from ..batches.tracker import BatchTracker
from ..cancelling.watch import CancelWatch
from ..checkpoints import Checkpoints
from ..flow.control import FlowControl
from ..resources import Resources
from ..status.recorder import StatusRecorder
from ..task import RunOutcome, run_of
from ..task_context import ContextMiddleware
from ..workers.registry import WorkerRegistry
from .consumer_timeout import ConsumerTimeoutCheck
from .metrics import Metrics
from .outcomes import Outcomes
from .priority import Priority
from .recovery import RedisRecovery
from .recycle import Recycle
from .shutdown import DaemonAsyncIO, GracefulShutdown
from .ttr import TimeToRun, TimeToRunExceeded
from .worker_config import WorkerConfig

if TYPE_CHECKING:
    from ..config import Settings

__all__ = [
    "BatchTracker",
    "CancelWatch",
    "Checkpoints",
    "ConsumerTimeoutCheck",
    "FlowControl",
    "GracefulShutdown",
    "Metrics",
    "Outcomes",
    "Priority",
    "Recycle",
    "RedisRecovery",
    "StatusRecorder",
    "TimeToRun",
    "TimeToRunExceeded",
    "WorkerConfig",
    "WorkerRegistry",
    "framework_middleware",
]


def framework_middleware(settings: Settings) -> list[Middleware]:
    """A fresh instance of every middleware in the stack, configured from ``settings``."""
    broker_type = settings.broker.type or "embedded"
    retries = settings.retries
    state = settings.state
    track_state = state.enabled and bool(state.url or broker_type in {"redis", "embedded"})
    # Dramatiq runs before-hooks in this order and after-hooks in reverse.
    return [
        # First, so that its after-hook counts a task once every other one is done with it.
        Recycle(settings.worker.max_tasks_per_child, settings.worker.max_memory_mb, settings.worker.shutdown_timeout),
        # Before Outcomes, so that its after-hook sees the outcome Outcomes decided.
        *(
            [Metrics(settings.worker.metrics_port, settings.worker.metrics_host)]
            if settings.worker.metrics_port
            else []
        ),
        AgeLimit(),
        ShutdownNotifications(),
        # Before Callbacks and Pipelines: the messages they send from their after-hooks
        # still see the task's context.
        ContextMiddleware(settings.context.default, settings.context.providers, settings.context.restorers),
        OutcomeCallbacks(),
        Pipelines(),
        # Before Outcomes, so that its after-hook sees the outcome Outcomes decided.
        *([StatusRecorder(state.url, state.ttl, settings.broker.namespace)] if track_state else []),
        # Before Outcomes too: its after-hook ends a batch member once its outcome is decided,
        # before the message is acknowledged (see dramaturg.batches.writer).
        BatchTracker(state.url, settings.batch.ttl, settings.broker.namespace),
        # Before Outcomes too: its after-hook deletes the checkpoint of a task that succeeded.
        Checkpoints(state.url, settings.tasks.checkpoint_ttl, settings.broker.namespace),
        # Just before Outcomes: a task that may not start is put back before Outcomes takes it
        # as started, and its after-hook releases a unique key once Outcomes decided the end.
        FlowControl(state.url, settings.broker.namespace),
        Outcomes(max_retries=retries.max_retries, min_backoff=retries.min_backoff, max_backoff=retries.max_backoff),
        # After Outcomes, so that the deadline is armed last, just before the handler runs.
        TimeToRun(default_ms=settings.tasks.ttr, queues={name: q.ttr for name, q in settings.queues.items()}),
        # After TimeToRun: a cancelled task is interrupted through the deadline it armed, and
        # one cancelled before it ran is stopped here, with every other before-hook done.
        *([CancelWatch(state.url, state.ttl, settings.broker.namespace)] if track_state else []),
        DaemonAsyncIO(),
        GracefulShutdown(settings.worker.shutdown_timeout),
        WorkerConfig(
            broker_type, settings.broker.prefetch, settings.worker.queues, settings.worker.unknown_actor_grace
        ),
        Priority(
            broker_priorities=settings.broker.priorities and broker_type == "rabbitmq",
            lanes=settings.broker.priorities and broker_type in {"redis", "embedded"},
        ),
        *([RedisRecovery(settings.broker.heartbeat_timeout)] if broker_type in {"redis", "embedded"} else []),
        *([ConsumerTimeoutCheck(settings.broker.consumer_timeout)] if broker_type == "rabbitmq" else []),
        # Each worker's record in the state store, for dramaturg.workers() (writes nothing without one).
        WorkerRegistry(state.url, settings.broker.namespace),
        Resources(),
    ]


class OutcomeCallbacks(Callbacks):
    """Dramatiq's ``on_success``/``on_failure`` callbacks, not called for a task that was
    only released (put back untouched by a stopping worker or a suspended queue), nor for
    one that was cancelled (not a failure)."""

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        if exception is not None:
            run = run_of(message)
            if run is not None and run.outcome in (RunOutcome.RELEASED, RunOutcome.CANCELLED):
                return
        super().after_process_message(broker, message, result=result, exception=exception)  # type: ignore[no-untyped-call]
