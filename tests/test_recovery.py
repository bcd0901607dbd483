"""A worker that dies mid-task: its task runs again on another worker, soon; a busy live
worker is never taken for dead. The recovery itself (Redis and embedded): back to the head
of the exact queue, once, never from a worker that is alive."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker as DramatiqRedisBroker

import dramaturg
from dramaturg import app
from dramaturg.brokers.redis import RedisRecoverer
from dramaturg.middleware import RedisRecovery, framework_middleware
from dramaturg.middleware.recovery import _RecoveryThread

from .conftest import Process, bin_path, pending_messages, poll_until, write_config

REPO = Path(__file__).resolve().parents[1]
READY = "Worker process is ready for action."
WAIT_S = 30.0
REDIS_LIKE = ["redis", "embedded"]

#: The subprocess workers' heartbeat timeout in the kill test (they tick every 200 ms).
HEARTBEAT_TIMEOUT_S = 1.0
#: After a message is back on its queue: an idle consumer polls every 0.5-1 s
#: (Dramatiq's worker_timeout), plus slack for a loaded 2-core machine.
FETCH_ALLOWANCE_S = 1.5


@dataclass(frozen=True)
class Event:
    """A line of tests/apps/crash_tasks.py's log: ``<event> <pid> <parent pid> <unix time>``."""

    event: str
    pid: int
    ppid: int
    at: float


def events(path: Path) -> list[Event]:
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        event, pid, ppid, at = line.split()
        found.append(Event(event, int(pid), int(ppid), float(at)))
    return found


def wait_for_event(path: Path, matches: Callable[[Event], bool], timeout: float = WAIT_S) -> Event:
    """The first event in a file written by worker processes that ``matches``."""
    found: Event = poll_until(
        lambda: next((event for event in events(path) if matches(event)), None), f"such an event in {path}", timeout
    )
    return found


def start_workers(spawn: Callable[..., Process], count: int, **env: str) -> list[Process]:
    """``count`` separate ``dramaturg worker -p 1 -t 1``, each its own Dramatiq process group,
    with a heartbeat timeout of :data:`HEARTBEAT_TIMEOUT_S` (on Redis and embedded) unless
    ``env`` sets one.

    Separate groups because Dramatiq's main process stops all its worker processes when
    one of them dies: the survivor must not be a sibling of the killed one.
    """
    env.setdefault("DRAMATURG_BROKER_HEARTBEAT_TIMEOUT", str(int(HEARTBEAT_TIMEOUT_S * 1000)))
    workers = [
        spawn([bin_path("dramaturg"), "worker", "-p", "1", "-t", "1"], PYTHONPATH=str(REPO), **env)
        for _ in range(count)
    ]
    for worker in workers:
        worker.wait_for_line(READY)
    return workers


@pytest.fixture
def crash_log(settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path) -> Path:
    """The stall actor bound to the test's broker, a config for workers, and their log file."""
    from tests.apps import crash_tasks

    app.register(crash_tasks.stall)  # declared at the first import; isolated_app forgets it after each test
    write_config(tmp_path, settings, modules=["tests.apps.crash_tasks"])
    return tmp_path / "crash.log"


# -- subprocess workers ---------------------------------------------------------------


