"""A message as the worker gets it holds its fields as attributes of its own.

Dramatiq's ``MessageProxy`` finds them through ``__getattr__``, after a failed lookup that
on Python 3.11 builds an ``AttributeError`` each time (:mod:`dramaturg.brokers.proxy`).
What a middleware and a handler see must not change: the same values, the same
``options`` dict (what a middleware writes there is the message's), the message's methods,
and an ``AttributeError`` for a name the message does not have. On each real broker, and
in eager mode.
"""

from __future__ import annotations

from typing import Any

import dramatiq

import dramaturg
from tests.conftest import Runs

FIELDS = ("queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp")


class Looking(dramatiq.Middleware):
    """Records what the worker's message is like when it is about to run."""

    def __init__(self, runs: Runs) -> None:
        self.runs = runs

    def before_process_message(self, broker: Any, message: Any) -> None:
        inner = message._message
        try:
            message.no_such_field  # noqa: B018
            missing = "no error"
        except AttributeError as error:
            missing = str(error)
        self.runs.record(
            own=[name for name in FIELDS if name in vars(message)],
            same=all(getattr(message, name) is getattr(inner, name) for name in FIELDS),
            copy_id=message.copy().message_id == inner.message_id,
            missing=missing,
        )


def test_the_worker_gets_a_message_with_its_fields_as_its_own(broker: dramatiq.Broker, start_worker: Any) -> None:
    runs = Runs()
    broker.add_middleware(Looking(runs))

    @dramaturg.actor(queue_name="proxy")
    def look() -> None:
        pass

    # When a message is sent and a worker takes it
    look.send()
    start_worker(threads=1)
    (seen,) = runs.wait(1)

    # Then its fields are the proxy's own, the message's very objects; its methods still
    # work, and a name it does not have is still an AttributeError
    assert seen == {
        "own": list(FIELDS),
        "same": True,
        "copy_id": True,
        "missing": "'Message' object has no attribute 'no_such_field'",
    }


def test_eager_mode_runs_it_with_its_fields_as_its_own() -> None:
    runs = Runs()
    broker = dramaturg.bootstrap(dramaturg.Settings(broker={"type": "eager"}))
    try:
        broker.add_middleware(Looking(runs))

        @dramaturg.actor(queue_name="proxy")
        def look() -> None:
            pass

        look.send()
        assert runs.seen == [
            {
                "own": list(FIELDS),
                "same": True,
                "copy_id": True,
                "missing": "'Message' object has no attribute 'no_such_field'",
            }
        ]
    finally:
        dramaturg.shutdown()
