"""Redis and embedded: a live worker cut off from Redis, or through an outage, longer than
``heartbeat_timeout``. Another worker takes it for dead and recovers its messages; when it
comes back it starts none of those it still held in memory, and only a task that was
running meanwhile runs twice, with a line saying so. The broker's client gives up on a
Redis that stops answering; an outcome that cannot be written while Redis is down leaves
its message unsettled (given back later) rather than dead-lettered; a copy written twice
(a timeout whose write had run) is queued once.

The faults come from the proxy of :mod:`tests.faults.proxy` (a black hole: ``silent``; an
outage: ``down``) between an in-process worker and the private server, and from pausing
the embedded server (SIGSTOP): its server is this test's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker as DramatiqRedisBroker

import dramaturg
from dramaturg.brokers.redis import RedisRecoverer
from dramaturg.config import embedded_path
from dramaturg.middleware.recovery import _RecoveryThread

from .conftest import poll_until
from .test_redis_claims import (
    RECOVER_S,
    REDIS_LIKE,
    Lines,
    Proxied,
    Runs,
    proxied,
    recovery_log,
    workers,
)

#: The fixtures of tests/test_redis_claims.py these tests use too.
__all__ = ["proxied", "recovery_log", "workers"]

#: The heartbeat timeout of these tests' workers (they tick every 200 ms).
HEARTBEAT_MS = 1_000
#: How long the worker stays cut off: long enough to be taken for dead.
CUT_S = 3.0


def dead_letters(p: Proxied, queue: str = "claims") -> int:
    namespace = p.broker.namespace
    return sum(int(p.direct.zcard(f"{namespace}:{queue}{lane}.XQ")) for lane in ("", ".P1", ".P2"))


def fault(p: Proxied, kind: str) -> contextlib.AbstractContextManager[None]:
    """``cut off``: a black hole (nothing answers, nothing closes); ``outage``: every
    connection reset and new ones refused."""
    return p.proxy.silent() if kind == "cut off" else p.proxy.down()


# -- taken for dead --------------------------------------------------------------------


class OtherWorker:
    """Another worker, played by hand on a direct connection: it takes the test's worker
    for dead and recovers its messages (to the head of their queue), then takes them from
    the queue into its own claim set, as its consumer would."""

    def __init__(self, p: Proxied) -> None:
        self.p = p
        self.namespace = p.broker.namespace
        self.recoverer = RedisRecoverer(DramatiqRedisBroker(client=p.direct, namespace=self.namespace), HEARTBEAT_MS)
        self.claims = f"{self.namespace}:__acks__.other-worker.claims"

    def recover(self) -> int:
        """How many messages of the test's worker it recovered (0 while that one is not dead)."""
        now = int(time.time() * 1000)
        dead = [w for w in self.recoverer.beat(now) if w.worker_id == self.p.broker.broker_id]
        return sum(recovered.total for recovered in self.recoverer.recover(dead, now)) if dead else 0

    def take(self) -> list[bytes]:
        """Claim every message waiting on the queue; their Redis ids."""
        ids = self.p.direct.lrange(f"{self.namespace}:claims", 0, -1)
        self.p.direct.delete(f"{self.namespace}:claims")
        self.p.direct.sadd(self.claims, *ids)
        return list(ids)

    def holds(self) -> list[bytes]:
        """What it claims whose bodies are still there."""
        bodies = f"{self.namespace}:claims.msgs"
        return [i for i in self.p.direct.smembers(self.claims) if self.p.direct.hexists(bodies, i)]


