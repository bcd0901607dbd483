"""Queue administration (`dramaturg queue`, `dramaturg.purge_queue` and friends) on every
real broker: what an operator who sent tasks to the wrong queue checks afterwards."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg.exit_codes import EXIT_BROKER_UNREACHABLE, EXIT_FAILURE, EXIT_USAGE

from .conftest import (
    WAIT_S,
    Runs,
    bin_path,
    broker_url,
    cli_env,
    free_port,
    held_task,
    pending_messages,
    poll_until,
    run_cli,
    write_config,
)
from .test_status import status_when

REPO = Path(__file__).resolve().parents[1]
HOUR_MS = 3_600_000
SENT = 300


def cli(tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    result = run_cli([bin_path("dramaturg"), "queue", *argv], cwd=tmp_path, PYTHONPATH=str(REPO))
    return result.returncode, result.stdout, result.stderr


def counts(broker: dramatiq.Broker, queue: str = "imports") -> dict[str, Any]:
    row = dramaturg.queue_stats([queue], broker)[0]
    return {"ready": row.ready, "delayed": row.delayed, "held": row.held}


def expect_counts(broker: dramatiq.Broker, **expected: int) -> None:
    """The queue's counts become ``expected`` (RabbitMQ's management API lags by up to its
    statistics interval, so they are read until they do)."""
    seen: list[dict[str, Any]] = []
    try:
        poll_until(lambda: seen.append(counts(broker)) or seen[-1] == expected, "the counts", timeout=WAIT_S)
    except pytest.fail.Exception:
        assert seen[-1] == expected
        raise


def at_terminal(tmp_path: Path, argv: list[str], *, answer: str) -> tuple[int, str]:
    """Run ``dramaturg queue ARGV`` with a terminal as its stdin, answer the question, and
    return the exit code and what it wrote."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [bin_path("dramaturg"), "queue", *argv],
            cwd=tmp_path,
            env=cli_env(PYTHONPATH=str(REPO)),
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        os.write(controller, answer.encode() + b"\n")  # read by input() once it asks
        out, _ = process.communicate(timeout=60)
        return process.returncode, out
    finally:
        os.close(controller)
        os.close(terminal)


