"""The broker restarted in the middle of a run: this suite's own RabbitMQ node stopped and
started, its own Redis killed (``kill -9``) and started from its append-only file
(``appendfsync always``). Senders and workers reconnect by themselves, and every task
whose send returned is there afterwards."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from .conftest import RabbitmqNode, RedisServer, Scale
from .harness import Chaos
from .test_processes import task_length

pytestmark = pytest.mark.chaos


@pytest.mark.parametrize("broker_kind", ["rabbitmq", "redis"])
def test_broker_restarted_mid_run(
    chaos: Callable[[str], Chaos], scale: Scale, run: int, broker_kind: str, request: pytest.FixtureRequest
) -> None:
    server: RabbitmqNode | RedisServer = request.getfixturevalue(
        "chaos_rabbitmq" if broker_kind == "rabbitmq" else "chaos_redis"
    )
    # Given two worker groups, a burst of tasks, and a sender that keeps sending
    scenario = chaos("broker restarted")
    scenario.start_workers(2)
    scenario.send(scale.tasks, task_length)
    sender = scenario.keep_sending(every_s=0.05)
    scenario.wait_for_ends(scale.tasks // 4, timeout=scale.settle_s)

    # When the broker stops (RabbitMQ: rabbitmqctl stop; Redis: kill -9) and starts again
    began = time.time()
    server.stop()
    boot_s = server.start()
    scenario.fault(began, time.time())
    scenario.notes.append(f"down {time.time() - began:.1f} s (boot {boot_s:.1f} s)")

    # Then everyone reconnects by themselves: what was sent before, during (if the send
    # returned) and after the restart all succeeds
    scenario.wait_for_ends(len(scenario.sent) * 3 // 4, timeout=scale.settle_s)
    sender.stop()
    scenario.settle(scale.settle_s)
    scenario.stop_workers()
    # RabbitMQ closes the connections some time into `rabbitmqctl stop`, later than
    # `began`: a worker process is hit when it logs that it lost its channel, and what it
    # was running then is what may run again.
    for pid, at in scenario.noticed("lost the channel", since=began).items():
        scenario.fault(at, scope=[pid])
    scenario.finish(scenario.count())
