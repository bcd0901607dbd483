"""Held tasks under faults, on every broker: a kicker stalled past its lease, ids that look
like "all", entries of another shape, kicks that crash, queue names typed by mistake."""

from __future__ import annotations

import copy
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg.held import HeldStore, KickError
from dramaturg.queues import lanes

from .conftest import WAIT_S, Process, bin_path, cli_env, held_task, poll_until, write_config

REPO = Path(__file__).resolve().parents[1]
#: The lease of a stalled Redis kicker in these tests (ms); on RabbitMQ its heartbeat (s).
SHORT_LEASE_MS = 300
SHORT_HEARTBEAT_S = 1


@pytest.fixture(autouse=True)
def imports_queue(broker: Any) -> None:
    """The "imports" queue is the application's (on RabbitMQ the broker fixture deletes it,
    its held queue included, after each test)."""
    broker.declare_queue("imports")


# -- raw access to the stores, as another client (or another version) would have ----------


def queued_ids(broker: Any, queue: str) -> list[str]:
    """The message id of every copy waiting on ``queue`` (ready or delayed), read without
    taking anything; a message queued twice is there twice."""
    if broker.settings.type == "rabbitmq":
        import pika

        connection = pika.BlockingConnection(broker.parameters)
        try:
            ids = []
            for name in (queue, f"{queue}.DQ"):
                channel = connection.channel()
                try:
                    channel.queue_declare(name, passive=True)
                except pika.exceptions.ChannelClosedByBroker:
                    continue
                while True:
                    method, _, body = channel.basic_get(name, auto_ack=False)
                    if method is None:
                        break
                    ids.append(json.loads(body)["message_id"])
                channel.close()  # every message goes back
            return ids
        finally:
            connection.close()
    names = [*lanes(queue), *(f"{lane}.DQ" for lane in lanes(queue))]
    bodies = [body for name in names for body in broker.client.hvals(f"{broker.namespace}:{name}.msgs")]
    return [json.loads(body)["message_id"] for body in bodies]


def put_held_entry(broker: Any, queue: str, message_id: str, data: bytes) -> None:
    """Store ``data`` as a held entry, as another version of dramaturg (or a bug) might."""
    if broker.settings.type == "rabbitmq":
        import pika

        connection = pika.BlockingConnection(broker.parameters)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.queue_declare(f"{queue}.HQ", durable=True)
            channel.basic_publish("", f"{queue}.HQ", data, pika.BasicProperties(delivery_mode=2, message_id=message_id))
        finally:
            connection.close()
        return
    prefix = f"{broker.namespace}:__held__"
    broker.client.hset(f"{prefix}:{queue}", message_id, data)
    broker.client.zadd(f"{prefix}:{queue}#order", {message_id: 1_700_000_000_000})
    broker.client.sadd(f"{prefix}:#queues", queue)


def stalling_store(broker: Any) -> HeldStore:
    """A second held store on the same broker whose kick loses its lease soon when it stalls:
    on Redis a short lease, on RabbitMQ a connection with a short heartbeat."""
    if broker.settings.type == "rabbitmq":
        from dramaturg.brokers.rabbitmq import RabbitmqHeldStore

        store = RabbitmqHeldStore(broker, broker.settings)
        store.parameters = copy.copy(broker.parameters)
        store.parameters.heartbeat = SHORT_HEARTBEAT_S
        return store
    from dramaturg.brokers.redis import RedisHeldStore

    return RedisHeldStore(broker, broker.settings, lease_ms=SHORT_LEASE_MS)


def close(store: HeldStore) -> None:
    """Close a store's own connection, if it has one (RabbitMQ)."""
    getattr(store, "close", lambda: None)()


