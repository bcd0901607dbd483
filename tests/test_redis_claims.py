"""A live worker's claims on Redis and embedded: nothing it fetched stays claimed by nobody.

A Redis worker claims each message it fetches (``__acks__.<worker id>.<queue>``) until it
acknowledges it. Faults between the worker and Redis, made here by a proxy
(:mod:`tests.faults.proxy`) between an in-process worker and the private server, used to
strand claims: an outage made Dramatiq drop its delay queue, a lost fetch reply was
retried by redis-py and the first batch was claimed by nobody. Each test counts:
sent == ran + still queued, each task ran once, and no claim is left behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.errors import BrokerConnectionError

import dramaturg

from .conftest import poll_until
from .faults.proxy import FaultProxy

REDIS_LIKE = ["redis", "embedded"]
#: Long enough for every consumer to hit the outage (idle ones poll every 100 ms here).
OUTAGE_S = 5.0
#: After the outage: Dramatiq restarts a failed consumer 3 s after its error, plus slack.
RECOVER_S = 20.0
#: A message body holds its actor's name: the reply to a fetch that took messages does too.
FETCHED = b'"actor_name"'


@dataclass
class Proxied:
    """A bootstrapped broker whose connections go through ``proxy``; ``direct`` does not."""

    broker: Any
    proxy: FaultProxy
    direct: redis.Redis

    def claimed(self) -> dict[str, int]:
        """The broker's (worker's) claim sets that hold anything: queue -> how many."""
        prefix = f"{self.broker.namespace}:__acks__.{self.broker.broker_id}."
        found = {}
        for key in self.direct.scan_iter(match=prefix + "*", count=1000):
            count = int(self.direct.scard(key))
            if count:
                found[key.decode()[len(prefix) :]] = count
        return found

    def listed(self, queue: str) -> int:
        """Messages of ``queue`` waiting in its lists (every lane and delay queue)."""
        names = [queue, f"{queue}.P1", f"{queue}.P2"]
        return sum(int(self.direct.llen(f"{self.broker.namespace}:{name}{dq}")) for name in names for dq in ("", ".DQ"))


@pytest.fixture
def proxied(
    broker_kind: str, settings: dramaturg.Settings, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Proxied]]:
    """Bootstraps the test's broker behind a fault proxy (heartbeat timeout in ms as argument)."""
    cleanup: list[Callable[[], object]] = []

    def make(heartbeat_timeout_ms: int = 60_000) -> Proxied:
        proxy = FaultProxy()
        cleanup.append(proxy.stop)
        broker_settings: dict[str, Any] = {"heartbeat_timeout": heartbeat_timeout_ms}
        if broker_kind == "redis":
            server = request.getfixturevalue("redis_server")
            port = proxy.start((server.host, server.port))
            broker_settings["url"] = f"redis://127.0.0.1:{port}/0"
            direct = redis.Redis(server.host, server.port)
        else:
            from dramaturg.brokers.embedded import EmbeddedServer, server_for

            embedded = server_for(settings.broker)
            embedded.attach()
            cleanup.append(embedded.detach)
            short = tempfile.mkdtemp(prefix="claims-")  # Unix socket paths are short
            cleanup.append(lambda: shutil.rmtree(short, ignore_errors=True))
            path = proxy.start_unix(str(embedded.socket_path), os.path.join(short, "proxy.sock"))

            def through_proxy(self: Any, **options: Any) -> redis.Redis:
                return redis.Redis(unix_socket_path=path, **options)

            monkeypatch.setattr(EmbeddedServer, "client", through_proxy)
            direct = redis.Redis(unix_socket_path=str(embedded.socket_path))
        cleanup.append(direct.close)
        built = settings.model_copy(update={"broker": settings.broker.model_copy(update=broker_settings)})
        return Proxied(dramaturg.bootstrap(built), proxy, direct)

    yield make
    for step in reversed(cleanup):
        step()


@pytest.fixture
def workers() -> Iterator[Callable[..., dramatiq.Worker]]:
    """Start in-process workers on a broker; any still running at the end are stopped."""
    started: list[dramatiq.Worker] = []

    def start(broker: Any, threads: int = 4) -> dramatiq.Worker:
        worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
        worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.workers and any(thread.is_alive() for thread in worker.workers):
            worker.stop()