@pytest.mark.parametrize("kind", ["cut off", "outage"])
@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_worker_taken_for_dead_starts_none_of_the_messages_another_recovered(
    kind: str, proxied: Callable[..., Proxied], workers: Callable[..., dramatiq.Worker], recovery_log: Lines
) -> None:
    # Given a worker (one thread, heartbeat timeout 1 s) running a task that waits, with
    # five more of its tasks prefetched behind it
    p = proxied(heartbeat_timeout_ms=HEARTBEAT_MS)
    runs = Runs(6)
    started, release = threading.Event(), threading.Event()

    @dramaturg.actor(queue_name="claims")
    def work(n: int) -> None:
        if n == 0 and not started.is_set():
            started.set()
            release.wait(RECOVER_S)
        runs.record(n)

    worker = workers(p.broker, threads=1)
    first = work.send(0)
    for n in range(1, 6):
        work.send(n)
    assert started.wait(RECOVER_S)
    poll_until(lambda: p.claimed() == {"claims": 6}, "the worker holding the six tasks")

    # When it is cut off from Redis for 3 s, and meanwhile another worker takes it for
    # dead, recovers its six messages and takes them
    other = OtherWorker(p)
    with fault(p, kind):
        cut_at = time.monotonic()
        assert poll_until(other.recover, "the worker taken for dead", CUT_S) == 6
        assert len(other.take()) == 6
        time.sleep(max(0.0, CUT_S - (time.monotonic() - cut_at)))  # the rest of the cut

    # Then, back, it starts none of the five it was holding; the task that was running
    # meanwhile ends (it runs again on the other worker: a line says so), and its
    # acknowledgement leaves the other worker's six messages alone
    taken = recovery_log.wait_for("this worker was taken for dead", RECOVER_S)
    release.set()
    again = recovery_log.wait_for("runs again: this worker was taken for dead", RECOVER_S)
    time.sleep(1.0)  # a thread would start a dropped message by now
    worker.stop()
    assert dict(runs.counts) == {0: 1}
    assert "another worker recovered 6 of the messages it held" in taken
    assert "the 5 waiting here are dropped, not run" in taken
    assert first.message_id in again
    assert len(other.holds()) == 6
    assert p.claimed() == {}


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_an_acknowledgement_whose_claim_was_recovered_leaves_the_new_holders_message_alone(
    proxied: Callable[..., Proxied], workers: Callable[..., dramatiq.Worker], recovery_log: Lines
) -> None:
    # Given a worker running a task that waits, taken for dead by another worker which
    # recovers the message and claims it while this one is cut off
    p = proxied(heartbeat_timeout_ms=HEARTBEAT_MS)
    runs = Runs(1)
    started, release = threading.Event(), threading.Event()

    @dramaturg.actor(queue_name="claims")
    def work(n: int) -> None:
        if not started.is_set():
            started.set()
            release.wait(RECOVER_S)
        runs.record(n)

    message = work.send(0)
    worker = workers(p.broker, threads=1)
    assert started.wait(RECOVER_S)
    other = OtherWorker(p)
    with p.proxy.silent():
        assert poll_until(other.recover, "the worker taken for dead", CUT_S) == 1
        (redis_id,) = other.take()  # the new holder claims it before the old one comes back

    # When the task ends on the worker that was taken for dead, which acknowledges it
    release.set()
    line = recovery_log.wait_for("runs again: this worker was taken for dead", RECOVER_S)
    worker.stop()

    # Then its acknowledgement changed nothing: the new holder still has its claim and body
    assert message.message_id in line
    assert other.holds() == [redis_id]
    assert dead_letters(p) == 0
    assert dict(runs.counts) == {0: 1}


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_after_an_outage_seen_by_every_worker_none_takes_another_for_dead(
    proxied: Callable[..., Proxied], caplog: pytest.LogCaptureFixture
) -> None:
    # Given two workers' heartbeat threads (timeout 1 s) behind the proxy, each holding a claim
    p = proxied(heartbeat_timeout_ms=HEARTBEAT_MS)
    namespace = p.broker.namespace
    brokers = [DramatiqRedisBroker(client=p.broker.client, namespace=namespace) for _ in range(2)]
    threads = [_RecoveryThread(RedisRecoverer(broker, HEARTBEAT_MS), 0.2) for broker in brokers]
    for n, broker in enumerate(brokers):
        p.direct.hset(f"{namespace}:claims.msgs", f"held-{n}", b"{}")
        p.direct.sadd(f"{namespace}:__acks__.{broker.broker_id}.claims", f"held-{n}")
        threads[n].tick()

    # When Redis is unreachable for 1.5 s (each heartbeat fails), then back
    with p.proxy.down():
        time.sleep(1.5 * HEARTBEAT_MS / 1000)  # the outage itself
        for thread in threads:
            thread.tick()

    # Then the first to beat again does not take the other, whose heartbeat is as old as
    # its own, for dead
    with caplog.at_level(logging.DEBUG, logger="dramaturg.recovery"):
        for thread in threads:
            thread.tick()
    assert not [r for r in caplog.records if "dead worker" in r.getMessage()]
    for broker in brokers:
        assert p.direct.scard(f"{namespace}:__acks__.{broker.broker_id}.claims") == 1


