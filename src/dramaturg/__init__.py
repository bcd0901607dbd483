"""dramaturg: reliable background work on Dramatiq.

::

    import dramaturg

    @dramaturg.actor(queue_name="emails")
    def send_welcome(user_id: int) -> None: ...

    send_welcome.send(42)          # the broker comes from dramaturg.toml / DRAMATURG_*

Run workers with ``dramaturg worker`` or ``dramatiq dramaturg.worker``.
"""

from __future__ import annotations

import typing

from .__about__ import __version__
from .actors import Actor, actor
from .app import bootstrap, get_broker, shutdown
from .batches import Batch, BatchStatus, batch, batch_status, batches
from .bulk import Call
from .cancelling import BatchCancellation, Cancellation, cancel, cancel_batch
from .drain import DrainSummary, drain
from .errors import (
    ActorError,
    BatchNotFound,
    BatchSendError,
    BrokerNotInstalled,
    BrokerUnreachable,
    BulkSendError,
    BulkSendInterrupted,
    ConfigError,
    ContextError,
    DramaturgError,
    DuplicateTask,
    FlowSendError,
    KickError,
    LockLost,
    LockTimeout,
    NotInTask,
    QueueInUse,
    QueueNotFound,
    SendError,
    StateUnavailable,
    TaskHeld,
    TaskNotFound,
)
from .flow import Lock, concurrency, lock, locked, rate, unique
from .held import HeldMatches, HeldStore, HeldTask, held_tasks
from .queue_admin import DeletedQueue, WaitingTask, delete_queue, peek_queue, purge_queue
from .resources import Resource, after_task, before_task, close_resources, resource
from .schedules import periodic
from .stats import QueueStats, queue_stats
from .status import TaskStatus, task_status
from .task import Hold, Retry, Success, SuspendQueue, Task, TaskOutcome, current_task
from .task_context import bind_contextvar, context, context_provider, context_restorer, current_context
from .workers import WorkerInfo, workers

if typing.TYPE_CHECKING:
    from .config import BrokerSettings, RetrySettings, Settings, WorkerSettings, load_settings

#: Names of :mod:`dramaturg.config`, imported on first use: the settings models bring in
#: pydantic (~10 MB), which worker processes do without (see :mod:`dramaturg.settings_data`).
_FROM_CONFIG = frozenset({"BrokerSettings", "RetrySettings", "Settings", "WorkerSettings", "load_settings"})


__all__ = [
    "Actor",
    "ActorError",
    "Batch",
    "BatchCancellation",
    "BatchNotFound",
    "BatchSendError",
    "BatchStatus",
    "BrokerNotInstalled",
    "BrokerSettings",
    "BrokerUnreachable",
    "BulkSendError",
    "BulkSendInterrupted",
    "Call",
    "Cancellation",
    "ConfigError",
    "ContextError",
    "DeletedQueue",
    "DrainSummary",
    "DramaturgError",
    "DuplicateTask",
    "FlowSendError",
    "HeldMatches",
    "HeldStore",
    "HeldTask",
    "Hold",
    "KickError",
    "Lock",
    "LockLost",
    "LockTimeout",
    "NotInTask",
    "QueueInUse",
    "QueueNotFound",
    "QueueStats",
    "Resource",
    "Retry",
    "RetrySettings",
    "SendError",
    "Settings",
    "StateUnavailable",
    "Success",
    "SuspendQueue",
    "Task",
    "TaskHeld",
    "TaskNotFound",
    "TaskOutcome",
    "TaskStatus",
    "WaitingTask",
    "WorkerInfo",
    "WorkerSettings",
    "__version__",
    "actor",
    "after_task",
    "batch",
    "batch_status",
    "batches",
    "before_task",
    "bind_contextvar",
    "bootstrap",
    "cancel",
    "cancel_batch",
    "close_resources",
    "concurrency",
    "context",
    "context_provider",
    "context_restorer",
    "current_context",
    "current_task",
    "delete_queue",
    "drain",
    "echo",
    "get_broker",
    "held_tasks",
    "load_settings",
    "lock",
    "locked",
    "peek_queue",
    "periodic",
    "purge_queue",
    "queue_stats",
    "rate",
    "resource",
    "shutdown",
    "task_status",
    "unique",
    "workers",
]


def __getattr__(name: str) -> object:
    if name in _FROM_CONFIG:
        from . import config

        value: object = getattr(config, name)
        globals()[name] = value
        return value
    # The built-in echo actor is declared only when asked for, so that an application's
    # workers do not consume its queue (idle queues cost workers CPU; see worker.py).
    if name == "echo":
        from .actors.builtin import echo

        return echo
    raise AttributeError(f"module 'dramaturg' has no attribute {name!r}")
