"""``dramaturg held kick`` with a kicker paused past its lease (SIGSTOP, a long GC, a VM
stall) while a second kick runs: every held task is queued once, never twice (issue 12,
item 5).

The lease: on Redis and embedded a kick's taken tasks go back to the held store after
``STALE_KICK_MS`` (60 s); on RabbitMQ they go back when the server drops the paused
kicker's connection for missed heartbeats (2 s heartbeats here). The bounded run does
not wait a minute on Redis: it moves the paused kick's start back past the lease in the
held store instead (the full run waits the real lease).
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Callable

import pytest

from dramaturg.held import HeldTask

from ..conftest import bin_path, poll_until, run_cli
from .conftest import FULL, Scale
from .harness import QUEUE, REPO, Chaos

pytestmark = pytest.mark.chaos


def queued_count(scenario: Chaos) -> int:
    if scenario.broker_kind == "rabbitmq":
        return scenario._rabbitmq_count(QUEUE)
    client, namespace = scenario.inspector.client, scenario.inspector.namespace
    return int(client.llen(f"{namespace}:{QUEUE}"))


def expire_kick_lease(scenario: Chaos) -> None:
    """Let the paused kicker's lease run out: wait for it (full run, RabbitMQ), or move the
    start of its kick back past the lease (bounded run, Redis and embedded)."""
    store = scenario.inspector.held
    if scenario.broker_kind == "rabbitmq":
        # RabbitMQ gives the kicker's unacknowledged tasks back once it drops its connection.
        poll_until(lambda: store.count(QUEUE) > 0, "the paused kicker's tasks back in the held store", 60)
        return
    from dramaturg.brokers import redis as redis_broker

    lease_s = redis_broker.STALE_KICK_MS / 1000
    if FULL:
        time.sleep(lease_s + 1)  # the real lease
        return
    key = f"{store.prefix}:{QUEUE}#kicking-order"
    taken = store.client.zrange(key, 0, -1)
    assert taken, f"the paused kick holds no lease in {key}; has the held store's layout changed?"
    past = int(time.time() * 1000) - redis_broker.STALE_KICK_MS - 1_000
    store.client.zadd(key, dict.fromkeys(taken, past))


@pytest.mark.parametrize("broker_kind", ["rabbitmq", "redis", "embedded"])
def test_a_kicker_paused_past_its_lease_while_another_kicks(
    chaos: Callable[[str], Chaos], scale: Scale, run: int, broker_kind: str, tmp_path: object
) -> None:
    # Given many held tasks
    scenario = chaos("kicker paused past its lease")
    store = scenario.inspector.held
    now = int(time.time() * 1000)
    if broker_kind == "rabbitmq":
        scenario.sender.declare_queue(QUEUE, ensure=True)
    for n in range(scale.held):
        message_id = str(uuid.uuid4())
        store.hold(
            HeldTask(
                message_id=message_id,
                queue_name=QUEUE,
                actor_name="work",
                args=[n, 0.01],
                kwargs={},
                reason="held for the kick test",
                attempts=1,
                enqueued_at=now,
                held_at=now + n,
                host=socket.gethostname(),
                pid=os.getpid(),
            )
        )
        scenario.sent.append(message_id)
    assert store.count(QUEUE) == scale.held

    # When a kick of them all is paused (SIGSTOP) half-way, past its lease, and meanwhile
    # a second kick runs to its end, and then the first one goes on
    kick = [bin_path("dramaturg"), "held", "kick", QUEUE, "--all"]
    first = scenario.spawn(kick, cwd=scenario.tmp_path, PYTHONPATH=str(REPO))
    while queued_count(scenario) == 0 and first.popen.poll() is None:
        pass  # catch it in the act: a tight loop, the kick takes well under a second
    paused_at = time.time()
    os.kill(first.popen.pid, signal.SIGSTOP)
    try:
        moved_before_pause = queued_count(scenario)
        assert 0 < moved_before_pause < scale.held, f"paused after {moved_before_pause} of {scale.held}: too late"
        expire_kick_lease(scenario)
        second = run_cli(kick, cwd=scenario.tmp_path, timeout=120, PYTHONPATH=str(REPO))
        scenario.notes.append(f"first kick paused after {moved_before_pause}; second: {second.stdout.strip()}")
    finally:
        os.kill(first.popen.pid, signal.SIGCONT)
    scenario.fault(paused_at, time.time(), scope=[first.popen.pid])
    first.popen.wait(timeout=120)
    scenario.notes.append(f"first kick exited {first.popen.returncode}: {first.output.strip()[-300:]}")

    # Then every held task is on the queue exactly once, or still held; none twice
    row = scenario.count()
    scenario.finish(row)
