"""Every kind of poison message put straight onto the broker, ahead of normal tasks: each is
held with a reason naming what is wrong with it, the worker goes on, and no normal task
runs twice because of it (issue 12, items 1 and 2)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import Scale
from .harness import QUEUE, Chaos

pytestmark = pytest.mark.chaos

#: How many copies of the message for another queue (item 2: each one killed a worker
#: thread for good, and the worker has four).
MISPLACED = 8


def envelope(message_id: str, **changes: Any) -> dict[str, Any]:
    """A well-formed message of the chaos ``work`` actor, with ``changes`` applied
    (``options__x`` sets option ``x``)."""
    message: dict[str, Any] = {
        "queue_name": QUEUE,
        "actor_name": "work",
        "args": [0, 0.01],
        "kwargs": {},
        "options": {},
        "message_id": message_id,
        "message_timestamp": int(time.time() * 1000),
    }
    for key, value in changes.items():
        if key.startswith("options__"):
            message["options"][key.removeprefix("options__")] = value
        else:
            message[key] = value
    return message


#: (kind, the word its held reason must name, changes, queue suffix it is put on)
POISON: list[tuple[str, str, dict[str, Any], str]] = [
    ("options is 5", "options", {"options": 5}, ""),
    ("options.priority is 'high'", "priority", {"options__priority": "high"}, ""),
    ("options.ttr is 'abc'", "ttr", {"options__ttr": "abc"}, ""),
    ("options.retries is 'x'", "retries", {"options__retries": "x"}, ""),
    ("options.max_retries is 'x'", "max_retries", {"options__max_retries": "x"}, ""),
    ("options.eta is 'soon' (delay queue)", "eta", {"options__eta": "soon"}, ".DQ"),
    ("options.dramaturg_context is 5", "context", {"options__dramaturg_context": 5}, ""),
    ("args is a string", "args", {"args": "0, 0.01"}, ""),
    ("kwargs is a list", "kwargs", {"kwargs": [1]}, ""),
    ("actor_name is 5", "actor_name", {"actor_name": 5}, ""),
    ("message_timestamp is 'yesterday'", "message_timestamp", {"message_timestamp": "yesterday"}, ""),
    ("unknown actor", "actor", {"actor_name": "no_such_actor"}, ""),
    *[(f"queue_name differs ({n + 1})", "queue_name", {"queue_name": "elsewhere"}, "") for n in range(MISPLACED)],
]


def put_raw(scenario: Chaos, queue: str, message_id: str, body: bytes) -> None:
    """Put ``body`` on ``queue`` as another client would, bypassing dramaturg."""
    inspector = scenario.inspector
    if scenario.broker_kind == "rabbitmq":
        import pika

        scenario.sender.declare_queue(QUEUE, ensure=True)  # the queue as dramaturg declares it, .DQ included
        connection = pika.BlockingConnection(inspector.parameters)
        try:
            connection.channel().basic_publish(
                "", queue, body, pika.BasicProperties(delivery_mode=2, message_id=message_id)
            )
        finally:
            connection.close()
        return
    key = f"{inspector.namespace}:{queue}"
    inspector.client.hset(f"{key}.msgs", message_id, body)
    inspector.client.rpush(key, message_id)


@pytest.mark.parametrize("broker_kind", ["rabbitmq", "redis", "embedded"])
def test_every_kind_of_poison_message_is_held_and_the_worker_goes_on(
    chaos: Callable[[str], Chaos], scale: Scale, run: int, broker_kind: str
) -> None:
    # Given every kind of poison message on the queue (and its delay queue), an
    # undecodable body among them, ahead of a burst of normal tasks
    scenario = chaos("poison messages")
    poison: dict[str, tuple[str, str]] = {}
    for kind, field, changes, suffix in POISON:
        message_id = str(uuid.uuid4())
        put_raw(scenario, QUEUE + suffix, message_id, json.dumps(envelope(message_id, **changes)).encode())
        poison[message_id] = (kind, field)
    undecodable = str(uuid.uuid4())
    put_raw(scenario, QUEUE, undecodable, b"\xff{not json")
    poison[undecodable] = ("undecodable body", "undecodable")
    scenario.send(scale.tasks // 2, 0.01)
    scenario.sent += list(poison)

    # When one worker with four threads takes them (a task for an actor it does not
    # know is given back for a grace, then held: 2 s here instead of 5 minutes)
    scenario.start_worker(DRAMATURG_WORKER_UNKNOWN_ACTOR_GRACE="2s")
    scenario.settle(scale.settle_s)

    # Then every normal task ran exactly once, and every poison message is held, with a
    # reason that names what is wrong with it
    row = scenario.count()
    held = {task.message_id: task for task in scenario.inspector.held.list(QUEUE, limit=10_000)}
    wrong = [
        f"{kind}: " + (f"held as {held[message_id].reason!r}" if message_id in held else "not held")
        for message_id, (kind, field) in poison.items()
        if message_id not in held or field not in held[message_id].reason
    ]
    row.problems += wrong
    scenario.finish(row)
