"""Locks (dramaturg.lock): exclusion across processes, fencing tokens that only grow, a dead
holder's lock freed by its ttl, a stale release refused, a bounded wait; on RabbitMQ (with a
Redis state store), Redis, embedded, and eager (in memory)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis

import dramaturg

from .conftest import Process, settings_with_state, write_config

REPO = Path(__file__).resolve().parents[1]
MODES = ("rabbitmq", "redis", "embedded", "eager")
REAL_BROKERS = ["rabbitmq", "redis", "embedded"]


@pytest.fixture(params=MODES)
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dramaturg.Settings:
    """A namespace of this test's own; RabbitMQ gets the private Redis as its state store."""
    return settings_with_state(broker_kind, request, tmp_path)


@pytest.fixture
def counter(redis_server: Any) -> Iterator[redis.Redis]:
    """The Redis the contenders measure themselves in (db 1, emptied for each test)."""
    client = redis.Redis(host=redis_server.host, port=redis_server.port, db=1)
    client.flushdb()
    client.counter_url = f"redis://{redis_server.host}:{redis_server.port}/1"  # type: ignore[attr-defined]
    yield client
    client.close()


def contender(spawn: Callable[..., Process], counter: Any, *argv: str) -> Process:
    return spawn(
        [sys.executable, "-m", "tests.apps.flow_tasks", *argv],
        PYTHONPATH=str(REPO),
        FLOW_COUNTER_URL=counter.counter_url,
    )


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_two_processes_contending_never_hold_the_lock_at_once(
    settings: dramaturg.Settings, broker: dramatiq.Broker, counter: Any, spawn: Callable[..., Process], tmp_path: Path
) -> None:
    # Given two processes that each take the same lock 40 times
    write_config(tmp_path, settings)
    processes = [contender(spawn, counter, "contend", "import:users.csv", "40") for _ in range(2)]

    # When both have finished
    for process in processes:
        process.wait_for_line("done", timeout=60)
        assert process.popen.wait(timeout=30) == 0, process.output

    # Then no one was ever inside with another, and every holding had a token of its own, growing
    assert int(counter.get("locked:max")) == 1
    assert not [line for p in processes for line in p.lines if line.startswith("violation")]
    tokens = [int(t) for t in counter.lrange("tokens", 0, -1)]
    assert len(tokens) == 80 and tokens == sorted(tokens) and len(set(tokens)) == 80
    assert not dramaturg.locked("import:users.csv")


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_a_killed_holder_frees_the_lock_when_its_ttl_passes(
    settings: dramaturg.Settings, broker: dramatiq.Broker, counter: Any, spawn: Callable[..., Process], tmp_path: Path
) -> None:
    # Given a process holding the lock for 1.5 s
    write_config(tmp_path, settings)
    holder = contender(spawn, counter, "hold", "nightly", "1500ms")
    _, token, asked_at = holder.wait_for_line("holding").split()
    assert dramaturg.locked("nightly")

    # When it is killed
    holder.stop(signal.SIGKILL)
    killed_at = time.monotonic()

    # Then the lock is taken once its ttl passes, not before (its ttl began after the holder
    # asked for it; Redis rounds to the millisecond), with a greater token, and soon after
    with dramaturg.lock("nightly", wait="10s") as lk:
        taken_at = time.time()
        assert lk.token is not None and lk.token > int(token)
    assert taken_at - float(asked_at) >= 1.49
    assert time.monotonic() - killed_at < 5.0


@pytest.mark.parametrize("broker_kind", REAL_BROKERS)
def test_a_token_handed_out_after_the_state_store_was_wiped_is_greater_than_those_before(
    broker: dramatiq.Broker,
) -> None:
    # Given a lock taken twice, and the token of its second holding
    for _ in range(2):
        with dramaturg.lock("nightly") as lk:
            before = lk.token
    assert before is not None

    # When the state store loses everything (FLUSHALL, a restart without persistence)
    dramaturg.flow.state_of(broker).client.flushdb()  # type: ignore[attr-defined]

    # Then the next holder's token is still greater: a store fenced by the old tokens
    # accepts the new holder's writes and still refuses the old holders'
    with dramaturg.lock("nightly") as lk:
        assert lk.token is not None and lk.token > before
        after = lk.token
    with dramaturg.lock("nightly") as lk:
        assert lk.token is not None and lk.token > after


def test_a_token_handed_out_in_memory_after_a_restart_is_greater_than_those_before() -> None:
    from dramaturg.flow.state import MemoryFlowState

    # Given a lock held and released in eager mode's memory store, twice
    first = MemoryFlowState()
    tokens = [first.lock_acquire("nightly", "owner-0", 1_000, "test")[0]]
    assert first.lock_release("nightly", "owner-0")
    tokens.append(first.lock_acquire("nightly", "owner-1", 1_000, "test")[0])

    # When the process starts again (a new, empty store), later than the last token (a
    # token is at least the clock in microseconds: a restart takes longer than that)
    while time.time_ns() // 1000 <= tokens[1]:  # type: ignore[operator]
        pass
    again = MemoryFlowState()

    # Then its first token is greater than the last one handed out before
    token = again.lock_acquire("nightly", "owner-2", 1_000, "test")[0]
    assert token is not None and tokens[1] is not None and token > tokens[1] > tokens[0]  # type: ignore[operator]