@pytest.fixture
def settings(broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dramaturg.Settings:
    """A namespace of this test's own; RabbitMQ gets the private Redis as its state store,
    so that purged tasks' records and batches are checked on every broker."""
    broker: dict[str, Any] = {
        "url": broker_url(broker_kind, request, tmp_path),
        "namespace": f"test-{uuid.uuid4().hex[:8]}",
    }
    state: dict[str, Any] = {}
    if broker_kind == "rabbitmq":
        broker["management_url"] = request.getfixturevalue("rabbitmq_server").management_url
        server = request.getfixturevalue("redis_server")
        state["url"] = f"redis://{server.host}:{server.port}/0"
    return dramaturg.Settings(broker=broker, worker={"threads": 4}, state=state)


def test_purge_drops_waiting_tasks_never_running_or_held_ones(
    broker_kind: str, broker: dramatiq.Broker, start_worker: Any
) -> None:
    # Given a worker with one thread busy on the first of 300 tasks (it holds up to its
    # prefetch of them, 64 on Redis, 128 on RabbitMQ), and two held tasks
    gate, started, ran = threading.Event(), threading.Event(), Runs()

    @dramaturg.actor(queue_name="imports")
    def step(n: int) -> None:
        started.set()
        gate.wait(WAIT_S)
        ran.add(n)

    sent = [step.send(n) for n in range(SENT)]
    for n in range(2):
        broker.held.hold(held_task("imports", n))  # type: ignore[attr-defined]
    worker = start_worker(threads=1)
    assert started.wait(WAIT_S)

    # When the queue is purged
    purged = dramaturg.purge_queue("imports", broker=broker)

    # Then what the worker had taken still runs, and nothing else: sent == purged + run
    gate.set()
    assert 0 < purged < SENT
    done = ran.wait(SENT - purged)
    assert sorted(done) == sorted(set(done))
    worker.stop()  # what it had not run would be back in the queue now
    assert pending_messages(broker, "imports") == 0
    assert len(ran.seen) == SENT - purged
    # The held tasks are untouched, and a purged task's record says so
    assert dramaturg.held_tasks(broker).count("imports") == 2
    dropped = next(m for n, m in enumerate(sent) if n not in done)
    status = dramaturg.task_status(dropped.message_id, broker)
    assert (status.state, status.reason) == ("purged", "purged from imports")


def test_purge_keeps_delayed_tasks_unless_asked(broker: dramatiq.Broker) -> None:
    # Given 3 waiting tasks and 5 due in an hour, no worker
    @dramaturg.actor(queue_name="imports")
    def step(n: int) -> None: ...

    for n in range(3):
        step.send(n)
    for n in range(5):
        step.send_with_options(args=(n,), delay=HOUR_MS)

    # Then a purge drops the waiting ones only, and --delayed the delayed ones
    assert dramaturg.purge_queue("imports", broker=broker) == 3
    expect_counts(broker, ready=0, delayed=5, held=0)
    assert dramaturg.purge_queue("imports", delayed=True, broker=broker) == 5
    expect_counts(broker, ready=0, delayed=0, held=0)


def test_peek_shows_the_next_tasks_masked_and_leaves_them(broker: dramatiq.Broker, start_worker: Any) -> None:
    # Given three waiting tasks, one with a password in its arguments, and one delayed
    ran = Runs()

    @dramaturg.actor(queue_name="imports")
    def fetch(url: str, *, page: int = 1) -> None:
        ran.add(url)

    urls = ["redis://shop:s3cret@cache:6379/0", "https://example.org/a", "https://example.org/b"]
    sent = [fetch.send(url, page=2) for url in urls]
    later = fetch.send_with_options(args=("https://example.org/later",), delay=HOUR_MS)

    # When the queue is peeked at
    tasks = dramaturg.peek_queue("imports", limit=10, broker=broker)

    # Then the waiting ones come first, in order, then the delayed one with when it is due
    assert [t.message_id for t in tasks] == [m.message_id for m in [*sent, later]]
    assert tasks[0].actor == "fetch"
    assert "s3cret" not in tasks[0].arguments and "shop:***@cache" in tasks[0].arguments
    assert tasks[0].arguments.endswith('{"page": 2}')
    assert tasks[0].due_at is None and tasks[-1].due_at is not None
    assert dramaturg.peek_queue("imports", limit=2, broker=broker)[1].message_id == sent[1].message_id
    # and nothing was taken: a worker runs each waiting task once
    worker = start_worker()
    assert sorted(ran.wait(3)) == sorted(urls)
    worker.stop()
    assert pending_messages(broker, "imports") == 1  # the delayed one
    assert len(ran.seen) == 3


def test_delete_refuses_a_queue_with_held_tasks_then_removes_everything(broker: dramatiq.Broker) -> None:
    # Given a queue with two waiting tasks, a delayed one and a held one
    @dramaturg.actor(queue_name="imports")
    def step(n: int) -> None: ...

    step.send(1)
    step.send(2)
    step.send_with_options(args=(3,), delay=HOUR_MS)
    broker.held.hold(held_task("imports", 1))  # type: ignore[attr-defined]

    # Then delete refuses while a task is held, and changes nothing
    with pytest.raises(dramaturg.QueueInUse, match="1 task\\(s\\) held"):
        dramaturg.delete_queue("imports", broker=broker)
    expect_counts(broker, ready=2, delayed=1, held=1)

    # With force it drops them all and removes the queue with its companions
    deleted = dramaturg.delete_queue("imports", force=True, broker=broker)
    assert deleted.dropped == 4
    assert "imports" in deleted.removed
    expect_counts(broker, ready=0, delayed=0, held=0)
    assert not broker.queue_admin.exists("imports")  # type: ignore[attr-defined]


def test_delete_refuses_a_queue_workers_consume(broker: dramatiq.Broker, start_worker: Any) -> None:
    @dramaturg.actor(queue_name="imports")
    def step(n: int) -> None: ...

    worker = start_worker()
    poll_until(lambda: broker.queue_admin.usage("imports")[0] > 0, "the worker to consume")  # type: ignore[attr-defined]
    with pytest.raises(dramaturg.QueueInUse, match="worker process"):
        dramaturg.delete_queue("imports", broker=broker)
    worker.stop()


def test_cli_purge_peek_delete_and_bad_names(
    broker_kind: str, settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path
) -> None:
    # Given a project on this broker and 5 tasks waiting in "imports"
    write_config(tmp_path, settings)

    @dramaturg.actor(queue_name="imports")
    def step(n: int) -> None: ...

    sent = [step.send(n) for n in range(5)]

    # list: the queue with its counts (RabbitMQ's lag by up to its statistics interval)
    def listed() -> int:
        code, out, err = cli(tmp_path, "list", "--json")
        assert code == 0, err
        rows = {row["queue"]: row for row in json.loads(out)["queues"]}
        return int(rows["imports"]["ready"])

    poll_until(lambda: listed() == 5, "dramaturg queue list to show 5 ready", timeout=WAIT_S)

    # peek: a table of the next ones
    code, out, err = cli(tmp_path, "peek", "imports", "--limit", "2")
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["id", "actor", "arguments"]
    assert [line.split()[0] for line in lines] == [m.message_id for m in sent[:2]]

    # bad names: one line, exit 2, the closest known queue named
    code, _, err = cli(tmp_path, "purge", "imprts", "--yes")
    assert (code, err.strip()) == (
        EXIT_USAGE,
        "dramaturg: no queue 'imprts' on the broker or among the actors' queues; did you mean 'imports'?",
    )
    code, _, err = cli(tmp_path, "purge", "imports.DQ", "--yes")
    assert code == EXIT_USAGE and "reserved" in err and len(err.splitlines()) == 1
    # not at a terminal, purge needs --yes
    code, _, err = cli(tmp_path, "purge", "imports")
    assert code == EXIT_USAGE and "--yes" in err

    # at a terminal, purge asks first, saying how many; "n" purges nothing
    code, out = at_terminal(tmp_path, ["purge", "imports"], answer="n")
    assert "Drop the 5 waiting tasks of imports? This cannot be undone. [y/N]" in out
    assert (code, out.endswith("nothing purged\n")) == (EXIT_FAILURE, True)  # (the answer echoes on the terminal)

    # purge: says how many
    code, out, err = cli(tmp_path, "purge", "imports", "--yes")
    assert (code, out.strip()) == (0, "purged 5 waiting tasks of imports"), err

    # delete: refused with a held task, then forced
    broker.held.hold(held_task("imports", 1))  # type: ignore[attr-defined]
    code, _, err = cli(tmp_path, "delete", "imports", "--yes")
    assert code == EXIT_FAILURE and "held" in err
    code, out, err = cli(tmp_path, "delete", "imports", "--yes", "--force")
    assert code == 0, err
    assert out.startswith("deleted queue imports: 1 task(s) dropped")


def test_purged_batch_members_end_as_cancelled_and_the_batch_completes(
    broker_kind: str, broker: dramatiq.Broker, start_worker: Any
) -> None:
    report = Runs()

    @dramaturg.actor(queue_name="imports")
    def member(n: int) -> None: ...

    @dramaturg.actor(queue_name="reports", actor_name="report")
    def on_complete(summary: dict[str, Any]) -> None:
        report.add(summary)

    # Given a batch of five members waiting, no worker on their queue
    batch = dramaturg.batch("wrong queue", on_complete=on_complete.message())
    with batch:
        member.send_many(range(5))

    # When the queue is purged, with a worker on the reports queue only
    start_worker(queues={"reports"})
    assert dramaturg.purge_queue("imports", broker=broker) == 5

    # Then the batch ends, its members cancelled, and on_complete fires once
    (summary,) = report.wait(1)
    assert (summary["total"], summary["succeeded"], summary["cancelled"], summary["failed"]) == (5, 0, 5, 0)
    assert batch.status().state == "complete"


def test_an_unreachable_broker_is_one_line_and_exit_3(tmp_path: Path) -> None:
    (tmp_path / "dramaturg.toml").write_text(f'[broker]\nurl = "redis://127.0.0.1:{free_port()}/0"\n')
    for argv in (["list"], ["peek", "imports"], ["purge", "imports", "--yes"], ["delete", "imports", "--yes"]):
        code, out, err = cli(tmp_path, *argv)
        assert (code, out, len(err.splitlines())) == (EXIT_BROKER_UNREACHABLE, "", 1), argv
        assert err.startswith("dramaturg: cannot reach Redis at redis://127.0.0.1:")


def test_peek_limit_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = cli(tmp_path, "peek", "imports", "--limit", "0")
    assert (code, err.strip()) == (EXIT_USAGE, "dramaturg: --limit must be from 1 to 1000, not 0")


def test_a_purge_while_the_state_store_does_not_answer_drops_nothing(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Given tasks waiting on Redis, whose state store ([state] url) does not answer
    dead = free_port()
    settings = dramaturg.Settings(
        broker={"url": broker_url("redis", request, tmp_path), "namespace": f"test-{uuid.uuid4().hex[:8]}"},
        state={"url": f"redis://127.0.0.1:{dead}/0"},
    )
    broker = dramaturg.bootstrap(settings)
    broker.enqueue(dramatiq.Message(queue_name="mail", actor_name="send", args=(), kwargs={}, options={}))
    broker.declare_queue("mail")

    # When the queue is purged
    with pytest.raises(dramaturg.BrokerUnreachable, match=r"the state store did not answer .*nothing was purged"):
        dramaturg.purge_queue("mail")

    # Then nothing was dropped
    assert pending_messages(broker, "mail") == 1


def purge_in_steps_of(monkeypatch: pytest.MonkeyPatch, broker_kind: str, size: int) -> None:
    """Purges take ``size`` tasks a step (the broker's own chunk is thousands)."""
    from dramaturg.brokers.rabbitmq import admin as rabbitmq_admin
    from dramaturg.brokers.redis import admin as redis_admin

    monkeypatch.setattr(rabbitmq_admin if broker_kind == "rabbitmq" else redis_admin, "PURGE_CHUNK", size)


def test_a_purge_whose_state_store_stops_answering_midway_loses_no_task(
    broker_kind: str, broker: dramatiq.Broker, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from dramaturg.status import state_store

    ran, report = Runs(), Runs()

    @dramaturg.actor(queue_name="imports")
    def member(n: int) -> None:
        ran.add(n)

    @dramaturg.actor(queue_name="reports", actor_name="report")
    def on_complete(summary: dict[str, Any]) -> None:
        report.add(summary)

    # Given a batch of twelve tasks waiting, a purge that takes five a step, and a state
    # store that stops answering once the first step's records are written
    batch = dramaturg.batch("midway", on_complete=on_complete.message())
    with batch:
        sent = [member.send(n) for n in range(12)]
    store = state_store(broker)
    store.flush()
    purge_in_steps_of(monkeypatch, broker_kind, 5)
    write, writes = store._write, []

    def stops_answering(*args: Any) -> None:
        writes.append(args)
        if len(writes) > 1:
            raise redis.ConnectionError("the state store stopped answering")
        write(*args)

    monkeypatch.setattr(store, "_write", stops_answering)

    # When the queue is purged, the purge stops with one clear error
    with pytest.raises(dramaturg.BrokerUnreachable, match=r"5 task\(s\) were purged and recorded, the 5 taken last"):
        dramaturg.purge_queue("imports", broker=broker)

    # Then, once the store answers again, each task was either recorded as purged or is
    # back on the queue: a worker runs those, and the batch completes, each member counted once
    monkeypatch.undo()
    start_worker(queues={"imports", "reports"})
    (summary,) = report.wait(1)
    purged = [n for n, m in enumerate(sent) if dramaturg.task_status(m.message_id, broker).state == "purged"]
    assert len(purged) == 5
    assert sorted(ran.wait(7)) == sorted(set(range(12)) - set(purged))
    assert (summary["total"], summary["succeeded"], summary["cancelled"]) == (12, 7, 5)


@pytest.mark.parametrize("broker_kind", ["rabbitmq"])
def test_a_task_purged_whose_acknowledgement_was_lost_is_never_run(
    broker: dramatiq.Broker, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pika.adapters.blocking_connection import BlockingChannel

    ran, report = Runs(), Runs()

    @dramaturg.actor(queue_name="imports")
    def member(n: int) -> None:
        ran.add(n)

    @dramaturg.actor(queue_name="reports", actor_name="report")
    def on_complete(summary: dict[str, Any]) -> None:
        report.add(summary)

    # Given a batch of four tasks waiting, and a purge whose connection is lost once it
    # has recorded them, before it acknowledges them
    batch = dramaturg.batch("lost ack", on_complete=on_complete.message())
    with batch:
        sent = [member.send(n) for n in range(4)]
    ack = BlockingChannel.basic_ack

    def connection_lost(channel: BlockingChannel, *args: Any, **kwargs: Any) -> None:
        channel.connection.close()
        ack(channel, *args, **kwargs)

    monkeypatch.setattr(BlockingChannel, "basic_ack", connection_lost)
    with pytest.raises(dramaturg.BrokerUnreachable, match="lost RabbitMQ"):
        dramaturg.purge_queue("imports", broker=broker)
    monkeypatch.undo()

    # When a worker takes what RabbitMQ gave back (redelivered), then a task sent after
    member.send(-1)
    worker = start_worker(threads=1, queues={"imports", "reports"})
    assert ran.wait(1) == [-1]
    (summary,) = report.wait(1)
    worker.stop()

    # Then the purged tasks never ran: their records say purged, and the batch counted
    # each once, as cancelled
    assert pending_messages(broker, "imports") == 0
    assert ran.seen == [-1]
    assert {dramaturg.task_status(m.message_id, broker).state for m in sent} == {"purged"}
    assert (summary["total"], summary["succeeded"], summary["cancelled"]) == (4, 0, 4)
    assert batch.status().state == "complete"


@pytest.mark.parametrize("broker_kind", ["rabbitmq"])
def test_a_purged_task_delivered_again_is_dropped_even_when_its_limit_is_full(
    broker: dramatiq.Broker, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pika.adapters.blocking_connection import BlockingChannel

    from dramaturg.flow.control import FlowControl
    from dramaturg.flow.state import LimitSpec

    ran = Runs()

    @dramaturg.actor(queue_name="imports", limits=[dramaturg.concurrency(1, key="shop")])
    def member(n: int) -> None:
        ran.add(n)

    @dramaturg.actor(queue_name="imports")
    def after() -> None:
        ran.add("after")

    # Given two tasks of an actor with a concurrency limit, purged by a purge whose
    # connection was lost after it recorded them and before it acknowledged them
    sent = [member.send(n) for n in range(2)]
    ack = BlockingChannel.basic_ack

    def connection_lost(channel: BlockingChannel, *args: Any, **kwargs: Any) -> None:
        channel.connection.close()
        ack(channel, *args, **kwargs)

    monkeypatch.setattr(BlockingChannel, "basic_ack", connection_lost)
    with pytest.raises(dramaturg.BrokerUnreachable, match="lost RabbitMQ"):
        dramaturg.purge_queue("imports", broker=broker)
    monkeypatch.undo()
    # and the limit's one slot taken by another task for a minute
    flow = next(m for m in broker.middleware if isinstance(m, FlowControl))
    assert flow.state(broker).acquire("another-task", "run-1", [LimitSpec("c", "shop", 1, 60_000)]) is None

    # When a worker takes what RabbitMQ gave back, then a task sent after them
    after.send()
    worker = start_worker(threads=1, queues={"imports"})
    assert ran.wait(1) == ["after"]
    worker.stop()

    # Then the purged tasks were dropped, not put back to wait for the slot as fresh copies
    assert pending_messages(broker, "imports") == 0
    assert {dramaturg.task_status(m.message_id, broker).state for m in sent} == {"purged"}


def test_a_purge_whose_batch_ends_fail_gives_its_tasks_back_to_run(
    broker: dramatiq.Broker, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from dramaturg import queue_admin

    ran = Runs()

    @dramaturg.actor(queue_name="imports")
    def member(n: int) -> None:
        ran.add(n)

    # Given four members of a batch waiting, and a purge that records them as purged and
    # then cannot end them in their batch (the store stops answering after the first end)
    batch = dramaturg.batch("ends fail")
    with batch:
        sent = [member.send(n) for n in range(4)]
    real, calls = queue_admin._end_one, []

    def fails_after_first(*args: Any) -> None:
        calls.append(1)
        if len(calls) > 1:
            raise redis.ConnectionError("the state store stopped answering")
        real(*args)

    monkeypatch.setattr(queue_admin, "_end_one", fails_after_first)
    with pytest.raises(dramaturg.BrokerUnreachable, match="taken last are back on the queue"):
        dramaturg.purge_queue("imports", broker=broker)
    monkeypatch.undo()

    # When a worker takes what was given back
    start_worker(queues={"imports"})

    # Then each task runs, as the error said, and ends succeeded (its record does not
    # say purged: on RabbitMQ a worker would drop it as purged)
    assert sorted(ran.wait(4)) == [0, 1, 2, 3]
    for message in sent:
        assert status_when(message.message_id, "succeeded").state == "succeeded"


@pytest.mark.parametrize("broker_kind", ["redis", "embedded"])
@pytest.mark.parametrize("finisher", ["next purge", "queue list", "worker"])
def test_a_purge_killed_before_recording_its_step_loses_none_of_it(
    finisher: str,
    settings: dramaturg.Settings,
    broker: Any,
    start_worker: Any,
    spawn: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dramaturg.brokers.redis import admin

    ran, report = Runs(), Runs()

    @dramaturg.actor(queue_name="imports", unique=dramaturg.unique(key="import:{0}"))
    def member(n: int) -> None:
        ran.add(n)

    @dramaturg.actor(queue_name="reports", actor_name="report")
    def on_complete(summary: dict[str, Any]) -> None:
        report.add(summary)

    # Given a batch of three members waiting, each holding a unique key, and a purge of
    # their queue killed (SIGKILL) once it has taken them off the queue, before it wrote
    # their records and batch ends
    batch = dramaturg.batch("killed purge", on_complete=on_complete.message())
    with batch:
        sent = [member.send(n) for n in range(3)]
    write_config(tmp_path, settings, modules=["tests.apps.purge_kill"])
    purge = spawn([bin_path("dramaturg"), "queue", "purge", "imports", "--yes"], PYTHONPATH=str(REPO), PURGE_KILL="1")
    purge.wait_for_line("took 3 task(s); killed")
    assert purge.popen.wait(timeout=WAIT_S) == -signal.SIGKILL
    assert pending_messages(broker, "imports") == 0
    assert "purged" not in {dramaturg.task_status(m.message_id, broker).state for m in sent}

    # When what it left is a minute old (here: at once), and the next purge of any queue
    # runs, or `dramaturg queue list`, or a worker is up
    monkeypatch.setattr(admin, "LEFT_STEP_MS", 0)
    if finisher == "next purge":
        broker.declare_queue("mail")
        assert dramaturg.purge_queue("mail", broker=broker) == 0
    if finisher == "queue list":
        result = run_cli([bin_path("dramaturg"), "queue", "list"], cwd=tmp_path, PYTHONPATH=str(REPO), LEFT_STEP_MS="0")
        assert result.returncode == 0, result.stderr
        (line,) = result.stderr.splitlines()  # says so in one line
        assert re.fullmatch(
            r"WARNING dramaturg.queue_admin: finished what a purge that stopped midway \(\d+ s ago\) left"
            r" unrecorded: 3 task\(s\) of imports recorded as purged",
            line,
        ), line
    if finisher != "worker":
        assert {dramaturg.task_status(m.message_id, broker).state for m in sent} == {"purged"}
    worker = start_worker(queues={"imports", "reports"})

    # Then the batch completes, its members cancelled, and on_complete fires once; each
    # record says purged, nothing purged ran, and the unique keys are free again
    (summary,) = report.wait(1)
    assert (summary["total"], summary["succeeded"], summary["cancelled"]) == (3, 0, 3)
    assert batch.status().state == "complete"
    for message in sent:
        status = dramaturg.task_status(message.message_id, broker)
        assert (status.state, status.reason) == ("purged", "purged from imports")
    again = member.send(0)
    assert (again.message_id != sent[0].message_id, again.options.get("dramaturg_duplicate")) == (True, None)
    assert ran.wait(1) == [0]
    worker.stop()
    assert (len(report.seen), ran.seen) == (1, [0])
    assert broker.client.zcard(f"{broker.namespace}:{admin.STEPS}") == 0


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_a_step_another_process_took_over_is_never_given_back(
    broker: dramatiq.Broker, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from dramaturg import queue_admin
    from dramaturg.brokers.redis import admin

    ran = Runs()

    @dramaturg.actor(queue_name="imports")
    def member(n: int) -> None:
        ran.add(n)

    # Given four tasks waiting, and a purge so slow to record them that another process
    # takes its step for left behind and finishes it; then its own writes fail
    sent = [member.send(n) for n in range(4)]
    real, slowed, taken_over = queue_admin._recorder, [], []

    def slow(broker: dramatiq.Broker, queue: str) -> queue_admin.OnPurged:
        if slowed:  # the other process's recorder
            return real(broker, queue)
        slowed.append(queue)

        def record(bodies: Any) -> None:
            monkeypatch.setattr(admin, "LEFT_STEP_MS", 0)
            taken_over.extend(queue_admin.finish_left_purges(broker))
            raise redis.ConnectionError("the state store stopped answering")

        return record

    monkeypatch.setattr(queue_admin, "_recorder", slow)
    with pytest.raises(dramaturg.BrokerUnreachable, match="the 4 taken last are purged too: another process took"):
        dramaturg.purge_queue("imports", broker=broker)
    monkeypatch.undo()
    assert [(step.queue, step.tasks) for step in taken_over] == [("imports", 4)]

    # When a worker runs the queue, and a task sent after
    member.send(-1)
    worker = start_worker(queues={"imports"})
    assert ran.wait(1) == [-1]
    worker.stop()

    # Then none of the four went back to run: their records say purged
    assert ran.seen == [-1]
    assert {dramaturg.task_status(m.message_id, broker).state for m in sent} == {"purged"}
