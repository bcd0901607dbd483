"""Poison messages put straight onto the broker, on RabbitMQ, Redis and embedded.

A message another client (or a broken producer) put on a queue may be decodable JSON
and still not a message this worker can run: a field of the wrong type, a queue name
that is not the queue it came from, an actor this worker does not know. Each one is
held (or, for an unknown actor, given back for a while), acknowledged, and the worker
goes on: no other task runs again because of it, and none is stranded.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg.durations import parse_ms
from dramaturg.envelope import decode
from dramaturg.held import HeldTask

from .conftest import WAIT_S, pending_messages, poll_until, raw_publish


class Held:
    """The tasks the broker's held store was given in this process; ``wait(n)`` blocks until ``n``."""

    def __init__(self, broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tasks: list[HeldTask] = []
        self._changed = threading.Condition()
        store = broker.held
        real_hold = store.hold

        def hold(task: HeldTask) -> None:
            real_hold(task)
            with self._changed:
                self.tasks.append(task)
                self._changed.notify_all()

        monkeypatch.setattr(store, "hold", hold)

    def wait(self, count: int, timeout: float = WAIT_S) -> list[HeldTask]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.tasks) >= count, timeout), (
                f"held only {[t.reason for t in self.tasks]}"
            )
            return list(self.tasks)


class LogWatch(logging.Handler):
    """Records the lines of one logger; ``wait(text)`` blocks until a line contains ``text``."""

    def __init__(self, logger: str) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []
        self._changed = threading.Condition()
        self.logger = logging.getLogger(logger)

    def emit(self, record: logging.LogRecord) -> None:
        with self._changed:
            self.lines.append((record.levelno, record.getMessage()))
            self._changed.notify_all()

    def wait(self, text: str, timeout: float = WAIT_S) -> str:
        def found() -> str | None:
            return next((line for _, line in self.lines if text in line), None)

        with self._changed:
            assert self._changed.wait_for(lambda: found() is not None, timeout), f"no line with {text!r}: {self.lines}"
            line = found()
            assert line is not None
            return line


@pytest.fixture
def unknown_actor_grace() -> str:
    return "5m"


@pytest.fixture
def settings(settings: dramaturg.Settings, unknown_actor_grace: str) -> dramaturg.Settings:
    """The broker's settings, with ``worker.unknown_actor_grace`` as the test says."""
    worker = settings.worker.model_copy(update={"unknown_actor_grace": parse_ms(unknown_actor_grace)})
    return settings.model_copy(update={"worker": worker})


@pytest.fixture
def held(broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch) -> Held:
    return Held(broker, monkeypatch)


@pytest.fixture
def watch() -> Iterator[Callable[[str], LogWatch]]:
    watches: list[LogWatch] = []

    def start(logger: str) -> LogWatch:
        handler = LogWatch(logger)
        handler.logger.addHandler(handler)
        watches.append(handler)
        return handler

    yield start
    for handler in watches:
        handler.logger.removeHandler(handler)


def envelope(*, options: Any = None, **fields: Any) -> dict[str, Any]:
    """A well-formed message for ``import_user`` on ``imports`` (id 0), changed as told."""
    message: dict[str, Any] = {
        "queue_name": "imports",
        "actor_name": "import_user",
        "args": [{"id": 0}],
        "kwargs": {},
        "options": {},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": int(time.time() * 1000),
    }
    if options is not None:
        message["options"] = options
    message.update(fields)
    return message


def without(name: str) -> dict[str, Any]:
    message = envelope()
    del message[name]
    return message