class PauseOneThread(dramatiq.Middleware):
    """Stops ``thread`` at its first enqueue (a kicker about to requeue) until ``resume``."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.paused = threading.Event()
        self.resume = threading.Event()

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        if threading.current_thread() is self.thread and not self.paused.is_set():
            self.paused.set()
            assert self.resume.wait(WAIT_S * 3)


# -- 5: a kicker stalled past its lease -------------------------------------------------------


def test_a_kicker_stalled_past_its_lease_queues_nothing_twice(broker: Any) -> None:
    # Given 300 held tasks, and a kicker that stalls once it has taken them all
    store = dramaturg.held_tasks()
    tasks = [held_task("imports", n) for n in range(300)]
    for task in tasks:
        store.hold(task)
    pause = PauseOneThread()
    broker.add_middleware(pause)
    stalled, outcome = stalling_store(broker), {}

    def kick() -> None:
        try:
            outcome["kicked"] = stalled.kick("imports")
        except KickError as error:
            outcome["error"] = error

    pause.thread = threading.Thread(target=kick)
    pause.thread.start()
    assert pause.paused.wait(WAIT_S)

    # When its lease runs out (the tasks are held again for everyone else) and another kick
    # requeues them all
    poll_until(lambda: store.count("imports") == len(tasks), "the stalled kicker's tasks held again")
    assert store.kick("imports") == len(tasks)
    # and then the stalled kicker goes on
    pause.resume.set()
    pause.thread.join(WAIT_S)

    # Then it requeued none of them, and says so; every task is on the queue exactly once
    error = outcome["error"]
    assert error.kicked == 0
    assert sorted(message_id for message_id, _ in error.failures) == sorted(t.message_id for t in tasks)
    assert sorted(queued_ids(broker, "imports")) == sorted(t.message_id for t in tasks)
    assert store.count("imports") == 0
    close(stalled)


def test_a_stopped_held_kick_process_queues_nothing_twice(
    settings: dramaturg.Settings, broker: Any, tmp_path: Path
) -> None:
    # Given 200 held tasks and `dramaturg held kick imports --all` stopped by SIGSTOP just
    # before it requeues the first of them
    write_config(tmp_path, settings, modules=["tests.apps.held_pause"])
    store = dramaturg.held_tasks()
    tasks = [held_task("imports", n) for n in range(200)]
    for task in tasks:
        store.hold(task)
    kicker = Process(
        [bin_path("dramaturg"), "held", "kick", "imports", "--all"],
        cwd=tmp_path,
        env=cli_env(
            PYTHONPATH=str(REPO),
            HELD_LEASE_MS=str(SHORT_LEASE_MS),
            DRAMATURG_BROKER_HEARTBEAT=f"{SHORT_HEARTBEAT_S}s",
        ),
    )
    try:
        poll_until(lambda: process_state(kicker.popen.pid) == "T", "the kicker stopped")

        # When its lease runs out and another kick requeues them all
        poll_until(lambda: store.count("imports") == len(tasks), "the stopped kicker's tasks held again")
        assert store.kick("imports") == len(tasks)
        # and the stopped kicker is continued
        os.kill(kicker.popen.pid, signal.SIGCONT)
        code = kicker.popen.wait(timeout=WAIT_S)
    finally:
        kicker.kill()

    # Then it requeued none, says why in one line per task, and exits 1
    output = kicker.output
    assert code == 1, output
    assert "requeued 0 held tasks of imports" in output
    assert "Traceback" not in output and "ERROR" not in output
    lines = [line for line in output.splitlines() if "stay held: not requeued by this kick" in line]
    assert len(lines) == 1, output
    [line] = lines
    assert line.startswith("dramaturg: ") and " and 197 more stay held: " in line
    # and every task is on the queue exactly once
    assert sorted(queued_ids(broker, "imports")) == sorted(t.message_id for t in tasks)
    assert store.count("imports") == 0


@pytest.mark.parametrize("broker_kind", ["rabbitmq"])
def test_a_kick_whose_connection_was_dropped_while_it_took_its_tasks_says_so_in_one_line(
    settings: dramaturg.Settings, broker: Any, tmp_path: Path
) -> None:
    # Given 200 held tasks and `dramaturg held kick imports --all` stopped (SIGSTOP) while
    # it takes them, after 50
    write_config(tmp_path, settings, modules=["tests.apps.held_pause"])
    store = dramaturg.held_tasks()
    tasks = [held_task("imports", n) for n in range(200)]
    for task in tasks:
        store.hold(task)
    kicker = Process(
        [bin_path("dramaturg"), "held", "kick", "imports", "--all"],
        cwd=tmp_path,
        env=cli_env(PYTHONPATH=str(REPO), HELD_PAUSE_TAKING="50", DRAMATURG_BROKER_HEARTBEAT=f"{SHORT_HEARTBEAT_S}s"),
    )
    try:
        poll_until(lambda: process_state(kicker.popen.pid) == "T", "the kicker stopped")

        # When RabbitMQ drops its connection (missed heartbeats: its tasks are held again)
        # and it is continued
        poll_until(lambda: store.count("imports") == len(tasks), "the stopped kicker's tasks held again")
        os.kill(kicker.popen.pid, signal.SIGCONT)
        code = kicker.popen.wait(timeout=WAIT_S)
    finally:
        kicker.kill()

    # Then it says so in one masked line and exits 3, not with pika's traceback
    output = kicker.output
    assert code == 3, output
    assert "Traceback" not in output and "ERROR" not in output, output
    [line] = output.splitlines()
    assert line.startswith("dramaturg: cannot reach RabbitMQ at amqp://guest:***@"), line
    assert "while taking the held tasks of imports: none was requeued, RabbitMQ keeps them held" in line
    # and every task is still held, none queued
    assert store.count("imports") == len(tasks)
    assert queued_ids(broker, "imports") == []


def process_state(pid: int) -> str:
    """The state letter of a process (``T``: stopped), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_listing_never_gives_back_a_running_kick(broker: Any) -> None:
    # Given a kick that has taken the queue's tasks and has not requeued them yet
    store = dramaturg.held_tasks()
    tasks = [held_task("imports", n) for n in range(3)]
    for task in tasks:
        store.hold(task)
    kicker = stalling_store(broker)
    with kicker.taking("imports", None) as taken:
        batch = [(task.to_message(), receipt) for task, receipt in taken]

        # When the tasks are listed, counted and looked up meanwhile (well within the lease)
        assert store.list("imports") == []
        assert store.count("imports") == 0
        assert store.get(tasks[0].message_id, "imports") is None

        # Then the kick still owns them: it requeues every one
        assert kicker.requeue("imports", batch, None) == []
    assert sorted(queued_ids(broker, "imports")) == sorted(t.message_id for t in tasks)
    assert store.count("imports") == 0
    close(kicker)