def test_a_release_by_a_holder_whose_ttl_passed_is_refused(broker: dramatiq.Broker) -> None:
    # Given a lock whose ttl passed, and that another then took
    stale = dramaturg.lock("report", ttl="100ms").acquire()
    fresh = dramaturg.lock("report", ttl="10s", wait="5s").acquire()
    assert fresh.token is not None and stale.token is not None and fresh.token > stale.token

    # When the first holder releases it, or renews it
    # Then it is refused, and the new holder keeps it
    with pytest.raises(dramaturg.LockLost, match=r"lock 'report' \(token \d+\) could not be renewed"):
        stale.renew()
    with pytest.raises(dramaturg.LockLost, match=r"\(token \d+\) was no longer held by this holder when released"):
        stale.release()
    assert dramaturg.locked("report")
    holder = dramaturg.flow.lock_holder("report")
    assert holder is not None and holder.token == fresh.token
    fresh.release()
    assert not dramaturg.locked("report")


def test_a_held_lock_times_out_after_the_wait_naming_the_holder(broker: dramatiq.Broker) -> None:
    with dramaturg.lock("import:users.csv", ttl="30s") as held:
        started = time.monotonic()
        with (
            pytest.raises(dramaturg.LockTimeout, match=r"lock 'import:users.csv' was not free within \d+ ms \(held by"),
            dramaturg.lock("import:users.csv", wait="300ms"),
        ):
            pytest.fail("a held lock was taken")
        assert 0.3 <= time.monotonic() - started < 2.0
        held.renew("60s")
        assert dramaturg.flow.lock_holder("import:users.csv").expires_in_ms > 30_000  # type: ignore[union-attr]
    assert not dramaturg.locked("import:users.csv")


def test_a_lock_is_renewed_by_touch_inside_a_task(broker: dramatiq.Broker) -> None:
    # Given a lock held inside a task handler (run in eager mode here, and in-process elsewhere)
    seen: list[int] = []
    done = threading.Event()

    @dramaturg.actor(queue_name="flow")
    def guarded() -> None:
        with dramaturg.lock("guarded", ttl="1s"):
            for _ in range(4):
                time.sleep(0.5)
                dramaturg.current_task().touch()  # renews it: 2 s held on a 1 s ttl
            seen.append(dramaturg.flow.lock_holder("guarded").token)  # type: ignore[union-attr]
        done.set()

    if getattr(broker, "runs_inline", False):
        guarded.send()
    else:
        worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
        worker.start()
        try:
            guarded.send()
            assert done.wait(20), "the guarded task never finished"
        finally:
            worker.stop()
    assert len(seen) == 1 and not dramaturg.locked("guarded")


def test_without_a_state_store_a_lock_says_what_to_set(rabbitmq_server: Any) -> None:
    url = f"amqp://guest:guest@{rabbitmq_server.host}:{rabbitmq_server.port}/%2F"
    dramaturg.bootstrap(dramaturg.Settings(broker={"url": url, "namespace": "test-lock-nostore"}))
    with pytest.raises(dramaturg.StateUnavailable, match=r"need a state store.*\[state\] url"):
        dramaturg.lock("nowhere").acquire()


def test_bad_lock_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="ttl must be more than 0"):
        dramaturg.lock("x", ttl=0)
    with pytest.raises(ValueError, match="non-empty string"):
        dramaturg.lock("")


def test_a_holder_whose_acquire_lost_its_reply_gets_the_lock_when_it_asks_again(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: Any
) -> None:
    from .conftest import delete_rabbitmq_queues
    from .faults.proxy import FaultProxy

    # Given RabbitMQ with its state store behind a proxy
    proxy = FaultProxy()
    port = proxy.start((redis_server.host, redis_server.port))
    try:
        settings = settings_with_state("rabbitmq", request, tmp_path)
        state = settings.state.model_copy(update={"url": f"redis://127.0.0.1:{port}/0"})
        dramaturg.bootstrap(settings.model_copy(update={"state": state}))
        lk = dramaturg.lock("nightly", ttl="1m")

        # When its acquire takes the lock in the store, and the reply is lost
        proxy.drop_next_reply(containing=b"*2\r\n:1\r\n")  # lock.lua's answer: taken, and the token
        with pytest.raises(dramaturg.BrokerUnreachable, match="the lock step was not done"):
            lk.acquire()
        assert proxy.replies_dropped == 1

        # Then asking again, the same holder gets it (not a wait for itself until the ttl, a minute)
        lk.acquire()
        holder = dramaturg.flow.lock_holder("nightly")
        assert lk.token is not None and holder is not None and holder.token == lk.token
        lk.release()
        assert not dramaturg.locked("nightly")
    finally:
        proxy.stop()
        if dramaturg.app.current_broker_or_none() is not None:
            delete_rabbitmq_queues(dramaturg.app.current_broker_or_none())
