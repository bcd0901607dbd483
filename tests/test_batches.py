"""Batches: members counted by message id, sealed by the ``with`` block, callbacks fired once,
on RabbitMQ (with a Redis state store), Redis, embedded and eager."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.middleware import MiddlewareError

import dramaturg
from dramaturg import app
from dramaturg.batches.state import MemoryBatchState, RedisBatchState
from dramaturg.batches.summary import from_fields
from dramaturg.batches.tracker import BatchTracker, callback_id, tracker_of
from dramaturg.batches.writer import BatchWriter

from .conftest import (
    WAIT_S,
    Runs,
    bin_path,
    free_port,
    pending_messages,
    poll_until,
    run_cli,
    settings_with_state,
    switching_every_microsecond,
    write_config,
)

MODES = ("rabbitmq", "redis", "embedded", "eager")

#: The brokers with a queue between sending and running (not eager).
REAL_BROKERS = ["rabbitmq", "redis", "embedded"]


@pytest.fixture(params=MODES)
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Each test runs on every real broker and in eager mode."""
    return str(request.param)


@pytest.fixture
def settings(broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dramaturg.Settings:
    """A namespace of this test's own; RabbitMQ gets the private Redis as its state store."""
    return settings_with_state(broker_kind, request, tmp_path)


@pytest.fixture
def run_members(broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]) -> Callable[[], None]:
    """Start a worker for the members and callbacks (eager mode runs them in send())."""

    def start() -> None:
        if not getattr(broker, "runs_inline", False):
            start_worker()

    return start


class Callback:
    """An actor recording the summaries it was called with."""

    def __init__(self, name: str) -> None:
        self.calls = Runs()

        @dramaturg.actor(queue_name="batch-callbacks", actor_name=name)
        def callback(label: str, summary: dict[str, Any]) -> None:
            self.calls.add((label, summary))

        self.actor = callback


def test_a_batch_counts_every_outcome_and_fires_each_callback_once(
    broker: dramatiq.Broker, run_members: Callable[[], None]
) -> None:
    # Given members of which one holds (row 3) the first time it runs
    kicked = threading.Event()

    @dramaturg.actor(queue_name="batch-members", max_retries=0)
    def member(n: int) -> None:
        if n == 3 and not kicked.is_set():
            dramaturg.current_task().hold("row 3 has no email")

    report, notify = Callback("report"), Callback("notify")
    run_members()

    # When twenty members are sent in a batch with both callbacks
    batch = dramaturg.batch("import", on_complete=report.actor.message("done"), on_success=notify.actor.message("ok"))
    with batch:
        member.send_many(range(3), chunk_size=2)
        with contextlib.suppress(dramaturg.TaskHeld):  # eager mode: the held member's send() says so
            member.send(3)
        member.send_many(range(4, 20), chunk_size=7)

    # Then on_complete fires once with the summary: the held member counts as failed
    ((label, summary),) = report.calls.wait(1)
    assert label == "done"
    assert (summary["total"], summary["succeeded"], summary["failed"], summary["held"]) == (20, 19, 1, 1)
    assert summary["state"] == "complete" and summary["percent"] == 100.0
    status = dramaturg.batch_status(batch.id)
    assert (status.total, status.ended, status.pending, status.running) == (20, 20, 0, 0)
    assert not status.succeeded_all and status.finished_at is not None
    assert notify.calls.seen == []

    # When the held member is kicked and succeeds
    kicked.set()
    try:
        assert dramaturg.held_tasks().kick("batch-members") == 1
    except dramaturg.TaskHeld:
        pytest.fail("the kicked member was held again")

    # Then it moves from failed to succeeded, and on_success fires once
    ((label, summary),) = notify.calls.wait(1)
    assert (label, summary["succeeded"], summary["failed"], summary["held"]) == ("ok", 20, 0, 0)
    assert dramaturg.batch_status(batch.id).succeeded_all
    assert len(report.calls.seen) == 1


def test_members_sent_by_members_join_the_batch_and_a_nested_batch_counts_as_one(
    broker: dramatiq.Broker, run_members: Callable[[], None]
) -> None:
    # Given a member that sends five more members from inside itself
    @dramaturg.actor(queue_name="batch-members")
    def leaf(n: int) -> None:
        pass

    @dramaturg.actor(queue_name="batch-members")
    def fan_out(n: int) -> None:
        for child in range(n):
            leaf.send(child)

    report = Callback("report")
    run_members()

    # When the batch holds one of them and a nested batch of two
    batch = dramaturg.batch("fan out", on_complete=report.actor.message("done"))
    with batch:
        fan_out.send(5)
        with dramaturg.batch("inner"):
            leaf.send(100)
            leaf.send(101)

    # Then it completes once, counting the children and the nested batch as one member
    ((_, summary),) = report.calls.wait(1)
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (7, 7, 0)
    assert summary["succeeded_all"] is True  # on_success fired in the same step
    inner = [b for b in dramaturg.batches() if b.name == "inner"]
    assert [(b.total, b.succeeded, b.parent) for b in inner] == [(2, 2, batch.id)]


# Not in eager mode: every member runs inside the block (the test above covers its fan-out).
@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_a_member_that_fans_out_after_the_seal_never_makes_it_fire_early(
    broker: dramatiq.Broker, run_members: Callable[[], None]
) -> None:
    sealed, go = threading.Event(), threading.Event()

    # Given a member that fans out only once the batch is sealed, into children that wait
    @dramaturg.actor(queue_name="batch-members")
    def child(n: int) -> None:
        go.wait(20)

    @dramaturg.actor(queue_name="batch-members")
    def fan_out(n: int) -> None:
        sealed.wait(20)
        for number in range(n):
            child.send(number)

    report = Callback("report")
    run_members()
    batch = dramaturg.batch("late fan-out", on_complete=report.actor.message("done"))
    with batch:
        fan_out.send(3)
    sealed.set()

    # When the fan-out member has ended (its children joined before that)
    status = poll_until(
        lambda: (s := dramaturg.batch_status(batch.id)).succeeded == 1 and s, "the fan-out member ended"
    )

    # Then the sealed batch waits for its children
    assert (status.state, status.total, status.ended) == ("running", 4, 1)
    assert report.calls.seen == []

    # and completes once they have ended
    go.set()
    ((_, summary),) = report.calls.wait(1)
    assert (summary["total"], summary["succeeded"]) == (4, 4)