class Clock:
    """The Redis held store's clock (ms), moved forward by hand: leases run out at once."""

    def __init__(self) -> None:
        self.ahead_ms = 0

    def __call__(self) -> int:
        return int(time.time() * 1000) + self.ahead_ms


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr("dramaturg.brokers.redis.held._now_ms", clock)
    return clock


@pytest.mark.parametrize("broker_kind", ["redis", "embedded"])
def test_listing_a_kick_whose_lease_ran_out_leaves_it_to_its_kicker(
    broker_kind: str, broker: Any, clock: Clock
) -> None:
    # Given a kick that has taken the queue's tasks, and stalled past its lease
    store = dramaturg.held_tasks()
    tasks = [held_task("imports", n) for n in range(3)]
    for task in tasks:
        store.hold(task)
    kicker = stalling_store(broker)
    with kicker.taking("imports", None) as taken:
        batch = [(task.to_message(), receipt) for task, receipt in taken]
        clock.ahead_ms += SHORT_LEASE_MS + 1

        # When the tasks are listed meanwhile, they show as held again (nothing hides them)
        assert [t.message_id for t in store.list("imports")] == [t.message_id for t in tasks]
        assert store.count("imports") == 3
        assert store.get(tasks[0].message_id, "imports") == tasks[0]

        # Then, since nobody else kicked them, the stalled kicker still requeues each once
        assert kicker.requeue("imports", batch, None) == []
    assert sorted(queued_ids(broker, "imports")) == sorted(t.message_id for t in tasks)
    assert store.count("imports") == 0