#: (the field the reason names, the message); each is held, never run.
POISON = {
    "options-is-a-number": ("options", envelope(options=5)),
    "priority-is-a-word": ("options.priority", envelope(options={"priority": "high"})),
    "priority-is-a-list": ("options.priority", envelope(options={"priority": [1]})),
    "eta-is-a-word": ("options.eta", envelope(options={"eta": "soon"})),
    "eta-is-infinite": ("options.eta", envelope(options={"eta": float("inf")})),
    "ttr-is-a-word": ("options.ttr", envelope(options={"ttr": "ten minutes"})),
    "ttr-is-negative": ("options.ttr", envelope(options={"ttr": -5})),
    "retries-is-a-word": ("options.retries", envelope(options={"retries": "many"})),
    "max_retries-is-a-list": ("options.max_retries", envelope(options={"max_retries": [3]})),
    "min_backoff-is-a-word": ("options.min_backoff", envelope(options={"min_backoff": "1s"})),
    "max_backoff-is-an-object": ("options.max_backoff", envelope(options={"max_backoff": {}})),
    "max_age-is-a-word": ("options.max_age", envelope(options={"max_age": "old"})),
    "context-is-a-string": ("options.dramaturg_context", envelope(options={"dramaturg_context": "shop-1"})),
    "kicks-is-a-word": ("options.dramaturg_kicks", envelope(options={"dramaturg_kicks": "2"})),
    "redis-id-is-a-number": ("options.redis_message_id", envelope(options={"redis_message_id": 7})),
    "broker-priority-is-a-word": ("options.broker_priority", envelope(options={"broker_priority": "x"})),
    "pipe-target-is-a-string": ("options.pipe_target", envelope(options={"pipe_target": "next"})),
    "on_success-is-a-number": ("options.on_success", envelope(options={"on_success": 5})),
    "throws-names-a-class": ("options.throws", envelope(options={"throws": "ValueError"})),
    "hold_on-names-classes": ("options.hold_on", envelope(options={"hold_on": ["ValueError"]})),
    "args-is-a-string": ("args", envelope(args="abc")),
    "kwargs-is-a-list": ("kwargs", envelope(kwargs=[1])),
    "queue_name-is-a-number": ("queue_name", envelope(queue_name=5)),
    "actor_name-is-null": ("actor_name", envelope(actor_name=None)),
    "message_id-is-an-object": ("message_id", envelope(message_id={"id": 1})),
    "message_id-is-missing": ("message_id", without("message_id")),
    "message_timestamp-is-a-word": ("message_timestamp", envelope(message_timestamp="yesterday")),
    "an-unknown-field": ("reply_to", envelope(reply_to="me")),
    "not-an-object": ("message", [1, 2, 3]),
}


@pytest.mark.parametrize("kind", POISON)
def test_a_message_with_a_wrongly_typed_field_is_held_and_nothing_else_runs_twice(
    kind: str,
    broker: dramatiq.Broker,
    import_user: dramaturg.Actor[..., None],
    held: Held,
    start_worker: Callable[..., dramatiq.Worker],
) -> None:
    field, poison = POISON[kind]
    # Given a decodable message with one bad field, put straight onto the queue
    raw_publish(broker, "imports", json.dumps(poison).encode())
    # and three normal tasks behind it
    for number in (1, 2, 3):
        import_user.send({"id": number})

    # When a worker takes them
    worker = start_worker()

    # Then the three ran, and the poison is held with a reason that names the field
    assert sorted(import_user.ran.wait(3)) == [1, 2, 3]  # type: ignore[attr-defined]
    [task] = held.wait(1)
    assert task.reason.startswith(f"{field}: "), task.reason
    assert task.queue_name == "imports"
    assert dramaturg.held_tasks().count("imports") == 1
    # and the worker goes on
    import_user.send({"id": 4})
    assert sorted(import_user.ran.wait(4)) == [1, 2, 3, 4]  # type: ignore[attr-defined]
    worker.join()
    worker.stop()

    # 5 sent == 4 succeeded + 1 held + 0 still queued, and none ran twice (nor the poison)
    assert sorted(import_user.ran.seen) == [1, 2, 3, 4]  # type: ignore[attr-defined]
    assert pending_messages(broker, "imports") == 0
    assert len(held.tasks) == 1


def test_messages_naming_another_queue_are_held_and_every_worker_thread_goes_on(
    broker: dramatiq.Broker,
    import_user: dramaturg.Actor[..., None],
    held: Held,
    start_worker: Callable[..., dramatiq.Worker],
) -> None:
    # Given ten messages that name the queue 'exports' but were put on 'imports'
    strays = [envelope(queue_name="exports", args=[{"id": 100 + n}]) for n in range(10)]
    for stray in strays:
        raw_publish(broker, "imports", json.dumps(stray).encode())
    # and three normal tasks behind them
    for number in (1, 2, 3):
        import_user.send({"id": number})

    # When an 8-thread worker takes them
    worker = start_worker(threads=8)

    # Then the normal tasks ran, and each stray is held with a reason naming both queues
    assert sorted(import_user.ran.wait(3)) == [1, 2, 3]  # type: ignore[attr-defined]
    tasks = held.wait(10)
    assert sorted(t.message_id for t in tasks) == sorted(s["message_id"] for s in strays)
    for task in tasks:
        assert task.reason.startswith("queue_name: "), task.reason
        assert "'exports'" in task.reason and "'imports'" in task.reason
    # and all eight threads still work: eight more tasks at once
    for number in range(4, 12):
        import_user.send({"id": number})
    assert sorted(import_user.ran.wait(11)) == list(range(1, 12))  # type: ignore[attr-defined]

    # And a kicked stray runs on the queue it was found in
    assert dramaturg.held_tasks().kick("imports", [strays[0]["message_id"]]) == 1
    assert 100 in import_user.ran.wait(12)  # type: ignore[attr-defined]
    worker.join()
    worker.stop()

    # 21 sent == 12 succeeded + 9 held + 0 still queued (RabbitMQ puts back the held
    # tasks the kick did not take as it closes the kick's channel, in a moment of its own)
    assert len(import_user.ran.seen) == 12  # type: ignore[attr-defined]
    poll_until(lambda: dramaturg.held_tasks().count("imports") == 9, "9 strays still held")
    assert pending_messages(broker, "imports") == 0


