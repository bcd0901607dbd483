"""The benchmark's tasks on RQ: ``rq worker --url URL peers-bench``.

RQ imports a job's function by its dotted path, so the tasks are ``peer_apps.work``'s
functions themselves. RQ's defaults otherwise (results kept 500 s, a job timeout of 180 s).
"""

from __future__ import annotations

import os
from typing import Any

from redis import Redis
from rq import Queue

from peer_apps import work

QUEUE = os.environ.get("BENCH_QUEUE", "peers-bench")

connection = Redis.from_url(os.environ["BENCH_URL"])
queue = Queue(QUEUE, connection=connection)


def sender(scenario: str) -> Any:
    """The function that enqueues one message of ``scenario``: ``queue.enqueue(task, arg)``."""
    task: Any = work.TASKS[scenario]

    def send(argument: Any) -> None:
        queue.enqueue(task, argument)

    return send


def close() -> None:
    connection.close()