@pytest.mark.parametrize("broker_kind", ["redis", "embedded"])
def test_a_long_kick_renews_its_lease(
    broker_kind: str, broker: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a kick whose every requeue takes 60% of its lease
    store = dramaturg.held_tasks()
    tasks = [held_task("imports", n) for n in range(4)]
    for task in tasks:
        store.hold(task)
    kicker = stalling_store(broker)
    seen_held: list[int] = []

    class SlowEnqueue(dramatiq.Middleware):
        def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
            clock.ahead_ms += SHORT_LEASE_MS * 6 // 10
            seen_held.append(store.count("imports"))

    broker.add_middleware(SlowEnqueue())
    monkeypatch.setattr("dramaturg.held.KICK_BATCH", 1)

    # When it runs for twice its lease, then the tasks it has not requeued yet never look
    # held to anyone meanwhile, and it requeues every one
    assert kicker.kick("imports") == 4
    assert seen_held == [0, 0, 0, 0]
    assert sorted(queued_ids(broker, "imports")) == sorted(t.message_id for t in tasks)


def test_a_kick_that_crashes_gives_its_tasks_back_at_once(broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given held tasks, and a kick that crashes (Ctrl-C, or anything `except Exception`
    # does not catch) once it has requeued the first of them
    store = dramaturg.held_tasks()
    tasks = [held_task("imports", n) for n in range(3)]
    for task in tasks:
        store.hold(task)
    broker.add_middleware(CrashAtEnqueue(2))
    monkeypatch.setattr("dramaturg.held.KICK_BATCH", 1)
    with pytest.raises(KeyboardInterrupt):
        store.kick("imports")

    # Then the tasks it had not requeued are held again at once, not after a lease
    assert [t.message_id for t in store.list("imports")] == [t.message_id for t in tasks[1:]]
    assert queued_ids(broker, "imports") == [tasks[0].message_id]


class CrashAtEnqueue(dramatiq.Middleware):
    def __init__(self, number: int) -> None:
        self.number, self.seen = number, 0

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        self.seen += 1
        if self.seen == self.number:
            raise KeyboardInterrupt


# -- 6: an id is never "all" ----------------------------------------------------------------


def test_an_id_that_looks_like_all_acts_on_nothing(broker: Any) -> None:
    store = dramaturg.held_tasks()
    tasks = [held_task("imports", n) for n in range(3)]
    for task in tasks:
        store.hold(task)

    assert store.purge("imports", ["*"]) == 0
    assert store.purge("imports", []) == 0
    assert store.kick("imports", ["*"]) == 0
    assert store.kick("imports", []) == 0

    assert store.count("imports") == 3
    assert queued_ids(broker, "imports") == []


# -- 13: entries of another shape -------------------------------------------------------------


def test_entries_of_another_shape_are_listed_as_unreadable_and_kicks_go_on(broker: Any) -> None:
    # Given held tasks, one stored by a newer version with a field this one does not know,
    # one that is not JSON and one that is JSON of another shape
    store = dramaturg.held_tasks()
    tasks = [held_task("imports", n) for n in range(2)]
    store.hold(tasks[0])
    newer = json.loads(tasks[1].to_json()) | {"priority_class": "gold"}
    put_held_entry(broker, "imports", tasks[1].message_id, json.dumps(newer).encode())
    put_held_entry(broker, "imports", "broken-1", b"\x80 not json")
    other_shape = json.loads(held_task("imports", 9).to_json()) | {"message_id": "broken-2", "attempts": "one"}
    put_held_entry(broker, "imports", "broken-2", json.dumps(other_shape).encode())

    # When they are listed
    listed = {task.message_id: task for task in store.list("imports")}

    # Then the newer one reads as a task, the others as unreadable by their id, saying why
    assert listed[tasks[1].message_id] == tasks[1]
    assert listed["broken-1"].reason.startswith("unreadable held entry: not JSON")
    assert listed["broken-1"].raw is not None and "not json" in listed["broken-1"].raw
    assert listed["broken-2"].reason == "unreadable held entry: 'attempts' is a str"
    assert store.get("broken-1", "imports") == listed["broken-1"]
    assert store.count("imports") == 4

    # When the queue is kicked, the readable ones are requeued and the others stay held
    with pytest.raises(KickError) as raised:
        store.kick("imports")
    assert raised.value.kicked == 2
    assert sorted(message_id for message_id, _ in raised.value.failures) == ["broken-1", "broken-2"]
    assert sorted(queued_ids(broker, "imports")) == sorted(t.message_id for t in tasks)
    assert sorted(t.message_id for t in store.list("imports")) == ["broken-1", "broken-2"]

    # and they can be purged by id
    assert store.purge("imports", ["broken-1", "broken-2"]) == 2
    assert store.count("imports") == 0


@pytest.mark.parametrize("broker_kind", ["redis", "embedded"])
def test_an_unreadable_entry_taken_by_a_dead_kicker_comes_back(broker_kind: str, broker: Any) -> None:
    # Given an entry that is not JSON, taken by a kicker that died before giving it back
    put_held_entry(broker, "imports", "broken", b"\x80 not json")
    store = dramaturg.held_tasks()
    dead = stalling_store(broker)
    taking = dead.taking("imports", None)
    [(task, _)] = list(taking.__enter__())  # never left: the process died
    assert task.message_id == "broken"

    # When its lease has run out, the next kick gives it back (the script decoding it does
    # not fail), and it is held again, listed in its place
    poll_until(lambda: store.count("imports") == 1, "the dead kicker's lease ran out")
    with pytest.raises(KickError):
        store.kick("imports")
    [listed] = store.list("imports")
    assert listed.message_id == "broken" and listed.reason.startswith("unreadable held entry")


# -- 14: queue names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "imports.HQ", "no spaces", "-x", "amq.gen", "q" * 300])
def test_bad_queue_names_are_refused_with_a_clear_error(broker: Any, name: str) -> None:
    store = dramaturg.held_tasks()
    if name in ("amq.gen", "q" * 300) and broker.settings.type != "rabbitmq":
        assert store.count(name) == 0  # only RabbitMQ reserves amq. and limits the length
        return
    acts = (lambda: store.count(name), lambda: store.list(name), lambda: store.kick(name), lambda: store.purge(name))
    for act in acts:
        with pytest.raises(dramaturg.SendError, match=r"is not a queue name|the queue name is empty"):
            act()


@pytest.mark.parametrize("broker_kind", ["rabbitmq"])
def test_reading_a_queue_with_no_held_tasks_declares_nothing(broker_kind: str, broker: Any) -> None:
    store = dramaturg.held_tasks()
    assert store.count("imprts") == 0
    assert store.list("imprts") == []
    assert store.get("x", "imprts") is None
    assert store.kick("imprts") == 0
    assert store.purge("imprts") == 0
    assert not rabbitmq_queue_exists(broker, "imprts.HQ")


def rabbitmq_queue_exists(broker: Any, name: str) -> bool:
    import pika

    connection = pika.BlockingConnection(broker.parameters)
    try:
        connection.channel().queue_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as error:
        assert error.reply_code == 404
        return False
    finally:
        if connection.is_open:
            connection.close()