@pytest.mark.parametrize("named", ["imports.DQ", "imports.P2"])
def test_a_message_naming_its_delay_queue_or_a_lane_runs_once(
    named: str,
    broker: dramatiq.Broker,
    import_user: dramaturg.Actor[..., None],
    held: Held,
    start_worker: Callable[..., dramatiq.Worker],
) -> None:
    # Given a message naming a queue that is the same queue as the one it is on
    raw_publish(broker, "imports", json.dumps(envelope(queue_name=named, args=[{"id": 1}])).encode())
    import_user.send({"id": 2})

    worker = start_worker()

    # Then it runs like any other, once, and is acknowledged where it came from
    assert sorted(import_user.ran.wait(2)) == [1, 2]  # type: ignore[attr-defined]
    worker.join()
    import_user.send({"id": 3})
    assert sorted(import_user.ran.wait(3)) == [1, 2, 3]  # type: ignore[attr-defined]
    worker.join()
    worker.stop()
    assert sorted(import_user.ran.seen) == [1, 2, 3]  # type: ignore[attr-defined]
    assert held.tasks == []
    assert pending_messages(broker, "imports") == 0


# -- unknown actors: a rolling deploy, or two applications on one queue -------------------


def test_a_task_for_an_actor_this_worker_does_not_know_yet_waits_for_a_worker_that_does(
    broker: dramatiq.Broker,
    import_user: dramaturg.Actor[..., None],
    held: Held,
    start_worker: Callable[..., dramatiq.Worker],
    watch: Callable[[str], LogWatch],
) -> None:
    log = watch("dramaturg")
    # Given a task sent by newer code, for an actor this worker does not declare
    message = dramatiq.Message(queue_name="imports", actor_name="export_user", args=(7,), kwargs={}, options={})
    raw_publish(broker, "imports", message.encode())
    import_user.send({"id": 1})

    # When the worker meets it
    worker = start_worker()
    assert sorted(import_user.ran.wait(1)) == [1]  # type: ignore[attr-defined]
    line = log.wait(f"message {message.message_id}")

    # Then it says so and gives the task back instead of holding it
    assert "export_user" in line and "given back" in line
    assert (logging.WARNING, line) in log.lines
    assert held.tasks == []

    # And once the worker knows the actor (the new code arrived), the task runs, once
    exported = threading.Event()

    @dramaturg.actor(queue_name="imports")
    def export_user(number: int) -> None:
        exported.set()

    assert exported.wait(WAIT_S)
    worker.join()
    worker.stop()
    assert held.tasks == []
    assert dramaturg.held_tasks().count("imports") == 0
    assert pending_messages(broker, "imports") == 0


@pytest.mark.parametrize("unknown_actor_grace", ["1500ms"])
def test_a_task_for_an_unknown_actor_is_held_once_the_grace_is_over(
    broker: dramatiq.Broker,
    import_user: dramaturg.Actor[..., None],
    held: Held,
    start_worker: Callable[..., dramatiq.Worker],
    watch: Callable[[str], LogWatch],
) -> None:
    log = watch("dramaturg")
    message = dramatiq.Message(queue_name="imports", actor_name="export_user", args=(1,), kwargs={}, options={})
    raw_publish(broker, "imports", message.encode())
    import_user.send({"id": 1})

    worker = start_worker()

    # Then it was given back first, and held once the grace was over, with today's reason
    [task] = held.wait(1)
    assert task.message_id == message.message_id
    assert task.reason.startswith("unknown actor 'export_user': no actor of that name is declared in this worker")
    assert task.args == [1]
    assert any("given back" in line for _, line in log.lines)
    assert sorted(import_user.ran.wait(1)) == [1]  # type: ignore[attr-defined]
    worker.join()
    worker.stop()
    # 2 sent == 1 succeeded + 1 held + 0 still queued
    assert dramaturg.held_tasks().count("imports") == 1
    assert pending_messages(broker, "imports") == 0

    # And a kick gives it a grace of its own again (the first sighting is not kept)
    [kept] = dramaturg.held_tasks().list("imports")
    assert not any(name.startswith("dramaturg_unknown") for name in kept.options)