# -- the client's read timeout ---------------------------------------------------------


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_redis_that_stops_answering_is_given_up_on_within_half_the_heartbeat_timeout(
    proxied: Callable[..., Proxied],
) -> None:
    # Given a broker whose heartbeat timeout is 1 s
    p = proxied(heartbeat_timeout_ms=HEARTBEAT_MS)
    p.broker.client.ping()
    outcome: list[BaseException | float] = []

    def ping() -> None:
        began = time.monotonic()
        try:
            p.broker.client.ping()
        except redis.RedisError as error:
            outcome.append(error)
        outcome.append(time.monotonic() - began)

    # When Redis stops answering without closing the connection (a black hole)
    with p.proxy.silent():
        pinger = threading.Thread(target=ping, daemon=True)
        pinger.start()
        pinger.join(3.0)

    # Then the command fails after half of it, not when TCP gives up
    assert not pinger.is_alive(), "the command still waits"
    error, waited = outcome
    assert isinstance(error, redis.TimeoutError)
    assert isinstance(waited, float) and waited < 0.9 * HEARTBEAT_MS / 1000


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_the_redis_client_waits_10_s_at_most_and_probes_idle_connections(broker_kind: str, broker: Any) -> None:
    # Given a broker with the default heartbeat timeout (60 s)
    connection = broker.client.connection_pool.get_connection()
    try:
        connection.connect()
        sock = connection._sock

        # Then its connections wait 10 s at most for an answer, and on TCP (the embedded
        # server is on a Unix socket) keepalive probes go after 10 s idle, every 3 s, 3 of them
        assert sock.gettimeout() == 10.0
        if broker_kind == "redis":
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    finally:
        broker.client.connection_pool.release(connection)


# -- outcomes that cannot be written while Redis is down ----------------------------------