def test_no_callback_fires_before_the_batch_is_sealed(broker: dramatiq.Broker, run_members: Callable[[], None]) -> None:
    # Given a batch whose only member has ended
    ended = Runs()

    @dramaturg.actor(queue_name="batch-members")
    def member() -> None:
        ended.add(1)

    report = Callback("report")
    run_members()
    batch = dramaturg.batch("late seal", on_complete=report.actor.message("done"))
    with batch:
        member.send()
        ended.wait(1)
        poll_until(lambda: dramaturg.batch_status(batch.id).ended == 1, "the member's end is recorded")

        # Then nothing fires while the block is open
        assert report.calls.seen == []
        assert dramaturg.batch_status(batch.id).state == "open"

    # When the block ends, on_complete fires, with the message id derived from the batch
    ((_, summary),) = report.calls.wait(1)
    assert summary["total"] == 1
    assert callback_id(batch.id, "complete") == callback_id(batch.id, "complete") != callback_id(batch.id, "success")


# Not in eager mode: the member runs inside send(), nobody can look while it runs.
@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_progress_from_a_member_shows_in_the_batch_status(
    broker: dramatiq.Broker, run_members: Callable[[], None]
) -> None:
    release = threading.Event()

    @dramaturg.actor(queue_name="batch-members")
    def slow() -> None:
        dramaturg.current_task().progress(0.4, "row 4,000 of 10,000")
        release.wait(20)

    run_members()
    batch = dramaturg.batch("progress")
    with batch:
        first = slow.send()
        slow.send()

    status = poll_until(
        lambda: (s := dramaturg.batch_status(batch.id)).running == 2 and len(s.progress) == 2 and s,
        "both members running with their progress",
    )
    assert [(p.fraction, p.text) for p in status.progress] == [(0.4, "row 4,000 of 10,000")] * 2
    assert status.percent == 40.0
    # and in the task's own status
    task = poll_until(
        lambda: (t := dramaturg.task_status(first.message_id)).progress is not None and t, "the task's progress"
    )
    assert (task.progress, task.progress_text) == (0.4, "row 4,000 of 10,000")
    release.set()
    poll_until(lambda: dramaturg.batch_status(batch.id).state == "complete", "the batch completes")
    assert dramaturg.batch_status(batch.id).progress == []


def test_an_unknown_batch_is_a_clear_error(broker: dramatiq.Broker) -> None:
    with pytest.raises(dramaturg.BatchNotFound, match="no batch 'nope'"):
        dramaturg.batch_status("nope")