@pytest.mark.parametrize("unknown_actor_grace", ["0s"])
def test_without_a_grace_a_task_for_an_unknown_actor_is_held_at_once(
    broker: dramatiq.Broker,
    import_user: dramaturg.Actor[..., None],
    held: Held,
    start_worker: Callable[..., dramatiq.Worker],
) -> None:
    message = dramatiq.Message(queue_name="imports", actor_name="export_user", args=(1,), kwargs={}, options={})
    raw_publish(broker, "imports", message.encode())
    import_user.send({"id": 2})

    worker = start_worker()

    assert sorted(import_user.ran.wait(1)) == [2]  # type: ignore[attr-defined]
    [task] = held.wait(1)
    worker.join()
    assert task.message_id == message.message_id
    assert task.reason.startswith("unknown actor 'export_user': no actor of that name is declared in this worker")
    assert task.args == [1]
    worker.stop()
    assert pending_messages(broker, "imports") == 0


class DelayWatch(dramatiq.Middleware):
    """Sets ``seen`` when a worker's consumer puts a message aside until its eta."""

    def __init__(self) -> None:
        self.seen = threading.Event()

    def before_delay_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self.seen.set()


def test_a_delayed_task_for_an_unknown_actor_keeps_its_delay(
    broker: dramatiq.Broker,
    import_user: dramaturg.Actor[..., None],
    held: Held,
    start_worker: Callable[..., dramatiq.Worker],
) -> None:
    # Given a task for an unknown actor, delayed by an hour
    message = dramatiq.Message(queue_name="imports", actor_name="export_user", args=(1,), kwargs={}, options={})
    broker.enqueue(message, delay=3_600_000)
    delays = DelayWatch()
    broker.add_middleware(delays)

    # When a worker's delay-queue consumer takes it
    worker = start_worker()
    assert delays.seen.wait(WAIT_S)
    import_user.send({"id": 1})
    assert sorted(import_user.ran.wait(1)) == [1]  # type: ignore[attr-defined]
    worker.stop()

    # Then it still waits for its hour, neither held nor hurried
    assert held.tasks == []
    assert pending_messages(broker, "imports") == 1


# -- what the door lets through, and what stands behind it --------------------------------


def test_every_message_dramaturg_and_dramatiq_send_passes_the_door() -> None:
    broker = dramaturg.bootstrap(dramaturg.Settings(broker={"type": "stub"}))

    @dramaturg.actor(queue_name="imports", ttr=5_000, max_retries=3)
    def import_user(row: dict[str, Any]) -> None: ...

    @dramaturg.actor(queue_name="mail")
    def welcome(row: dict[str, Any]) -> None: ...

    sent = [
        import_user.message({"id": 1}),
        import_user.message_with_options(
            args=({"id": 2},), priority=3, ttr=1_500.5, max_age=60_000, on_success=welcome, on_failure="welcome"
        ),
        # a pipeline: its next message, and the one after, ride in pipe_target
        (import_user.message({"id": 3}) | welcome.message() | welcome.message_with_options(delay=1_000)).messages[0],
        # a retry's copy, a kicked task, a delayed one (as the brokers write them)
        import_user.message({"id": 4}).copy(
            options={"retries": 2, "dramaturg_last_error": "KeyError: 'email'", "dramaturg_rerun": False}
        ),
        import_user.message({"id": 5}).copy(options={"dramaturg_kicks": 1, "eta": 1_700_000_000_000.0}),
        import_user.message({"id": 6}).copy(
            queue_name="imports.P1.DQ",
            options={"redis_message_id": "r-6", "broker_priority": 1, "dramaturg_context": {"store": "s-1"}},
        ),
    ]

    for message in sent:
        queue = "imports.P1.DQ" if message.queue_name.endswith(".DQ") else "imports"
        body = message.encode()
        assert json.loads(decode(body, queue).encode()) == json.loads(body) | {"queue_name": queue}
    broker.close()


def test_behind_the_door_a_bad_ttr_or_priority_never_stops_a_worker_or_its_time_limit() -> None:
    from dramatiq.worker import _WorkQueueItem

    from dramaturg.middleware.priority import MessagePriorityQueue
    from dramaturg.middleware.ttr import TimeToRun

    broker = dramaturg.bootstrap(dramaturg.Settings(broker={"type": "stub"}, tasks={"ttr": "10m"}))
    middleware = next(m for m in broker.middleware if isinstance(m, TimeToRun))

    @dramaturg.actor(queue_name="imports", ttr=5_000)
    def import_user(row: dict[str, Any]) -> None: ...

    # A ttr that is not a number falls back to the actor's, never to "no time limit"
    message = import_user.message({"id": 1}).copy(options={"ttr": "ten minutes"})
    assert middleware.ttr_ms(broker, message) == 5_000

    # A priority that is not a number keeps the actor's place in the work queue
    work = MessagePriorityQueue()
    work.put(_WorkQueueItem(4, dramatiq.broker.MessageProxy(message.copy(options={"priority": "high"}))))
    assert work.get_nowait().priority == 4
    broker.close()