@pytest.mark.parametrize("outcome", ["retry", "hold", "suspend"])
@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_an_outcome_that_cannot_be_written_while_redis_is_down_is_not_dead_lettered(
    outcome: str,
    proxied: Callable[..., Proxied],
    workers: Callable[..., dramatiq.Worker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a task whose first run retries, holds or suspends its queue, once Redis is down
    p = proxied(heartbeat_timeout_ms=2_000)
    began, go = threading.Event(), threading.Event()
    runs: list[int] = []

    @dramaturg.actor(queue_name="claims", max_retries=3, min_backoff=10, max_backoff=10)
    def fragile() -> None:
        task = dramaturg.current_task()
        runs.append(task.attempt)
        if len(runs) > 1 and not (outcome == "hold" or task.attempt == 1):
            return
        if len(runs) == 1:
            began.set()
            go.wait(RECOVER_S)
        if outcome == "retry":
            task.retry(10)
        elif outcome == "hold":
            task.hold("needs a human")
        elif len(runs) == 1:
            raise dramaturg.SuspendQueue(100)

    message = fragile.send()
    worker = workers(p.broker, threads=1)
    assert began.wait(RECOVER_S)

    # When it ends while Redis cannot be reached (every try to write its outcome fails)
    with caplog.at_level(logging.WARNING), p.proxy.down():
        go.set()
        line = poll_until(
            lambda: next((r for r in caplog.records if "left unsettled" in r.getMessage()), None),
            "the outcome given up on",
            RECOVER_S,
        )

    # Then it is not dead-lettered: back on its queue once Redis answers, it runs again
    # and ends as it should have (retried and done, held, released and done)
    assert line.levelname == "ERROR"
    assert message.message_id in line.getMessage() and "runs again" in line.getMessage()
    if outcome == "hold":
        poll_until(lambda: dramaturg.held_tasks().get(message.message_id, "claims"), "the task held", RECOVER_S)
    else:
        poll_until(lambda: p.broker.pending("claims") == 0 and len(runs) >= 2, "the task done", RECOVER_S)
    poll_until(lambda: p.claimed() == {}, "nothing left claimed", RECOVER_S)
    worker.stop()
    assert dead_letters(p) == 0
    assert not [r for r in caplog.records if r.levelname == "CRITICAL" and r.name.startswith("dramaturg")]


# -- a copy written twice ------------------------------------------------------------------


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_copy_whose_write_runs_twice_is_queued_once(broker: Any) -> None:
    # Given a message on its queue, and its retry copy as the Outcomes middleware makes it
    @dramaturg.actor(queue_name="claims")
    def work(n: int) -> None: ...

    sent = work.send(1)
    copy = sent.copy(options={"retries": 1})
    namespace = broker.namespace

    # When the copy is enqueued twice (a write run again after its reply was lost)
    first = broker.enqueue_copy(copy, delay=60_000)
    second = broker.enqueue_copy(copy, delay=60_000)

    # Then it is there once, under an id derived from the original's
    assert first.options["redis_message_id"] == second.options["redis_message_id"] != sent.options["redis_message_id"]
    assert broker.client.llen(f"{namespace}:claims.DQ") == broker.client.hlen(f"{namespace}:claims.DQ.msgs") == 1
    # and a copy of another attempt, or of the copy, is another message
    broker.enqueue_copy(sent.copy(options={"retries": 2}), delay=60_000)
    broker.enqueue_copy(first, delay=60_000)
    assert broker.client.llen(f"{namespace}:claims.DQ") == 3
    # and so is each copy a handler enqueues itself, as in Dramatiq
    broker.enqueue(copy, delay=60_000)
    broker.enqueue(copy, delay=60_000)
    assert broker.client.llen(f"{namespace}:claims.DQ") == 5


@pytest.mark.parametrize("broker_kind", REDIS_LIKE)
def test_a_send_after_redis_closed_the_senders_idle_connection_goes_through(broker: Any) -> None:
    # Given a sender that sent once, its connection then idle
    @dramaturg.actor(queue_name="claims")
    def work(n: int) -> None: ...

    work.send(1)

    # When Redis closes it meanwhile (a restart, a timeout, CLIENT KILL)
    pool = broker.client.connection_pool
    killer = redis.Redis(connection_pool=type(pool)(connection_class=pool.connection_class, **pool.connection_kwargs))
    try:
        assert killer.client_kill_filter(_type="normal", skipme=True) >= 1
    finally:
        killer.close()

    # Then the next send opens a new connection rather than failing on the dead one
    work.send(2)
    assert broker.client.llen(f"{broker.namespace}:claims") == 2


@pytest.fixture
def paused_server(broker_kind: str, settings: dramaturg.Settings) -> Iterator[tuple[Any, Callable[[], Any]]]:
    """The embedded broker (heartbeat timeout 2 s), and a way to pause its server
    (SIGSTOP; a context manager that resumes it)."""
    assert broker_kind == "embedded"
    built = settings.model_copy(update={"broker": settings.broker.model_copy(update={"heartbeat_timeout": 2_000})})
    broker = dramaturg.bootstrap(built)
    pid = int(Path(f"{embedded_path(built.broker.url or '')}.pid").read_text())

    @contextlib.contextmanager
    def paused() -> Iterator[None]:
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    yield broker, paused
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("broker_kind", ["embedded"])
def test_a_retry_published_while_the_embedded_server_is_paused_runs_once(
    paused_server: tuple[Any, Callable[[], Any]],
    workers: Callable[..., dramatiq.Worker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a task whose first attempt fails, and whose retry is published while the
    # server is paused for 6 s (every write times out; each ran once the server resumed)
    broker, paused = paused_server
    began, go = threading.Event(), threading.Event()
    attempts: list[int] = []

    @dramaturg.actor(queue_name="claims", max_retries=3, min_backoff=500, max_backoff=500)
    def flaky() -> None:
        attempt = dramaturg.current_task().attempt
        attempts.append(attempt)
        if attempt == 1 and len(attempts) == 1:
            began.set()
            go.wait(RECOVER_S)
        if attempt == 1:
            raise RuntimeError("fails its first attempt")

    message = flaky.send()
    worker = workers(broker, threads=1)
    assert began.wait(RECOVER_S)
    with caplog.at_level(logging.WARNING), paused():
        go.set()
        time.sleep(6.0)  # the pause itself

    # Then its second attempt runs once: the writes that ran late queued one copy
    poll_until(lambda: 2 in attempts and broker.pending("claims") == 0, "the second attempt done", RECOVER_S)
    time.sleep(1.0)  # a second copy, if any, would be due by now
    worker.stop()
    assert attempts.count(2) == 1, attempts
    assert broker.pending("claims") == 0
    failed = [r.getMessage() for r in caplog.records if message.message_id in r.getMessage()]
    assert failed, "the failure is logged"