# Not in eager mode: the commands read another process's store; eager keeps it in memory.
@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_the_batch_commands(
    settings: dramaturg.Settings, broker: dramatiq.Broker, run_members: Callable[[], None], tmp_path: Path
) -> None:

    @dramaturg.actor(queue_name="batch-members")
    def member(n: int) -> None:
        pass

    run_members()
    batch = dramaturg.batch("import users.csv")
    with batch:
        member.send_many(range(30))
    poll_until(lambda: dramaturg.batch_status(batch.id).state == "complete", "the batch completes")
    write_config(tmp_path, settings)
    dramaturg_cli = bin_path("dramaturg")

    listed = run_cli([dramaturg_cli, "batch", "list"], cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert batch.id in listed.stdout and "import users.csv" in listed.stdout

    shown = run_cli([dramaturg_cli, "batch", "show", batch.id, "--json"], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["succeeded"] == 30

    watched = run_cli([dramaturg_cli, "batch", "watch", batch.id], cwd=tmp_path)
    assert watched.returncode == 0, watched.stderr
    assert "30/30" in watched.stdout and "complete" in watched.stdout

    unknown = run_cli([dramaturg_cli, "batch", "show", "nope"], cwd=tmp_path)
    assert unknown.returncode == 1
    assert unknown.stderr.strip().splitlines() == [
        "dramaturg: no batch 'nope': never made, or expired after it ended ([batch] ttl)"
    ]


# -- faults ---------------------------------------------------------------------------------


class Refuse(dramatiq.Middleware):
    """Refuses to send messages of the actor "refused" (after the batch middleware joined them)."""

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        if message.actor_name == "refused":
            raise MiddlewareError("refused by the test")


def test_a_member_whose_send_fails_leaves_the_batch(broker: dramatiq.Broker, run_members: Callable[[], None]) -> None:
    # Given a broker that refuses one actor's messages after they joined their batch
    broker.add_middleware(Refuse())

    @dramaturg.actor(queue_name="batch-members")
    def member() -> None:
        pass

    @dramaturg.actor(queue_name="batch-members", actor_name="refused")
    def refused() -> None:
        pass

    report = Callback("report")
    run_members()

    # When one member is sent, one is refused, and one more is sent
    batch = dramaturg.batch("refusals", on_complete=report.actor.message("done"))
    with batch:
        member.send()
        with pytest.raises(MiddlewareError):
            refused.send()
        member.send()
        with pytest.raises(MiddlewareError):
            refused.send()  # the last send of the block

    # Then the batch counts the two that were sent, and completes
    ((_, summary),) = report.calls.wait(1)
    assert (summary["total"], summary["succeeded"]) == (2, 2)


@pytest.mark.parametrize("broker_kind", ["eager"])  # where send_many stops at a held member
def test_eager_send_many_stopped_by_a_held_member_leaves_only_what_ran(broker: dramatiq.Broker) -> None:
    @dramaturg.actor(queue_name="batch-members", max_retries=0)
    def member(n: int) -> None:
        if n == 3:
            dramaturg.current_task().hold("row 3")

    batch = dramaturg.batch("stopped")
    with batch, pytest.raises(dramaturg.BulkSendError):
        member.send_many(range(10))

    status = dramaturg.batch_status(batch.id)
    assert (status.state, status.total, status.succeeded, status.held) == ("complete", 4, 3, 1)


def test_a_member_is_not_sent_when_the_state_store_is_down(rabbitmq_server: Any, tmp_path: Path) -> None:
    # Given RabbitMQ with a state store of its own, which stops after the batch is made
    port = free_port()
    store = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    )
    try:
        client = redis.Redis(port=port)
        poll_until(lambda: _pings(client), "the state store answers")
        settings = dramaturg.Settings(
            broker={
                "url": f"amqp://guest:guest@{rabbitmq_server.host}:{rabbitmq_server.port}/%2F",
                "namespace": "test-batch-down",
            },
            state={"url": f"redis://127.0.0.1:{port}/0"},
        )
        broker = dramaturg.bootstrap(settings)

        @dramaturg.actor(queue_name="batch-down")
        def member(n: int) -> None:
            pass

        batch = dramaturg.batch("doomed")
        store.kill()
        store.wait()

        # When a member is sent, one by one or in bulk
        with batch:
            with pytest.raises(dramaturg.BatchSendError, match="the message was not sent"):
                member.send(1)
            with pytest.raises(dramaturg.BulkSendError) as bulk:
                member.send_many(range(10))
            assert bulk.value.sent == 0 and len(bulk.value.unsent) == 10
            # Then nothing reached the queue
            assert pending_messages(broker, "batch-down") == 0
            batch._closed = True  # sealing needs the store too; nothing to seal
    finally:
        store.kill()
        store.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_the_last_two_ends_racing_fire_on_complete_once(redis_server: Any) -> None:
    # Given a sealed batch of two members, many times over, on Redis and in memory
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    for state in (RedisBatchState(client, namespace="test-race", ttl_ms=60_000), MemoryBatchState(ttl_ms=60_000)):
        for round_ in range(100):
            batch_id = f"race-{round_}"
            state.create(batch_id, {"name": "race", "created_at": "1"})
            state.add(batch_id, ["a", "b"])
            assert state.seal(batch_id) == []
            barrier = threading.Barrier(2)
            fired: list[list[str]] = []

            def finish(member: str, state: Any, batch_id: str, barrier: Any, fired: list[list[str]]) -> None:
                barrier.wait()
                fired.extend(state.end([(batch_id, member, "s")]))

            # When two threads end the last two members at the same instant
            threads = [threading.Thread(target=finish, args=(m, state, batch_id, barrier, fired)) for m in ("a", "b")]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

            # Then exactly one of them fires complete and success
            assert sorted(map(tuple, fired)) == [(), ("complete", "success")], (state, round_, fired)


def test_a_repeated_end_counts_once_and_a_kicked_member_moves_to_succeeded(redis_server: Any) -> None:
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    for state in (RedisBatchState(client, namespace="test-repeat", ttl_ms=60_000), MemoryBatchState(ttl_ms=60_000)):
        state.create("b", {"name": "repeat", "created_at": "1"})
        assert state.add("b", ["a", "b", "a"]) == 2
        state.seal("b")
        writer = BatchWriter(state)
        assert writer.end(("b", "a", "s")) == []
        assert writer.end(("b", "a", "s")) == []  # a redelivered member that succeeded again
        assert writer.end(("b", "b", "h")) == ["complete"]
        assert writer.end(("b", "b", "h")) == ["complete"]  # repeated while "firing": the same callback again
        state.sent("b", "complete")
        assert writer.end(("b", "b", "h")) == []  # published: never again
        assert writer.end(("b", "b", "s")) == ["success"]  # kicked, then succeeded
        state.sent("b", "success")
        assert writer.end(("b", "a", "f")) == []  # a succeeded member never leaves "succeeded"
        meta, _ = state.read("b")  # type: ignore[misc]
        assert (meta["total"], meta["succeeded"], meta["failed"], meta["held"]) == ("2", "2", "0", "0")
        # A last member whose worker died before its callbacks were published runs again,
        # and this time ends otherwise (held): they go out again, and it stays succeeded
        state.create("c", {"name": "rerun", "created_at": "1"})
        state.add("c", ["x"])
        state.seal("c")
        assert writer.end(("c", "x", "s")) == ["complete", "success"]
        assert writer.end(("c", "x", "h")) == ["complete", "success"]
        meta, _ = state.read("c")  # type: ignore[misc]
        assert (meta["succeeded"], meta["failed"]) == ("1", "0")
        writer.close()


def test_members_a_producer_or_worker_of_the_version_before_wrote_as_letters_still_count(redis_server: Any) -> None:
    # Given a batch whose members the version before 2026-12-03 wrote (as letters: sent,
    # running, held), sealed, beside one member this version added (a number)
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    state = RedisBatchState(client, namespace="test-letters", ttl_ms=60_000)
    state.create("b", {"name": "letters", "created_at": "1"})
    state.add("b", ["new"])
    client.hset(state.prefix + "b:m", mapping={"sent": "p", "running": "r", "held": "h", "dropped": "p"})
    client.hset(state.prefix + "b", mapping={"total": 5, "running": 1, "failed": 1, "held": 1})
    state.seal("b")
    assert state.members("b") == {"new": "p", "sent": "p", "running": "r", "held": "h", "dropped": "p"}

    # When one is dropped, one noted running, and every other ends in one call (the held
    # one kicked and succeeded)
    state.drop("b", ["dropped"])
    state.note([("b", "sent", "r", "")])
    answers = state.end([("b", "new", "s"), ("b", "sent", "s"), ("b", "running", "s"), ("b", "held", "s")])

    # Then each counts once, as it would have: the batch completes, all succeeded
    meta, _ = state.read("b")  # type: ignore[misc]
    assert answers[-1] == ["complete", "success"]
    assert {name: meta[name] for name in ("total", "running", "succeeded", "failed", "held")} == {
        "total": "4",
        "running": "0",
        "succeeded": "4",
        "failed": "0",
        "held": "0",
    }
    assert state.members("b") == {"new": "s", "sent": "s", "running": "s", "held": "s"}


def test_running_is_written_for_members_running_at_a_flush_and_again_after_a_retry(redis_server: Any) -> None:
    # Given a sealed batch of three members and a process's batch writer (flushed by hand:
    # a long interval keeps its own thread out of the way)
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    state = RedisBatchState(client, namespace="test-running", ttl_ms=60_000)
    state.create("b", {"name": "running", "created_at": "1"})
    state.add("b", ["short", "long", "retried"])
    state.seal("b")
    writer = BatchWriter(state, flush_interval_s=3600)

    def running() -> tuple[str, dict[str, str]]:
        meta, _ = state.read("b")  # type: ignore[misc]
        return meta.get("running", "0"), state.members("b")

    # When one member starts and ends between two flushes, and two are still running at one
    writer.start("short", "b")
    writer.running.pop("short")
    writer.start("long", "b")
    writer.start("retried", "b")
    writer.flush()
    # Then only the two show as running
    assert running() == ("2", {"short": "p", "long": "r", "retried": "r"})

    # When one is sent back to wait (a retry) and starts again before the next flush
    writer.running.pop("retried")
    writer.note(("b", "retried", "w", ""))
    writer.start("retried", "b")
    writer.flush()
    # Then it is running again, counted once
    assert running() == ("2", {"short": "p", "long": "r", "retried": "r"})

    # When one ends, the other is sent back to wait again, and the next flush finds nothing running
    writer.running.pop("long")
    assert writer.end(("b", "long", "s")) == []
    writer.running.pop("retried")
    writer.note(("b", "retried", "w", ""))
    writer.flush()
    # Then neither counts as running: one succeeded, the other waits
    assert running() == ("0", {"short": "p", "long": "s", "retried": "p"})
    writer.close()


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_a_member_skipped_after_it_started_is_not_left_running(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given a middleware after the batch tracker that skips a member's first delivery (as
    # a limit that puts it back does), and one before it that tells when the skip is over
    # (after-hooks run in reverse order: the tracker's has run by then)
    skipped = threading.Event()

    class SkipOnce(dramatiq.Middleware):
        def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
            if message.actor_name == "skipped_member" and not skipped.is_set():
                raise dramatiq.middleware.SkipMessage()

    class SkipSeen(dramatiq.Middleware):
        def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
            skipped.set()

    broker.add_middleware(SkipOnce())
    broker.add_middleware(SkipSeen(), before=BatchTracker)

    @dramaturg.actor(queue_name="batch-skip")
    def skipped_member(n: int) -> None:
        pass

    # When a member is skipped after the tracker saw it start
    batch = dramaturg.batch("skipped")
    with batch:
        skipped_member.send(1)
    start_worker()
    assert skipped.wait(10)
    tracker_of(broker).writer(broker).flush()

    # Then it does not show as running: it waits
    status = batch.status()
    assert (status.running, status.pending) == (0, 1), status


def test_one_call_of_many_ends_counts_as_the_ends_one_by_one(redis_server: Any) -> None:
    # batch.lua adds up a call's changes per batch and writes each count once: the sums
    # must be those of the ends taken one at a time (the in-memory store's), across two
    # batches, a running member, a member unknown to its batch, and a member ended twice
    # in the same call (held, then kicked and succeeded)
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    ends = [
        ("one", "a", "s"),
        ("two", "x", "h"),
        ("one", "b", "h"),
        ("one", "r", "s"),
        ("two", "y", "c"),
        ("one", "b", "s"),
        ("one", "stranger", "f"),
        ("two", "z", "s"),
        ("two", "x", "h"),
        ("one", "c", "s"),
    ]
    counts = ("total", "running", "succeeded", "failed", "held", "cancelled", "complete")
    seen = []
    for state in (RedisBatchState(client, namespace="test-sums", ttl_ms=60_000), MemoryBatchState(ttl_ms=60_000)):
        # Given two sealed batches, one member of the first running
        for batch_id, members in (("one", ["a", "b", "c", "r"]), ("two", ["x", "y", "z"])):
            state.create(batch_id, {"name": batch_id, "created_at": "1"})
            state.add(batch_id, members)
            state.seal(batch_id)
        state.note([("one", "r", "r", ""), ("one", "r", "g", "0.5000|half"), ("one", "a", "g", "0.1000|started")])
        # When all their ends come in one call
        answers = state.end(ends)
        # Then each batch fires in that call (on Redis at its last end there), and its counts are the sums
        if isinstance(state, RedisBatchState):
            assert answers == [[]] * 8 + [["complete"], ["complete"]], answers
            # each member keeps its last end of the call (read and written once per batch),
            # and the progress of members that ended is gone
            members = {b: state.members(b) for b in ("one", "two")}
            assert members == {
                "one": {"a": "s", "b": "s", "c": "s", "r": "s", "stranger": "f"},
                "two": {"x": "h", "y": "c", "z": "s"},
            }
            assert client.hgetall("test-sums:__batch__:one:p") == {}
        seen.append([tuple(state.read(b)[0].get(name) for name in counts) for b in ("one", "two")])  # type: ignore[index]
    assert seen[0] == seen[1]
    assert seen[0][0][:6] == ("5", "0", "4", "1", "0", "0")
    assert seen[0][1][:6] == ("3", "0", "1", "1", "1", "1")


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
@pytest.mark.parametrize("outcome", ["held", "succeeded"])
def test_a_callback_published_whose_mark_was_lost_is_not_published_again(
    broker: dramatiq.Broker,
    start_worker: Callable[..., dramatiq.Worker],
    monkeypatch: pytest.MonkeyPatch,
    outcome: str,
) -> None:
    # Given workers that look for callbacks left unpublished every 100 ms, and a state
    # store that fails the "published" mark after on_complete was published (the mark's
    # three tries)
    import dramatiq.worker

    monkeypatch.setattr(dramatiq.worker, "POST_PROCESS_MESSAGE_RETRY_DELAY_SECS", 0.1)
    refuse_publishes(monkeypatch, 0, refire_every_s=0.1, refire_after_ms=1000)
    marks = [3]
    sent = RedisBatchState.sent

    def failing(state: RedisBatchState, *args: Any) -> None:
        if marks[0] > 0:
            marks[0] -= 1
            raise redis.ConnectionError("the state store did not answer")
        sent(state, *args)

    monkeypatch.setattr(RedisBatchState, "sent", failing)

    @dramaturg.actor(queue_name="batch-members", max_retries=0)
    def member(n: int) -> None:
        if outcome == "held":
            dramaturg.current_task().hold("row has no email")

    report = Callback("report")

    # When the batch's one member ends, held (its end written by the worker's after-hook:
    # the batch is left "firing" for the workers' sweep) or succeeded (its end written with
    # its acknowledgement, which is tried again), and the callback went out
    batch = dramaturg.batch("mark lost", on_complete=report.actor.message("done"))
    with batch:
        member.send(1)
    start_worker(threads=1)
    report.calls.wait(1)
    state = tracker_of(broker).state(broker)
    poll_until(lambda: (state.read(batch.id) or ({}, {}))[0].get("complete") == "sent", "on_complete marked sent")

    # Then the callback was only marked, not published again (the sweep found its trace;
    # the acknowledgement's retry knew it had published it): what the callbacks' queue
    # runs next is a later message, not the callback again
    report.actor.send("later", {})
    assert [label for label, _ in report.calls.wait(2)] == ["done", "later"]
    assert marks == [0]


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_a_nested_batch_whose_publisher_died_after_publishing_still_ends_in_its_parent(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch holding a nested batch, whose one member is held (its end written by
    # the worker's after-hook), and a worker that dies, in effect, right after it published
    # the nested batch's on_complete: nothing marked published, the outer batch not told
    # (the fire stops there), while workers look for callbacks left unpublished often
    refuse_publishes(monkeypatch, 0, refire_every_s=0.1, refire_after_ms=1000)
    fire = BatchTracker.fire
    died: list[str] = []

    def dying(tracker: BatchTracker, broker: dramatiq.Broker, batch_id: str, events: Any, **kwargs: Any) -> None:
        state = tracker.state(broker)
        found = state.read(batch_id)
        if not died and found is not None and found[0].get("parent") and events:
            died.append(batch_id)
            meta, progress = found
            summary = from_fields(batch_id, meta, progress).to_dict()
            for event in events:
                tracker._publish(broker, batch_id, event, json.loads(meta[f"on_{event}"]), summary)
            return
        fire(tracker, broker, batch_id, events, **kwargs)

    monkeypatch.setattr(BatchTracker, "fire", dying)

    @dramaturg.actor(queue_name="batch-members", max_retries=0)
    def member(n: int) -> None:
        dramaturg.current_task().hold("row has no email")

    inner_report, outer_report = Callback("inner-report"), Callback("outer-report")

    # When the nested batch's member ends
    outer = dramaturg.batch("outer", on_complete=outer_report.actor.message("outer done"))
    with outer, dramaturg.batch("inner", on_complete=inner_report.actor.message("inner done")):
        member.send(1)
    start_worker(threads=1)

    # Then a worker finds the nested batch's callback out (its trace), marks it, and ends
    # the nested batch in the outer one, which completes: each callback ran once
    ((_, summary),) = outer_report.calls.wait(1)
    assert (summary["total"], summary["failed"]) == (1, 1)
    assert len(died) == 1
    assert [label for label, _ in inner_report.calls.seen] == ["inner done"]
    state = tracker_of(broker).state(broker)
    poll_until(lambda: (state.read(died[0]) or ({}, {}))[0].get("complete") == "sent", "inner marked sent")
    assert len(inner_report.calls.seen) == 1
    assert len(outer_report.calls.seen) == 1


def test_the_batch_writer_goes_on_when_what_its_kept_ends_fired_cannot_be_published(redis_server: Any) -> None:
    # Given two batches of one member each, sealed, and a state store whose writes of ends
    # fail four times in a row (the end's write and the durable write's three tries), so
    # that each end is kept for the writer's background thread
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    state = RedisBatchState(client, namespace=f"test-writer-{uuid.uuid4().hex}", ttl_ms=60_000)
    for batch_id in ("b1", "b2"):
        state.create(batch_id, {"name": batch_id, "created_at": "1"})
        state.add(batch_id, ["m"])
        state.seal(batch_id)
    failures = [0]
    end = state.end

    def failing(ends: Any, **kwargs: Any) -> list[list[str]]:
        if failures[0] > 0:
            failures[0] -= 1
            raise redis.ConnectionError("the state store does not answer")
        return end(ends, **kwargs)

    state.end = failing  # type: ignore[method-assign]
    writer = BatchWriter(state)
    fired: list[str] = []
    first, published = threading.Event(), threading.Event()

    def on_written(written: list[Any]) -> None:
        fired.extend(item[0][0] for item in written)
        if len(fired) == 1:
            first.set()
            raise redis.ConnectionError("publishing what fired failed")
        published.set()

    writer.on_written = on_written
    try:
        # When the first end is written by the background thread and publishing what it
        # fired raises, and then a second end is kept the same way
        failures[0] = 4
        assert writer.end_durably(("b1", "m", "s")) == []
        assert first.wait(WAIT_S)
        failures[0] = 4
        assert writer.end_durably(("b2", "m", "s")) == []

        # Then the thread is still there to write it, and hands on what it fired
        assert published.wait(WAIT_S)
        assert fired == ["b1", "b2"]
        assert state.read("b2")[0]["complete"] == "firing"  # type: ignore[index]
    finally:
        writer.close()


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_a_member_whose_worker_is_killed_runs_again_and_counts_once(
    settings: dramaturg.Settings, broker: dramatiq.Broker, spawn: Callable[..., Any], tmp_path: Path
) -> None:
    from tests.apps import crash_tasks

    from .test_recovery import events, start_workers, wait_for_event

    # Given two worker processes (separate groups), and a batch of one member that
    # blocks on its first run
    app.register(crash_tasks.stall)
    write_config(tmp_path, settings, modules=["tests.apps.crash_tasks"])
    crash_log = tmp_path / "crash.log"
    start_workers(spawn, 2, CRASH_LOG=str(crash_log))
    batch = dramaturg.batch("killed")
    with batch:
        crash_tasks.stall.send(120.0)

    # When the worker running it is killed
    first = wait_for_event(crash_log, lambda e: e.event == "start")
    os.kill(first.pid, signal.SIGKILL)

    # Then it runs again on the other worker, and the batch counts it once
    wait_for_event(crash_log, lambda e: e.event == "end")
    status = poll_until(
        lambda: (s := dramaturg.batch_status(batch.id)).state == "complete" and s, "the batch completes"
    )
    assert [e.event for e in events(crash_log)] == ["start", "start", "end"]
    assert (status.total, status.succeeded, status.failed, status.running, status.pending) == (1, 1, 0, 0, 0)


def test_rabbitmq_without_a_state_store_says_what_to_set(rabbitmq_server: Any) -> None:
    url = f"amqp://guest:guest@{rabbitmq_server.host}:{rabbitmq_server.port}/%2F"
    dramaturg.bootstrap(dramaturg.Settings(broker={"url": url, "namespace": "test-batch-nostore"}))
    with pytest.raises(dramaturg.StateUnavailable, match=r"batches need a state store.*\[state\] url"):
        dramaturg.batch("nowhere")


def test_ends_from_many_threads_of_two_processes_count_exactly_and_fire_once(redis_server: Any) -> None:
    # Given a sealed batch of 400 members, and two writers (as two worker processes have)
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    states = [
        RedisBatchState(redis.Redis(host=redis_server.host, port=redis_server.port), namespace=namespace, ttl_ms=60_000)
        for _ in range(2)
    ]
    states[0].create("b", {"name": "many", "created_at": "1"})
    members = [f"m{n}" for n in range(400)]
    states[0].add("b", members)
    states[0].seal("b")
    writers = [BatchWriter(state) for state in states]
    fired: list[str] = []
    start = threading.Barrier(8)

    def end_share(index: int) -> None:
        start.wait()
        for member in members[index::8]:
            fired.extend(writers[index % 2].end(("b", member, "s")))

    # When eight threads, four per writer, end them all at once
    threads = [threading.Thread(target=end_share, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then every member counts once, and each callback fires once
    meta, _ = states[0].read("b")  # type: ignore[misc]
    assert (meta["total"], meta["succeeded"], meta["failed"], meta["running"]) == ("400", "400", "0", "0")
    assert sorted(fired) == ["complete", "success"]


def test_a_member_taken_out_unsent_lets_its_batch_complete(redis_server: Any) -> None:
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    for state in (RedisBatchState(client, namespace=namespace, ttl_ms=60_000), MemoryBatchState(ttl_ms=60_000)):
        # Given a sealed batch of two members, one of which has ended
        state.create("b", {"name": "drop", "created_at": "1"})
        state.add("b", ["sent", "unsent"])
        assert state.seal("b") == []
        assert state.end([("b", "sent", "s")]) == [[]]

        # When the other is taken out (its send failed), and then the ended one too
        assert state.drop("b", ["unsent"]) == ["complete", "success"]
        assert state.drop("b", ["sent"]) == []

        # Then the batch completed with the one member that ran, which stays
        meta, _ = state.read("b")  # type: ignore[misc]
        assert (meta["total"], meta["succeeded"]) == ("1", "1")


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_on_redis_a_members_end_costs_no_call_of_its_own(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given a Redis broker keeping its batches in its own Redis, and a worker of one thread
    # (so that no two ends or acknowledgements could share a call anyway)
    runs = Runs()

    @dramaturg.actor(queue_name="batch-members")
    def member(n: int) -> None:
        runs.add(n)

    report = Callback("report")
    start_worker(threads=1)
    client: Any = broker.client  # type: ignore[attr-defined]

    def script_calls() -> int:
        stats = client.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha"))

    # When 100 tasks are drained alone, then 100 as the members of a batch
    client.config_resetstat()
    member.send_many(range(100))
    runs.wait(100)
    plain = script_calls()
    client.config_resetstat()
    batch = dramaturg.batch("costs", on_complete=report.actor.message("done"))
    with batch:
        member.send_many(range(100, 200))
    assert runs.wait(200)[100:] == list(range(100, 200))
    batched = script_calls()  # read as the plain one was: at the last run (not after the callback's)
    report.calls.wait(1)

    # Then the batch's drain took about as many script calls as the plain one: each
    # member's end was written by the call that acknowledged it (a call per end would be 100 more)
    assert batched - plain < 30, (plain, batched)
    assert batch.status().succeeded == 100


@pytest.mark.parametrize("broker_kind", ["redis", "embedded"])
def test_on_redis_a_member_joins_its_batch_in_the_call_that_enqueues_it(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a Redis broker keeping its batches in its own Redis, and every join of its own watched
    joins: list[int] = []
    add = RedisBatchState.add

    def watched(state: RedisBatchState, batch_id: str, member_ids: Any) -> int:
        joins.append(len(member_ids))
        return add(state, batch_id, member_ids)

    monkeypatch.setattr(RedisBatchState, "add", watched)

    @dramaturg.actor(queue_name="batch-members")
    def leaf(n: int) -> None:
        pass

    @dramaturg.actor(queue_name="batch-members")
    def fan_out(n: int) -> None:
        for child in range(n):
            leaf.send(child)

    report = Callback("report")
    client: Any = broker.client  # type: ignore[attr-defined]

    def script_calls() -> int:
        stats = client.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha"))

    # When ten members are sent one by one inside the block (no worker yet), counting the
    # script calls of the sends alone, and then one of them fans out into ten more
    batch = dramaturg.batch("joined", on_complete=report.actor.message("done"))
    with batch:
        leaf.send(0)  # the first loads the script into Redis
        client.config_resetstat()
        for n in range(1, 9):
            leaf.send(n)
        fan_out.send(10)
        calls = script_calls()
        assert (batch.status().total, pending_messages(broker, "batch-members")) == (10, 10)
    start_worker()

    # Then each send was one script call, its join and its enqueue (two before), none
    # joined with a call of its own, and the fan-out's members counted as they ran
    assert calls == 9
    ((_, summary),) = report.calls.wait(1)
    assert (summary["total"], summary["succeeded"]) == (20, 20)
    assert joins == []


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_a_send_into_a_batch_that_is_gone_fails_and_enqueues_nothing(broker: dramatiq.Broker) -> None:
    # Given a batch whose keys expired while its block was still open
    @dramaturg.actor(queue_name="batch-members")
    def member() -> None:
        pass

    batch = dramaturg.batch("expired")
    state: Any = tracker_of(broker).state(broker)
    state.client.delete(state.prefix + batch.id)

    # When a member is sent into it (and the block's end seals it, which finds it gone too)
    with pytest.raises(dramaturg.BatchNotFound), batch, pytest.raises(dramaturg.BatchSendError, match="is gone"):
        member.send()

    # Then nothing was enqueued, and the batch got no member
    assert pending_messages(broker, "batch-members") == 0
    assert not state.client.exists(state.prefix + batch.id, state.prefix + batch.id + ":m")


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_a_unique_task_sent_through_the_broker_into_a_gone_batch_gives_its_key_back(broker: dramatiq.Broker) -> None:
    # Given a unique actor, and a batch whose keys expired while its block was still open
    @dramaturg.actor(queue_name="batch-members", unique=dramaturg.unique(key="only:{0}"))
    def member(n: int) -> None:
        pass

    batch = dramaturg.batch("expired")
    state: Any = tracker_of(broker).state(broker)
    state.client.delete(state.prefix + batch.id)

    # When a member is enqueued into it through the broker (as Dramatiq's group and pipeline
    # do, not through Actor.send), which fails
    with pytest.raises(dramaturg.BatchNotFound), batch, pytest.raises(dramaturg.BatchSendError, match="is gone"):
        broker.enqueue(member.message(1))

    # Then its unique key was given back: the same task sent afterwards is sent, not a duplicate
    again = member.send(1)
    assert not again.options.get("dramaturg_duplicate")
    assert pending_messages(broker, "batch-members") == 1


@pytest.mark.parametrize("broker_kind", ["rabbitmq"])
def test_on_rabbitmq_the_end_writer_thread_writes_the_ends_of_the_acknowledgements_together(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given RabbitMQ with its batches in a Redis state store, and every write of ends watched
    calls: list[tuple[str, int]] = []
    end = RedisBatchState.end

    def watched(state: RedisBatchState, ends: Any, **kwargs: Any) -> list[list[str]]:
        calls.append((threading.current_thread().name, len(ends)))
        return end(state, ends, **kwargs)

    monkeypatch.setattr(RedisBatchState, "end", watched)
    runs = Runs()

    @dramaturg.actor(queue_name="batch-members")
    def member(n: int) -> None:
        runs.add(n)

    report = Callback("report")

    # When 200 members of a batch are drained by 8 worker threads
    batch = dramaturg.batch("together", on_complete=report.actor.message("done"))
    with batch:
        member.send_many(range(200))
    start_worker(threads=8)

    # Then every end was written by the process's end writer, none by a worker thread
    # waiting for it nor by a consumer's thread (which serves the connection), many in a
    # call, and the batch counted each member once
    ((_, summary),) = report.calls.wait(1)
    assert (summary["total"], summary["succeeded"]) == (200, 200)
    assert sorted(runs.wait(200)) == list(range(200))
    assert {name for name, _ in calls} == {"dramaturg-batch-ends"}, calls
    assert sum(size for _, size in calls) == 200
    assert len(calls) < 200


@pytest.mark.parametrize("broker_kind", ["rabbitmq"])
def test_on_rabbitmq_a_lone_end_is_written_at_once_and_ends_that_keep_coming_in_rounds(
    broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dramaturg.brokers.rabbitmq import ends

    # Given a batch of 14 members sent, no worker, and an end writer of its own (its calls
    # of the state store watched) for a consumer of prefetch 16, whose rounds wait 0.5 s
    calls: list[int] = []
    end = RedisBatchState.end

    def watched(state: RedisBatchState, items: Any, **kwargs: Any) -> list[list[str]]:
        calls.append(len(items))
        return end(state, items, **kwargs)

    monkeypatch.setattr(RedisBatchState, "end", watched)
    monkeypatch.setattr(ends, "ROUND_WAIT_S", 0.5)

    @dramaturg.actor(queue_name="batch-members")
    def member(n: int) -> None:
        pass

    batch = dramaturg.batch("in rounds")
    with batch:
        ids = [member.send(n).message_id for n in range(14)]

    class Consumer:  # what the writer hands back to (RabbitmqConsumer's side of it)
        ends_dropped = False

        def __init__(self) -> None:
            self.acked = Runs()

        def ends_written(self, acks: list[int], rejects: list[int]) -> None:
            for tag in acks:
                self.acked.add(tag)

    consumer = Consumer()
    writer = ends.RabbitmqEndWriter(broker)
    writer.fit(16)

    def submit(*tags: int) -> None:
        for tag in tags:
            writer.submit(consumer, tag, ("", 0, batch.id, ids[tag], "s"))  # type: ignore[arg-type]

    try:
        # When one end comes to the writer asleep, then two more at once
        submit(0)
        assert consumer.acked.wait(1) == [0]
        submit(1, 2)

        # Then the first was written at once, alone; the two in one round, by its timer
        assert sorted(consumer.acked.wait(3)) == [0, 1, 2]
        assert calls == [1, 2]

        # When a round finds nothing (the writer asleep again), rounds wait a minute, and
        # one end comes
        poll_until(lambda: writer._asleep, "the writer asleep after an empty round")
        monkeypatch.setattr(ends, "ROUND_WAIT_S", 60.0)
        submit(3)

        # Then it is written at once, not a minute later
        assert sorted(consumer.acked.wait(4)) == [0, 1, 2, 3]
        assert calls == [1, 2, 1]

        # When seven more come while it waits for its next round, then an eighth
        submit(*range(4, 12))

        # Then the eighth (half the prefetch) starts the round: the eight in one call
        assert sorted(consumer.acked.wait(12)) == list(range(12))
        assert calls == [1, 2, 1, 8]

        # When two more come, and the consumer closes before the round is due
        submit(12, 13)
        writer.release(consumer, 30)  # type: ignore[arg-type]

        # Then the close had them written at once and handed back to be acknowledged
        assert sorted(consumer.acked.wait(14)) == list(range(14))
        assert calls == [1, 2, 1, 8, 2]
        status = dramaturg.batch_status(batch.id)
        assert (status.total, status.succeeded, status.state) == (14, 14, "complete")
    finally:
        writer.close()


@pytest.mark.parametrize("broker_kind", ["rabbitmq"])
def test_on_rabbitmq_an_end_that_cannot_be_written_leaves_its_message_unacknowledged_and_it_counts_once(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a state store that fails the first four writes of ends, then answers
    failures = [4]
    end = RedisBatchState.end

    def failing(state: RedisBatchState, ends: Any, **kwargs: Any) -> list[list[str]]:
        if failures[0] > 0:
            failures[0] -= 1
            raise redis.ConnectionError("the state store does not answer")
        return end(state, ends, **kwargs)

    monkeypatch.setattr(RedisBatchState, "end", failing)
    runs = Runs()

    @dramaturg.actor(queue_name="batch-members")
    def member(n: int) -> None:
        runs.add(n)

    report = Callback("report")

    # When the one member of a batch succeeds while its end cannot be written
    batch = dramaturg.batch("unwritten", on_complete=report.actor.message("done"))
    with batch:
        member.send(7)
    start_worker(threads=1)

    # Then its message was not acknowledged as if the end were written, nor given back to
    # the queue to run again: its end was written again, after pauses, until it was
    # written, and the batch counted it once and fired once
    ((_, summary),) = report.calls.wait(1)
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (1, 1, 0)
    assert failures == [0]
    assert runs.seen == [7]
    assert len(report.calls.seen) == 1


def refuse_publishes(
    monkeypatch: pytest.MonkeyPatch,
    count: int,
    *,
    refire_every_s: float,
    refire_after_ms: int,
    error: Callable[[], Exception] = lambda: dramatiq.errors.ConnectionClosed(OSError("the broker is out of reach")),
) -> list[int]:
    """Make the first ``count`` publishes of batch callbacks fail (each as after the durable
    write's own tries; by default as a lost connection to the broker does), and the workers
    look for callbacks left unpublished as often as given; returns the refusals left (a
    one-item list)."""
    from dramaturg.batches import tracker as tracker_module

    monkeypatch.setattr(tracker_module, "REFIRE_EVERY_S", refire_every_s)
    monkeypatch.setattr(tracker_module, "REFIRE_AFTER_MS", refire_after_ms)
    refusals = [count]
    publish = BatchTracker._publish

    def refusing(tracker: BatchTracker, *args: Any, **kwargs: Any) -> None:
        if refusals[0] > 0:
            refusals[0] -= 1
            raise error()
        publish(tracker, *args, **kwargs)

    monkeypatch.setattr(BatchTracker, "_publish", refusing)
    return refusals


@pytest.mark.parametrize("broker_kind", ["rabbitmq", "redis"])
def test_a_callback_that_cannot_be_published_is_tried_again_until_it_is_out(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch whose callback's first five publishes fail (each after the durable
    # write's own tries) as a broker out of reach makes them fail, while the worker also
    # looks for callbacks left unpublished every 50 ms
    import dramatiq.worker

    monkeypatch.setattr(dramatiq.worker, "POST_PROCESS_MESSAGE_RETRY_DELAY_SECS", 0.1)
    refusals = refuse_publishes(monkeypatch, 5, refire_every_s=0.05, refire_after_ms=60_000)
    runs = Runs()

    @dramaturg.actor(queue_name="batch-members")
    def member(n: int) -> None:
        runs.add(n)

    report = Callback("report")

    # When its one member succeeds, and its end fires on_complete
    batch = dramaturg.batch("refused", on_complete=report.actor.message("done"))
    with batch:
        member.send(1)
    start_worker(threads=1)

    # Then the member's message was not acknowledged while the publish failed (Redis: it
    # stayed claimed and Dramatiq tried its acknowledgement again; RabbitMQ: the end writer
    # wrote its end again after a pause), and the callback went out once, the member having
    # run once (on Redis the batch was left "firing" and the message acknowledged before)
    assert report.calls.wait(1)[0][0] == "done"
    assert refusals == [0]
    assert runs.seen == [1]
    assert (batch.status().total, batch.status().succeeded) == (1, 1)
    assert len(report.calls.seen) == 1


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
@pytest.mark.parametrize("refusal", ["refused", "out of reach for a minute"])
def test_a_callback_refused_for_good_holds_no_member_and_goes_out_once_accepted(
    broker_kind: str,
    broker: dramatiq.Broker,
    start_worker: Callable[..., dramatiq.Worker],
    monkeypatch: pytest.MonkeyPatch,
    refusal: str,
) -> None:
    # Given a batch whose callback is refused until the test says otherwise: refused (not
    # a broker out of reach: as a unique key that another task holds refuses it), or out of
    # reach for longer than the sweep's wait (here 300 ms; a minute by default, as a queue
    # RabbitMQ refuses is reported as a lost connection); workers look for callbacks left
    # unpublished every 100 ms
    import dramatiq.worker

    monkeypatch.setattr(dramatiq.worker, "POST_PROCESS_MESSAGE_RETRY_DELAY_SECS", 0.1)
    refusals = refuse_publishes(
        monkeypatch,
        1_000_000,
        refire_every_s=0.1,
        refire_after_ms=300,
        error=(
            (lambda: ValueError("refused: its unique key is taken"))
            if refusal == "refused"
            else (lambda: dramatiq.errors.ConnectionClosed(OSError("the broker is out of reach")))
        ),
    )
    runs = Runs()

    @dramaturg.actor(queue_name="batch-members")
    def member(n: int) -> None:
        runs.add(n)

    report = Callback("report")

    # When its one member succeeds and its end fires on_complete, refused
    batch = dramaturg.batch("refused for good", on_complete=report.actor.message("done"))
    with batch:
        member.send(1)
    start_worker(threads=1)
    runs.wait(1)

    # Then the worker's one thread is not held by it: a task sent next runs (on Redis the
    # member's acknowledgement was retried for as long as the publish failed, every 5 s),
    # and on RabbitMQ the end writer holds no delivery for it (it kept the member's
    # delivery unacknowledged, and wrote its end again, for as long)
    member.send(2)
    assert runs.wait(2) == [1, 2]
    if broker_kind == "rabbitmq":
        from dramaturg.brokers.rabbitmq.ends import end_writer_of

        writer = end_writer_of(broker)
        # (it hands the deliveries back before it notes that it writes again: wait for both)
        poll_until(
            lambda: not writer._held and not writer._incoming and writer.failing_since is None,
            "the end writer holds nothing and is not failing",
        )
    assert report.calls.seen == []

    # And once the callback is accepted, a worker publishes it, once
    refusals[0] = 0
    ((label, summary),) = report.calls.wait(1)
    assert (label, summary["total"], summary["succeeded"]) == ("done", 1, 1)
    state = tracker_of(broker).state(broker)
    poll_until(lambda: (state.read(batch.id) or ({}, {}))[0].get("complete") == "sent", "on_complete marked sent")
    assert len(report.calls.seen) == 1


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
@pytest.mark.parametrize("last_end", ["a member held", "the seal"])
def test_a_callback_left_unpublished_is_published_again_by_a_worker(
    broker: dramatiq.Broker,
    start_worker: Callable[..., dramatiq.Worker],
    monkeypatch: pytest.MonkeyPatch,
    last_end: str,
) -> None:
    # Given a broker whose callback queue refuses the first publish of on_complete (after
    # the durable write's own tries), where nothing else tries it again: the end of a
    # member that was held is written by a worker's after-hook, which acknowledges the
    # member all the same; a seal that fires is the sender's
    refusals = refuse_publishes(monkeypatch, 1, refire_every_s=0.1, refire_after_ms=300)
    runs = Runs()

    @dramaturg.actor(queue_name="batch-members", max_retries=0)
    def member(n: int) -> None:
        runs.add(n)
        if n == 2:
            dramaturg.current_task().hold("row 2 has no email")

    report = Callback("report")
    batch = dramaturg.batch("left unpublished", on_complete=report.actor.message("done"))

    # When the batch ends that way and its on_complete's publish fails once
    if last_end == "a member held":
        with batch:
            member.send_many([1, 2])
        start_worker(threads=1)
    else:
        start_worker(threads=1)
        with batch:
            member.send_many([1, 2])
            runs.wait(2)
            poll_until(lambda: batch.status().running + batch.status().pending == 0, "both members ended")

    # Then a worker publishes it again once it has been left unpublished a while, and it
    # runs once, with the summary of both members (one held, counted failed)
    ((label, summary),) = report.calls.wait(1)
    assert label == "done"
    assert (summary["total"], summary["succeeded"], summary["failed"], summary["held"]) == (2, 1, 1, 1)
    assert refusals == [0]
    assert sorted(runs.seen) == [1, 2]
    state = tracker_of(broker).state(broker)
    poll_until(lambda: (state.read(batch.id) or ({}, {}))[0].get("complete") == "sent", "on_complete marked sent")
    assert len(report.calls.seen) == 1


def test_threads_publishing_callbacks_together_past_the_kept_ids_never_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pure logic: a long-lived worker that has published 10,000 callbacks forgets the oldest
    # id at each new one, from whichever thread published it (acknowledgements, end writers,
    # seals, the refire sweep). Eight threads fire together, switching every microsecond;
    # an eviction that another thread's insert breaks raised RuntimeError out of fire().
    from dramaturg.batches import tracker as tracking

    class OneCallbackBatches:  # every batch read has its on_complete stored
        def read(self, batch_id: str) -> tuple[dict[str, str], dict[str, str]]:
            callback = json.dumps({"queue_name": "reports", "actor_name": "report", "args": [], "kwargs": {}})
            return {"name": batch_id, "on_complete": callback, "total": "1", "succeeded": "1"}, {}

        def sent(self, batch_id: str, event: str) -> None: ...

        def close(self) -> None: ...

    broker = dramaturg.bootstrap(dramaturg.Settings(broker={"type": "stub"}))
    batches = BatchTracker(url=None, ttl_ms=60_000)
    batches._state = OneCallbackBatches()  # type: ignore[assignment]
    published: list[str] = []
    monkeypatch.setattr(batches, "_publish", lambda broker, batch_id, *rest: published.append(batch_id))
    for i in range(tracking.PUBLISHED_KEPT):
        batches._published[(f"earlier-{i}", "complete")] = None
    errors: list[BaseException] = []

    def fire_many(thread: int) -> None:
        for i in range(1_500):
            try:
                batches.fire(broker, f"b{thread}-{i}", ["complete"])
            except BaseException as error:
                errors.append(error)
                return

    try:
        with switching_every_microsecond():
            threads = [threading.Thread(target=fire_many, args=(n,), daemon=True) for n in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
    finally:
        batches.close()
    assert errors == []
    assert len(published) == 8 * 1_500  # each callback published once
    # The newest kept, no more: the 12,000 new ids pushed out every one of the 10,000 earlier
    assert len(batches._published) == tracking.PUBLISHED_KEPT
    assert not [key for key in batches._published if key[0].startswith("earlier-")]