class Runs:
    """How often each task number ran; ``all_ran`` is set once ``expected`` distinct ones did."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.counts: Counter[int] = Counter()
        self.all_ran = threading.Event()
        self._lock = threading.Lock()

    def record(self, n: int) -> None:
        with self._lock:
            self.counts[n] += 1
            if len(self.counts) >= self.expected:
                self.all_ran.set()

    def twice(self) -> list[int]:
        return sorted(n for n, count in self.counts.items() if count > 1)


class Lines(logging.Handler):
    """Collects a logger's lines and wakes whoever waits for one that contains some text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.lines.append(f"{record.levelname} {record.getMessage()}")
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> str:
        with self.changed:
            found = self.changed.wait_for(lambda: next((line for line in self.lines if text in line), None), timeout)
        assert found, f"no line with {text!r} within {timeout} s: {self.lines}"
        return str(found)


@pytest.fixture
def recovery_log() -> Iterator[Lines]:
    logger = logging.getLogger("dramaturg.recovery")
    lines, level = Lines(), logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.removeHandler(lines)
    logger.setLevel(level)


# -- an outage -------------------------------------------------------------------------


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_delayed_tasks_a_worker_held_through_an_outage_run_once_afterwards(
    proxied: Callable[..., Proxied], workers: Callable[..., dramatiq.Worker]
) -> None:
    # Given 100 tasks delayed by 2 s, all taken into a worker's delay queue
    p = proxied()
    runs = Runs(100)

    @dramaturg.actor(queue_name="claims")
    def work(n: int) -> None:
        runs.record(n)

    worker = workers(p.broker)
    for n in range(100):
        work.send_with_options(args=(n,), delay=2_000)
    poll_until(lambda: sum(p.claimed().values()) == 100, "the worker holding the 100 delayed tasks")

    # When Redis is unreachable for 5 s (connections cut, new ones refused)
    with p.proxy.down():
        time.sleep(OUTAGE_S)  # the outage itself

    # Then each of them runs, once, soon after
    assert runs.all_ran.wait(RECOVER_S), f"{len(runs.counts)} of 100 ran within {RECOVER_S} s of the outage"
    worker.stop()
    assert runs.twice() == []
    assert p.claimed() == {}
    assert p.broker.pending("claims") == 0


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_worker_stopped_after_an_outage_gives_back_what_it_claimed(
    proxied: Callable[..., Proxied], workers: Callable[..., dramatiq.Worker]
) -> None:
    # Given 100 delayed tasks taken into a worker's delay queue, and a 5 s outage
    p = proxied()
    runs = Runs(100)

    @dramaturg.actor(queue_name="claims")
    def work(n: int) -> None:
        runs.record(n)

    worker = workers(p.broker)
    for n in range(100):
        work.send_with_options(args=(n,), delay=2_000)
    poll_until(lambda: sum(p.claimed().values()) == 100, "the worker holding the 100 delayed tasks")
    with p.proxy.down():
        time.sleep(OUTAGE_S)  # the outage itself

    # When the worker stops cleanly as soon as Redis is back
    worker.stop()

    # Then it claims nothing: all 100 wait on their queue, and the next worker runs each once
    assert p.claimed() == {}
    assert p.listed("claims") + sum(runs.counts.values()) == 100
    workers(p.broker)
    assert runs.all_ran.wait(RECOVER_S), f"{len(runs.counts)} of 100 ran on the next worker"
    assert runs.twice() == []