def test_a_worker_killed_mid_task_has_its_task_run_again_on_another(
    broker_kind: str, crash_log: Path, spawn: Callable[..., Process]
) -> None:
    from tests.apps import crash_tasks

    # Given two idle workers (a heartbeat timeout of 1 s on Redis; unused on RabbitMQ)
    workers = start_workers(spawn, 2, CRASH_LOG=str(crash_log))

    # When a task that blocks on its first run starts on one, whose process is killed
    crash_tasks.stall.send(120.0)
    first = wait_for_event(crash_log, lambda e: e.event == "start")
    killed_at = time.time()
    os.kill(first.pid, signal.SIGKILL)

    # Then it runs again on the other worker, and completes there
    rerun = wait_for_event(crash_log, lambda e: e.event == "start" and e.pid != first.pid)
    end = wait_for_event(crash_log, lambda e: e.event == "end")
    (killed_group,) = [w for w in workers if w.popen.pid == first.ppid]
    (survivor,) = [w for w in workers if w.popen.pid != first.ppid]
    assert rerun.ppid == end.ppid == survivor.popen.pid
    assert [e.event for e in events(crash_log)] == ["start", "start", "end"]
    assert killed_group.popen.wait(timeout=WAIT_S) != 0  # the killed worker's main process gave up
    # and the survivor said why it ran again, and how fast
    recovery_s = rerun.at - killed_at
    if broker_kind == "rabbitmq":
        # RabbitMQ hands the delivery back when the killed process's connection drops.
        survivor.wait_for_line("delivered again")
    else:
        survivor.wait_for_line("recovered 1 message of dead worker")
        bound = 2 * HEARTBEAT_TIMEOUT_S + FETCH_ALLOWANCE_S
        assert recovery_s < bound, f"ran again {recovery_s:.2f} s after the kill (bound {bound} s)"
    print(f"{broker_kind}: ran again {recovery_s:.2f} s after kill -9")


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)  # RabbitMQ: a delivery stays with its live connection
def test_a_busy_live_worker_is_not_taken_for_dead(
    broker: dramatiq.Broker, crash_log: Path, spawn: Callable[..., Process]
) -> None:
    from tests.apps import crash_tasks

    # Given two workers, each with one thread, a prefetch of 1 and no priority lanes, so a
    # running task leaves its queue's consumer full (it stops calling Redis), and a
    # heartbeat timeout of 600 ms, shorter than most of the 0.5-1 s between the idle polls
    # of its delay-queue consumer: Dramatiq's own heartbeats would let it look dead
    start_workers(
        spawn,
        2,
        CRASH_LOG=str(crash_log),
        DRAMATURG_BROKER_HEARTBEAT_TIMEOUT="600",
        DRAMATURG_BROKER_PREFETCH="1",
        DRAMATURG_BROKER_PRIORITIES="false",
    )

    # When one of them runs a task for seven heartbeat timeouts
    crash_tasks.stall.send(4.2)
    wait_for_event(crash_log, lambda e: e.event == "end")

    # Then the other never took it back: it ran once and was acknowledged
    # the end line is written just before the ack
    poll_until(lambda: pending_messages(broker, "crash") == 0, "the task acknowledged", WAIT_S)
    assert [e.event for e in events(crash_log)] == ["start", "end"]


# -- the recovery, in this process -------------------------------------------------------


def dead_worker(broker: Any, claims: dict[str, int], *, silent_ms: int) -> DramatiqRedisBroker:
    """Another worker on ``broker``'s namespace that fetched messages (``claims``: queue ->
    how many) and whose last heartbeat was ``silent_ms`` ago."""
    other = DramatiqRedisBroker(client=broker.client, namespace=broker.namespace)
    for queue, count in claims.items():
        assert len(other.do_fetch(queue, count)) == count
    beat_at = int(time.time() * 1000) - silent_ms
    broker.client.zadd(f"{broker.namespace}:__heartbeats__", {other.broker_id: beat_at})
    return other


