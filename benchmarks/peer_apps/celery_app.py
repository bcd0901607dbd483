"""The benchmark's tasks on Celery: ``celery -A peer_apps.celery_app worker``.

Celery's defaults otherwise (prefetch multiplier 4, acks on receipt); results are not
stored (the tasks return nothing), and the worker runs without gossip, mingle, heartbeat
and remote control, which add broker traffic (and queues) unrelated to the tasks.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from peer_apps import work

QUEUE = os.environ.get("BENCH_QUEUE", "peers-bench")

app = Celery("peers", broker=os.environ["BENCH_URL"])
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    worker_enable_remote_control=False,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="peers.noop")  # type: ignore[untyped-decorator]
def noop(number: int) -> None:
    work.noop(number)


@app.task(name="peers.sleep")  # type: ignore[untyped-decorator]
def sleep_10ms(number: int) -> None:
    work.sleep_10ms(number)


@app.task(name="peers.import_user")  # type: ignore[untyped-decorator]
def import_user(row: dict[str, Any]) -> None:
    work.import_user(row)


TASKS = {"noop": noop, "sleep": sleep_10ms, "import": import_user}


def sender(scenario: str) -> Any:
    """The function that enqueues one message of ``scenario``: the task's ``delay``."""
    return TASKS[scenario].delay


def close() -> None:
    app.close()