# -- lost replies ----------------------------------------------------------------------


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_fetch_whose_reply_is_lost_leaves_nothing_stranded(
    proxied: Callable[..., Proxied], workers: Callable[..., dramatiq.Worker]
) -> None:
    # Given 200 tasks waiting, and the reply to the first fetch that takes some of them lost
    # (the fetch ran in Redis: they are claimed by the worker, which never sees them)
    p = proxied()
    runs = Runs(200)

    @dramaturg.actor(queue_name="claims")
    def work(n: int) -> None:
        runs.record(n)

    for n in range(200):
        work.send(n)
    p.proxy.drop_next_reply(containing=FETCHED)

    # When a worker runs them
    worker = workers(p.broker)

    # Then every one runs, once, and nothing stays claimed
    assert runs.all_ran.wait(RECOVER_S), f"{len(runs.counts)} of 200 ran"
    worker.stop()
    assert p.proxy.replies_dropped == 1
    assert runs.twice() == []
    assert p.claimed() == {}
    assert p.broker.pending("claims") == 0


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_replies_lost_every_300_ms_leave_nothing_stranded(
    proxied: Callable[..., Proxied], workers: Callable[..., dramatiq.Worker]
) -> None:
    # Given 500 tasks of 20 ms, and every 0.3 s the next reply carrying messages lost (a
    # fetch's), then every 0.3 s the next reply of any kind (acknowledgements, heartbeats...)
    p = proxied()
    runs = Runs(500)

    @dramaturg.actor(queue_name="claims")
    def work(n: int) -> None:
        time.sleep(0.02)
        runs.record(n)

    for n in range(500):
        work.send(n)

    # When a worker runs them through 4 s of that
    p.proxy.drop_replies(every=0.3, containing=FETCHED)
    worker = workers(p.broker)
    time.sleep(2.0)  # the fault's duration
    p.proxy.drop_replies(every=0.3)
    time.sleep(2.0)
    p.proxy.drop_replies(None)

    # Then every one runs, once, and nothing stays claimed
    assert runs.all_ran.wait(RECOVER_S), f"{len(runs.counts)} of 500 ran ({p.proxy.replies_dropped} replies lost)"
    worker.stop()
    assert runs.twice() == []
    assert p.claimed() == {}
    assert p.broker.pending("claims") == 0
    print(f"{p.proxy.replies_dropped} replies lost")


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_send_whose_reply_is_lost_is_not_sent_again_by_the_client(proxied: Callable[..., Proxied]) -> None:
    # Given a sender whose enqueue script is loaded in Redis
    p = proxied()

    @dramaturg.actor(queue_name="claims")
    def work(n: int) -> None: ...

    work.send(0)

    # When the reply to the next send is lost (the message was enqueued)
    p.proxy.drop_next_reply()
    with pytest.raises(redis.ConnectionError):
        work.send(1)

    # Then the sender is told, and redis-py did not enqueue it a second time behind its back
    assert p.broker.pending("claims") == 2


# -- the recovery tick, on a live worker -----------------------------------------------


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_the_recovery_tick_gives_back_what_a_live_worker_claimed_but_no_thread_holds(
    proxied: Callable[..., Proxied], workers: Callable[..., dramatiq.Worker], recovery_log: Lines
) -> None:
    # Given a worker with one thread (ticks every 200 ms) running a task that waits,
    # with five more of its tasks prefetched behind it
    p = proxied(heartbeat_timeout_ms=1_000)
    runs = Runs(7)
    started, release = threading.Event(), threading.Event()

    @dramaturg.actor(queue_name="claims")
    def work(n: int) -> None:
        if n == 0:
            started.set()
            release.wait(RECOVER_S)
        runs.record(n)

    workers(p.broker, threads=1)
    for n in range(6):
        work.send(n)
    assert started.wait(RECOVER_S)
    poll_until(lambda: p.claimed() == {"claims": 6}, "the worker holding the six tasks")

    # When a message is claimed in the worker's name but reaches none of its threads (as a
    # fetch whose reply was lost): its body stored, its id in the claim set, not in the list
    lost = work.message(6).copy(options={"redis_message_id": "lost-fetch-6"})
    namespace = p.broker.namespace
    with p.direct.pipeline(transaction=True) as pipe:
        pipe.hset(f"{namespace}:claims.msgs", "lost-fetch-6", lost.encode())
        pipe.sadd(f"{namespace}:__acks__.{p.broker.broker_id}.claims", "lost-fetch-6")
        pipe.execute()

    # Then a tick gives back that one (and only that one: the others are held in memory)
    line = recovery_log.wait_for("no thread of it holds", RECOVER_S)
    assert line.startswith("WARNING gave back 1 message ")
    assert lost.message_id in line
    release.set()
    assert runs.all_ran.wait(RECOVER_S), f"{len(runs.counts)} of 7 ran"
    assert runs.twice() == []
    poll_until(lambda: p.claimed() == {}, "every claim released")
    assert len([line for line in recovery_log.lines if "gave back" in line]) == 1


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_requeue_that_cannot_reach_redis_raises_the_error_dramatiqs_worker_catches(
    proxied: Callable[..., Proxied],
) -> None:
    # Given a consumer holding a message
    p = proxied()

    @dramaturg.actor(queue_name="claims")
    def work(n: int) -> None: ...

    work.send(1)
    consumer = p.broker.consume("claims", prefetch=1, timeout=100)
    message = poll_until(lambda: next(consumer), "the message fetched")

    # When it gives the message back while Redis is unreachable (as Dramatiq's worker does
    # with its delay queue when a consumer restarts, and with its work queue when it stops)
    with p.proxy.down(), pytest.raises(BrokerConnectionError):
        consumer.requeue([message])  # ConsumerThread.close and Worker.stop catch only this one

    # Then the consumer let go of it, and the next reconciliation gives it back
    consumer.close()
    assert p.broker.claims.reconcile() == 1
    assert p.claimed() == {}
    assert p.listed("claims") == 1