def queue_ids(broker: Any, queue: str) -> list[str]:
    return [i.decode() for i in broker.client.lrange(f"{broker.namespace}:{queue}", 0, -1)]


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_recovery_puts_claimed_messages_back_at_the_head_of_their_exact_queue_in_order(broker: Any) -> None:
    # Given messages on a lane and a delay queue, the first three of the lane and two
    # delayed ones claimed by a worker silent for 2 s (a timeout of 1 s)
    @dramaturg.actor(queue_name="imports", priority=3)
    def work(n: int) -> None: ...

    base = int(time.time() * 1000)
    # Distinct send times (one ms apart), the order recovery keeps.
    sent = [broker.enqueue(work.message(n).copy(message_timestamp=base + n)) for n in range(5)]
    delayed = [work.send_with_options(args=(n,), delay=60_000) for n in (10, 11)]
    lane_ids = [m.options["redis_message_id"] for m in sent]
    dead = dead_worker(broker, {"imports.P1": 3, "imports.P1.DQ": 2}, silent_ms=2_000)
    assert queue_ids(broker, "imports.P1") == lane_ids[3:]

    # When a live worker recovers
    recoverer = RedisRecoverer(broker, 1_000)
    now = int(time.time() * 1000)
    found = recoverer.beat(now)
    (recovered,) = recoverer.recover(found, now)

    # Then each went back to its own queue, the lane's at the head in their first order
    assert recovered.worker.worker_id == dead.broker_id
    assert recovered.messages == {"imports.P1": 3, "imports.P1.DQ": 2}
    assert sorted(recovered.message_ids) == sorted(m.message_id for m in sent[:3] + delayed)
    assert queue_ids(broker, "imports.P1") == lane_ids
    assert sorted(queue_ids(broker, "imports.P1.DQ")) == sorted(m.options["redis_message_id"] for m in delayed)
    # and the dead worker is forgotten, with no claims left
    assert broker.client.zscore(f"{broker.namespace}:__heartbeats__", dead.broker_id) is None
    assert not list(broker.client.scan_iter(f"{broker.namespace}:__acks__.{dead.broker_id}.*"))
    assert recoverer.beat(int(time.time() * 1000)) == []


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_two_workers_recovering_at_once_push_each_message_once(broker: Any) -> None:
    # Given a dead worker holding 50 messages, and two live workers that both found it dead
    @dramaturg.actor(queue_name="imports", priority=0)
    def work(n: int) -> None: ...

    for n in range(50):
        work.send(n)
    dead_worker(broker, {"imports": 50}, silent_ms=5_000)
    recoverers = [RedisRecoverer(DramatiqRedisBroker(client=broker.client, namespace=broker.namespace), 1_000)]
    recoverers.append(RedisRecoverer(broker, 1_000))
    now = int(time.time() * 1000)
    found = [recoverer.beat(now) for recoverer in recoverers]

    # When both recover it at the same moment
    start = threading.Barrier(2)
    totals: list[int] = []

    def recover(recoverer: RedisRecoverer, dead: Any) -> None:
        start.wait()
        totals.extend(r.total for r in recoverer.recover(dead, now))

    threads = [threading.Thread(target=recover, args=pair) for pair in zip(recoverers, found, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)

    # Then the 50 went back once
    assert sorted(totals) == [0, 50]
    ids = queue_ids(broker, "imports")
    assert len(ids) == len(set(ids)) == 50


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_worker_that_beats_again_is_left_alone(broker: Any) -> None:
    # Given a worker found dead, which writes a heartbeat before it is recovered
    @dramaturg.actor(queue_name="imports")
    def work(n: int) -> None: ...

    work.send(1)
    late = dead_worker(broker, {"imports": 1}, silent_ms=5_000)
    recoverer = RedisRecoverer(broker, 1_000)
    now = int(time.time() * 1000)
    found = recoverer.beat(now)
    late.do_qsize("imports")  # any Dramatiq call writes its heartbeat

    # When it is recovered
    (recovered,) = recoverer.recover(found, now)

    # Then nothing moved and it is not forgotten
    assert recovered.revived and recovered.total == 0
    assert queue_ids(broker, "imports") == []
    assert broker.client.scard(f"{broker.namespace}:__acks__.{late.broker_id}.imports") == 1
    assert broker.client.zscore(f"{broker.namespace}:__heartbeats__", late.broker_id) is not None


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_message_acknowledged_or_purged_meanwhile_is_not_pushed_back(broker: Any) -> None:
    # Given a dead worker's two claimed messages, one of whose bodies is gone
    @dramaturg.actor(queue_name="imports")
    def work(n: int) -> None: ...

    kept, gone = work.send(1), work.send(2)
    dead_worker(broker, {"imports": 2}, silent_ms=5_000)
    broker.client.hdel(f"{broker.namespace}:imports.msgs", gone.options["redis_message_id"])

    # When it is recovered
    recoverer = RedisRecoverer(broker, 1_000)
    now = int(time.time() * 1000)
    (recovered,) = recoverer.recover(recoverer.beat(now), now)

    # Then only the other one is back
    assert recovered.total == 1
    assert queue_ids(broker, "imports") == [kept.options["redis_message_id"]]


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_worker_recovers_its_dead_predecessor_when_it_boots(
    broker: Any, start_worker: Callable[..., dramatiq.Worker], caplog: pytest.LogCaptureFixture
) -> None:
    # Given a message claimed by a worker silent for longer than the heartbeat timeout (60 s)
    ran = threading.Event()

    @dramaturg.actor(queue_name="imports")
    def work(n: int) -> None:
        ran.set()

    message = work.send(1)
    dead = dead_worker(broker, {"imports": 1}, silent_ms=61_000)

    # When a worker boots
    with caplog.at_level(logging.WARNING, logger="dramaturg.recovery"):
        start_worker()

        # Then the message runs, and the recovery says whose it was and how long it was silent
        assert ran.wait(WAIT_S)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "dramaturg.recovery"]
    assert f"recovered 1 message of dead worker {dead.broker_id} (no heartbeat for 61." in line
    assert line.endswith(
        f"back at the head of imports (1), started or not (those it had started run again): {message.message_id}"
    )


