"""Priority: an urgent task overtakes a backlog, on RabbitMQ, Redis and embedded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq

import dramaturg

WAIT_S = 30


def test_an_urgent_task_starts_before_a_backlog_of_low_priority_tasks_is_drained(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given 1,000 low-priority tasks waiting (priority 5; 0 is the most urgent)
    order: list[str] = []
    lock = threading.Lock()
    fifty_done, urgent_done = threading.Event(), threading.Event()

    @dramaturg.actor(queue_name="reindex", priority=5)
    def reindex(kind: str, n: int) -> None:
        time.sleep(0.002)  # stands for 2 ms of work, so that the backlog lasts a while
        with lock:
            order.append(kind)
            if len(order) == 50:
                fifty_done.set()
        if kind == "urgent":
            urgent_done.set()

    for n in range(1_000):
        reindex.send("bulk", n)

    # When a worker is busy with them and an urgent task is sent
    worker = start_worker(threads=2)
    assert fifty_done.wait(WAIT_S)
    reindex.send_with_options(args=("urgent", 0), priority=0)

    # Then it runs long before the backlog is drained: ahead of everything already
    # prefetched, as soon as the worker fetches it (a poll interval on Redis, the next
    # free delivery slot on RabbitMQ)
    assert urgent_done.wait(WAIT_S)
    with lock:
        bulk_before_urgent = order.index("urgent")
    worker.stop()
    assert bulk_before_urgent < 400, f"{bulk_before_urgent} low-priority tasks ran before the urgent one"


def test_a_message_priority_overrides_its_actors(broker: dramatiq.Broker) -> None:
    @dramaturg.actor(queue_name="mail", priority=7)
    def notify(user_id: int) -> None: ...

    low = notify.send(1)
    urgent = notify.send_with_options(args=(2,), priority=0)

    if broker.settings.type == "rabbitmq":  # type: ignore[attr-defined]
        # published as RabbitMQ priorities of their bands: 0 is the highest (2)
        assert (low.options["broker_priority"], urgent.options["broker_priority"]) == (0, 2)
    else:
        # routed to the Redis lanes of their priorities
        assert (low.queue_name, urgent.queue_name) == ("mail.P2", "mail")


def test_held_tasks_are_filed_under_the_queue_not_its_lane(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    done = threading.Event()

    @dramaturg.actor(queue_name="mail", priority=7)
    def bounce(address: str) -> None:
        done.set()
        dramaturg.current_task().hold(f"{address} bounced")

    message = bounce.send("x@example.com")
    worker = start_worker()
    assert done.wait(WAIT_S)
    worker.join()

    held: Any = dramaturg.held_tasks().get(message.message_id)
    assert (held.queue_name, held.reason) == ("mail", "x@example.com bounced")
