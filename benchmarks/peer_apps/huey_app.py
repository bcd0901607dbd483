"""The benchmark's tasks on Huey: ``huey_consumer peer_apps.huey_app.huey -k thread -w 8``.

Huey's defaults otherwise: a Redis list per queue, no acknowledgements (a task popped by
a consumer that dies is lost), results of tasks returning ``None`` not stored.
"""

from __future__ import annotations

import os
from typing import Any

from huey import RedisHuey

from peer_apps import work

huey = RedisHuey(os.environ.get("BENCH_QUEUE", "peers-bench"), url=os.environ["BENCH_URL"])


@huey.task(name="peers.noop")  # type: ignore[untyped-decorator]
def noop(number: int) -> None:
    work.noop(number)


@huey.task(name="peers.sleep")  # type: ignore[untyped-decorator]
def sleep_10ms(number: int) -> None:
    work.sleep_10ms(number)


@huey.task(name="peers.import_user")  # type: ignore[untyped-decorator]
def import_user(row: dict[str, Any]) -> None:
    work.import_user(row)


TASKS = {"noop": noop, "sleep": sleep_10ms, "import": import_user}


def sender(scenario: str) -> Any:
    """The function that enqueues one message of ``scenario``: calling the task."""
    return TASKS[scenario]


def close() -> None:
    pass