def heartbeat_of(broker: Any) -> float | None:
    """The last heartbeat of ``broker``'s process in its namespace, if it has one."""
    return broker.client.zscore(f"{broker.namespace}:__heartbeats__", broker.broker_id)


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_worker_that_stops_cleanly_leaves_no_heartbeat_to_be_taken_for_dead(
    broker: Any, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given a worker that ran a task and beats
    ran = threading.Event()

    @dramaturg.actor(queue_name="imports")
    def work(n: int) -> None:
        ran.set()

    worker = start_worker()
    work.send(1)
    assert ran.wait(WAIT_S)
    poll_until(lambda: heartbeat_of(broker) is not None, "the worker's heartbeat", WAIT_S)

    # When it stops
    worker.stop()

    # Then it claims nothing and has left the heartbeats: no live worker finds it dead
    # later (nor SCANs the keyspace for its claims)
    assert pending_messages(broker, "imports") == 0
    assert heartbeat_of(broker) is None
    other = RedisRecoverer(DramatiqRedisBroker(client=broker.client, namespace=broker.namespace), 1_000)
    assert other.beat(int(time.time() * 1000) + 3_600_000) == []


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_worker_that_could_not_give_back_its_claims_keeps_its_heartbeat(
    broker: Any, start_worker: Callable[..., dramatiq.Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a beating worker whose last giving back of claims fails as it stops
    worker = start_worker(queues={"imports"})
    poll_until(lambda: heartbeat_of(broker) is not None, "the worker's heartbeat", WAIT_S)

    def refused() -> int:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(broker.claims, "reconcile", refused)

    # When it stops
    worker.stop()

    # Then it stays in the heartbeats, as its WARNING says: the others recover what it may
    # still claim once its heartbeat is old
    assert heartbeat_of(broker) is not None


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_worker_stopping_beside_another_of_its_process_leaves_that_ones_heartbeat(
    broker: Any, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given two workers of one process, on one broker (one worker id), both beating
    first = start_worker(queues={"imports"})
    start_worker(queues={"exports"})
    poll_until(lambda: heartbeat_of(broker) is not None, "the workers' heartbeat", WAIT_S)

    # When one of them stops
    first.stop()

    # Then the heartbeat stays, for the one still running
    assert heartbeat_of(broker) is not None


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_worker_that_stops_with_a_claim_left_keeps_its_heartbeat_for_the_others(broker: Any) -> None:
    # Given a worker's message claimed and still held (a task running past the shutdown timeout)
    @dramaturg.actor(queue_name="imports")
    def work(n: int) -> None: ...

    work.send(1)
    recoverer = RedisRecoverer(broker, 1_000)
    recoverer.beat(int(time.time() * 1000))
    (redis_id,) = broker.claims.fetch("imports", 1).remaining_ids()

    # When it departs, it stays in the heartbeats (the others recover that claim once it is old)
    assert recoverer.depart() is False
    assert heartbeat_of(broker) is not None

    # and once the claim went back, it departs
    broker.claims.release("imports", [redis_id])
    assert broker.claims.reconcile() == 1
    assert recoverer.depart() is True
    assert heartbeat_of(broker) is None
    assert queue_ids(broker, "imports") == [redis_id]


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_first_fetch_racing_a_clean_stop_keeps_the_worker_in_the_heartbeats(
    broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker stopping cleanly, its depart paused after it listed its claim sets (all
    # empty) and before its script forgets the heartbeat
    @dramaturg.actor(queue_name="exports")
    def work(n: int) -> None: ...

    sent = work.send(1)
    recoverer = RedisRecoverer(broker, 1_000)
    recoverer.beat(int(time.time() * 1000))
    listed, go_on = threading.Event(), threading.Event()
    depart_script = recoverer._depart

    def paused(**call: Any) -> Any:
        listed.set()
        go_on.wait(WAIT_S)
        return depart_script(**call)

    monkeypatch.setattr(recoverer, "_depart", paused)
    departed: list[bool] = []
    departing = threading.Thread(target=lambda: departed.append(recoverer.depart()))
    departing.start()
    assert listed.wait(WAIT_S)

    # When a thread of it makes its first fetch from a queue it never fetched from (given
    # half a second to run into the depart: without the lock it claims the message then, and
    # the depart forgets the heartbeat of a worker holding a claim that no one would recover)
    fetched: list[str] = []
    fetcher = threading.Thread(target=lambda: fetched.extend(broker.claims.fetch("exports", 1).remaining_ids()))
    fetcher.start()
    fetcher.join(timeout=0.5)
    go_on.set()
    departing.join()
    fetcher.join()

    # Then the fetch ran after the depart: the worker is in the heartbeats again, with its claim
    assert departed == [True]
    assert fetched == [sent.message_id]
    assert heartbeat_of(broker) is not None


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_process_that_only_sends_writes_no_heartbeat(broker: Any) -> None:
    # Given a process that runs no worker
    @dramaturg.actor(queue_name="imports")
    def work(n: int) -> None: ...

    # When it sends, one message and then many
    sent = [work.send(1), work.send_with_options(args=(2,), delay=60_000)]
    work.send_many([(n,) for n in range(3)])

    # Then they are queued, and the process is not in the heartbeats, where the workers
    # would take it for dead once it falls quiet (Dramatiq's enqueue wrote one)
    assert pending_messages(broker, "imports") == 5
    assert queue_ids(broker, "imports")[0] == sent[0].options["redis_message_id"]
    assert heartbeat_of(broker) is None


def test_only_the_redis_brokers_get_the_recovery_middleware() -> None:
    for broker_type, expected in [("redis", True), ("embedded", True), ("rabbitmq", False), ("stub", False)]:
        settings = dramaturg.Settings(broker={"type": broker_type, "heartbeat_timeout": "30s"})
        found = [m for m in framework_middleware(settings) if isinstance(m, RedisRecovery)]
        assert [m.tick_ms for m in found] == ([6_000] if expected else []), broker_type
    assert RedisRecovery(300).tick_ms == 100


def test_a_redis_error_is_logged_once_and_the_next_ticks_try_again(caplog: pytest.LogCaptureFixture) -> None:
    # Given a recoverer whose Redis fails twice, then answers
    class Flaky:
        def __init__(self) -> None:
            self.calls = 0

        def beat(self, now_ms: int) -> list[Any]:
            self.calls += 1
            if self.calls <= 2:
                raise redis.ConnectionError("Connection refused")
            return []

        def reconcile(self) -> int:
            return 0

    flaky = Flaky()
    thread = _RecoveryThread(flaky, 0.1)  # type: ignore[arg-type]

    # When it ticks three times
    with caplog.at_level(logging.DEBUG, logger="dramaturg.recovery"):
        for _ in range(3):
            thread.tick()

    # Then one warning (no traceback), then quiet, then a line saying it works again
    levels = [(r.levelname, not r.exc_info) for r in caplog.records]
    assert levels == [("WARNING", True), ("DEBUG", True), ("INFO", True)]
    assert "Connection refused" in caplog.records[0].getMessage()


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_each_tick_drops_dead_letters_older_than_a_week_as_dramatiqs_maintenance_did(broker: Any) -> None:
    # Given dead letters on a queue and one of its lanes, one 8 days old and one an hour old each
    now = int(time.time() * 1000)
    client, namespace = broker.client, broker.namespace
    for lane in ("imports", "imports.P1"):
        for message_id, age_ms in (("old", 8 * 86_400_000), ("recent", 3_600_000)):
            client.zadd(f"{namespace}:{lane}.XQ", {f"{lane}-{message_id}": now - age_ms})
            client.hset(f"{namespace}:{lane}.XQ.msgs", f"{lane}-{message_id}", b"{}")

    # When a worker consuming the queue beats (Dramatiq's own maintenance being off)
    assert broker.maintenance_chance == 0
    RedisRecoverer(broker, queues=lambda: ["imports"]).beat(now)

    # Then only the week-old ones are gone, body and all
    for lane in ("imports", "imports.P1"):
        assert [m.decode() for m in client.zrange(f"{namespace}:{lane}.XQ", 0, -1)] == [f"{lane}-recent"]
        assert [k.decode() for k in client.hkeys(f"{namespace}:{lane}.XQ.msgs")] == [f"{lane}-recent"]
