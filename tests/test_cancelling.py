"""Cancelling tasks and batches: a waiting task is skipped, a running one interrupted, a held
one purged; each ends as cancelled, never failed nor retried. On RabbitMQ (with a Redis
state store), Redis and embedded, and in eager mode where it applies."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg.cancelling import settle, watch_of
from dramaturg.status import state_store

from .conftest import Runs, bin_path, poll_until, run_cli, settings_with_state, switching_every_microsecond
from .test_status import status_when

REAL_BROKERS = ("rabbitmq", "redis", "embedded")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=REAL_BROKERS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dramaturg.Settings:
    """A namespace of this test's own; RabbitMQ gets the private Redis as its state store."""
    return settings_with_state(broker_kind, request, tmp_path, worker={"threads": 2})


def test_a_waiting_task_is_skipped_and_never_runs(broker: dramatiq.Broker, start_worker: Callable[..., Any]) -> None:
    ran, attempts = Runs(), Runs()
    busy, release = threading.Event(), threading.Event()

    @dramaturg.actor(queue_name="cancel-waiting")
    def work(n: int) -> None:
        ran.add(n)

    @dramaturg.actor(queue_name="cancel-waiting")
    def blocker() -> None:
        busy.set()
        release.wait(30)

    @dramaturg.actor(queue_name="cancel-waiting", min_backoff=2_000, max_backoff=2_000)
    def flaky() -> None:
        attempts.add(1)
        raise ValueError("the shop's API said 503")

    # Given a worker of one thread, busy; a task waiting for its retry, and tasks queued
    # and delayed behind the busy one
    start_worker(threads=1)
    retried = flaky.send()
    attempts.wait(1)
    status_when(retried.message_id, "retrying")
    blocker.send()
    assert busy.wait(20)
    queued = [work.send(n) for n in range(6)]
    delayed = work.send_with_options(args=(100,), delay=1_500)

    # When the retrying one, the delayed one and two queued ones are cancelled, and then the
    # worker goes on
    cancelled = [retried, delayed, queued[1], queued[4]]
    answers = [dramaturg.cancel(m.message_id, by="ops@test") for m in cancelled]
    release.set()

    # Then each was asked for as it waited
    assert [(a.outcome, a.state) for a in answers][:2] == [("requested", "retrying"), ("requested", "delayed")]
    assert {a.outcome for a in answers} == {"requested"}

    # and each ends as cancelled, with who asked, without its handler running again
    for message in cancelled:
        status = status_when(message.message_id, "cancelled")
        assert status.cancel_requested_by == "ops@test" and status.cancel_requested_at is not None
    ran.wait(4)
    assert sorted(ran.seen) == [0, 2, 3, 5]
    assert len(attempts.seen) == 1
    # every task is accounted for: sent == succeeded + cancelled + held + queued
    sent = [retried, delayed, *queued]
    states = [status_when(m.message_id, "cancelled" if m in cancelled else "succeeded").state for m in sent]
    assert (states.count("succeeded"), states.count("cancelled")) == (4, 4)
    # and a cancelled task is neither failed nor retried in the counts (one failed attempt came before)
    counts = state_store().minute_counts(["cancel-waiting"])["cancel-waiting"]
    assert (counts["processed"], counts["failed"], counts["retried"], counts["held"]) == (10, 1, 1, 0)


def test_a_running_task_is_interrupted_within_a_second_whatever_it_catches(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    started, ended = threading.Event(), Runs()

    # Given a task that runs Python code and swallows every Exception
    @dramaturg.actor(queue_name="cancel-running", max_retries=3, min_backoff=10, max_backoff=10)
    def stubborn() -> None:
        started.set()
        try:
            while True:
                try:
                    time.sleep(0.01)
                except Exception:  # all of them: what the interrupt must get past
                    continue
        finally:
            ended.add(time.monotonic())

    start_worker(threads=2, queues={"cancel-running"})
    message = stubborn.send()
    assert started.wait(20)
    status_when(message.message_id, "running")

    # When it is cancelled
    asked = time.monotonic()
    answer = dramaturg.cancel(message.message_id)

    # Then it is interrupted within a second, and ends cancelled at its first attempt
    assert (answer.outcome, answer.state) == ("requested", "running")
    (interrupted_at,) = ended.wait(1)
    assert interrupted_at - asked < 1.0
    status = status_when(message.message_id, "cancelled")
    assert status.attempt == 1 and status.last_error is None
    assert status.cancel_requested_by  # user@host by default
    counts = state_store().minute_counts(["cancel-running"])["cancel-running"]
    assert (counts["processed"], counts["failed"], counts["retried"]) == (1, 0, 0)
    # not retried: a cancel of it now says it had ended, as cancelled
    again = dramaturg.cancel(message.message_id)
    assert (again.outcome, again.state) == ("ended", "cancelled")
    assert len(ended.seen) == 1


def test_a_held_task_is_purged_and_its_status_says_cancelled(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    @dramaturg.actor(queue_name="cancel-held")
    def picky() -> None:
        dramaturg.current_task().hold("row 7 has no email")

    start_worker(threads=1, queues={"cancel-held"})
    message = picky.send()
    status_when(message.message_id, "held")

    answer = dramaturg.cancel(message.message_id, by="ops@test")

    assert (answer.outcome, answer.state) == ("purged", "held")
    assert dramaturg.held_tasks().get(message.message_id) is None
    status = status_when(message.message_id, "cancelled")
    assert status.cancel_requested_by == "ops@test"
    assert status.reason == "was held (row 7 has no email), then purged"


def test_a_held_task_kicked_after_its_cancel_lapsed_runs_and_one_cancelled_while_held_does_not(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    ran = Runs()

    @dramaturg.actor(queue_name="cancel-lapsed")
    def picky(n: int) -> None:
        task = dramaturg.current_task()
        if task.kicks == 0:
            task.hold("row 7 has no email")
        ran.add(n)

    # Given two held tasks: one that ended held while a cancel request was on its way (the
    # request, made while it ran, lapsed: its status says held, and the request is kept),
    # and one whose cancel came once it was held, its purge beaten by the kick below
    start_worker(threads=1, queues={"cancel-lapsed"})
    lapsed, deliberate = picky.send(7), picky.send(8)
    for message in (lapsed, deliberate):
        status_when(message.message_id, "held")
    requests = watch_of(broker).requests(broker)
    held_at = dramaturg.held_tasks().get(lapsed.message_id).held_at  # type: ignore[union-attr]
    before = json.dumps({"by": "ops@test", "at": held_at - 2_000})
    requests._script(keys=[requests.prefix, requests.feed_key], args=[requests.ttl_ms, before, lapsed.message_id])
    requests.request([deliberate.message_id], "ops@test")
    settle()  # as cancel() does: from now on every worker knows of them before it takes a task

    # When both are kicked: a later decision to run them
    assert dramaturg.held_tasks().kick("cancel-lapsed") == 2

    # Then the one whose request lapsed runs, and succeeds, rather than being skipped
    assert ran.wait(1) == [7]
    status_when(lapsed.message_id, "succeeded")
    # and the one cancelled while held is skipped, as its cancel said
    assert status_when(deliberate.message_id, "cancelled").cancel_requested_by == "ops@test"
    assert ran.seen == [7]


def test_cancelling_a_batch_cancels_the_members_that_have_not_ended(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    go = threading.Event()
    report, notify = Runs(), Runs()

    @dramaturg.actor(queue_name="cancel-batch")
    def member(n: int) -> None:
        if n == 1:
            dramaturg.current_task().hold("row 1 has no email")
        while n >= 2 and not go.is_set():  # Python code, where an interrupt lands
            time.sleep(0.01)

    @dramaturg.actor(queue_name="cancel-batch", actor_name="report")
    def on_complete(summary: dict[str, Any]) -> None:
        report.add(summary)

    @dramaturg.actor(queue_name="cancel-batch", actor_name="notify")
    def on_success(summary: dict[str, Any]) -> None:
        notify.add(summary)

    # Given a batch of 12 of which one succeeded, one is held, two run and eight wait
    start_worker(threads=2, queues={"cancel-batch"})
    batch = dramaturg.batch("cancel me", on_complete=on_complete.message(), on_success=on_success.message())
    with batch:
        member.send_many(range(12))
    poll_until(
        lambda: (s := batch.status()).succeeded == 1 and s.held == 1 and s.running == 2,
        "one member succeeded, one held, two running",
    )

    # When the batch is cancelled
    answer = dramaturg.cancel_batch(batch.id, by="ops@test")

    # Then the ten that had not ended end as cancelled, and on_complete fires once with them counted
    assert (answer.requested, answer.state) == (10, "running")
    (summary,) = report.wait(1)
    assert (summary["total"], summary["succeeded"], summary["cancelled"], summary["failed"]) == (12, 1, 10, 1)
    status = batch.status()
    assert (status.state, status.ended, status.cancelled, status.cancel_requested_by) == (
        "complete",
        12,
        10,
        "ops@test",
    )
    assert notify.seen == []

    # When the held member, which had ended, is cancelled by its id, it moves from failed to cancelled
    (held,) = dramaturg.held_tasks().list("cancel-batch")
    assert dramaturg.cancel(held.message_id).outcome == "purged"
    status = batch.status()
    assert (status.succeeded, status.failed, status.held, status.cancelled) == (1, 0, 0, 11)
    # and cancelling it again says it had ended
    assert dramaturg.cancel_batch(batch.id).state == "complete"
    assert len(report.seen) == 1


def test_the_cancel_commands(
    broker: dramatiq.Broker, start_worker: Callable[..., Any], observed_project: Any, tmp_path: Path
) -> None:
    @dramaturg.actor(queue_name="cancel-cli")
    def work() -> None:
        pass

    start_worker(threads=1, queues={"cancel-cli"})
    done = work.send()
    status_when(done.message_id, "succeeded")
    waiting = observed_project.ok.send(1)  # no worker takes its queue; the command's app declares it
    batch = dramaturg.batch("done already")
    with batch:
        work.send()
    poll_until(lambda: batch.status().state == "complete", "the batch completes")
    cli = bin_path("dramaturg")

    # A waiting task: requested, exit 0
    asked = run_cli([cli, "cancel", waiting.message_id, "--by", "ops"], cwd=tmp_path, PYTHONPATH=str(REPO))
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.strip() == (
        f"{waiting.message_id}: cancel requested: it was queued; it is skipped when a worker takes it"
    )
    assert dramaturg.task_status(waiting.message_id).cancel_requested_by == "ops"

    # A task that had ended: says how, exit 4 (--json: one object per id)
    ended = run_cli([cli, "cancel", done.message_id, "--json"], cwd=tmp_path, PYTHONPATH=str(REPO))
    assert ended.returncode == 4, ended.stderr
    assert json.loads(ended.stdout)["outcome"] == "ended" and json.loads(ended.stdout)["state"] == "succeeded"
    said = run_cli([cli, "cancel", done.message_id], cwd=tmp_path, PYTHONPATH=str(REPO))
    assert said.returncode == 4
    assert said.stdout.startswith(f"{done.message_id}: not cancelled: it had already ended: succeeded at 20")

    # An unknown id: one line, exit 1 (the others are still cancelled)
    unknown = run_cli([cli, "cancel", "nope", waiting.message_id], cwd=tmp_path, PYTHONPATH=str(REPO))
    assert unknown.returncode == 1
    assert unknown.stderr.strip().splitlines() == [
        "dramaturg: no task 'nope': never sent, or its record expired ([state] ttl)"
    ]

    # Batches: a complete one exits 4, an unknown one 1
    complete = run_cli([cli, "batch", "cancel", batch.id], cwd=tmp_path, PYTHONPATH=str(REPO))
    assert complete.returncode == 4, complete.stderr
    assert complete.stdout.startswith(f"{batch.id}: it had already ended: 1 succeeded")
    nobatch = run_cli([cli, "batch", "cancel", "nope"], cwd=tmp_path, PYTHONPATH=str(REPO))
    assert nobatch.returncode == 1
    assert nobatch.stderr.strip().splitlines() == [
        "dramaturg: no batch 'nope': never made, or expired after it ended ([batch] ttl)"
    ]

    # In JSON mode those lines are JSON objects too
    for argv in (["cancel", "nope"], ["batch", "cancel", "nope"]):
        said = run_cli([cli, "--log-format", "json", *argv], cwd=tmp_path, PYTHONPATH=str(REPO))
        assert said.returncode == 1
        (line,) = said.stderr.strip().splitlines()
        assert json.loads(line)["message"].startswith(("no task 'nope'", "no batch 'nope'")), line


@pytest.mark.parametrize("broker_kind", ["eager"])
def test_in_eager_mode_a_task_has_ended_when_send_returns(broker: dramatiq.Broker) -> None:
    @dramaturg.actor(queue_name="cancel-eager", max_retries=0)
    def task(hold: bool) -> None:
        if hold:
            dramaturg.current_task().hold("asked to")

    ran = task.send(False)
    answer = dramaturg.cancel(ran.message_id)
    assert (answer.outcome, answer.detail) == (
        "ended",
        "eager mode: a task has already ended when send() returns; nothing to cancel",
    )

    with pytest.raises(dramaturg.TaskHeld) as held:
        task.send(True)
    assert held.value.task is not None
    purged = dramaturg.cancel(held.value.task.message_id)
    assert (purged.outcome, purged.state) == ("purged", "held")
    assert dramaturg.held_tasks().count() == 0


def test_rabbitmq_without_a_state_store_says_what_to_set(rabbitmq_server: Any) -> None:
    url = f"amqp://guest:guest@{rabbitmq_server.host}:{rabbitmq_server.port}/%2F"
    dramaturg.bootstrap(dramaturg.Settings(broker={"url": url, "namespace": "test-cancel-nostore"}))
    with pytest.raises(dramaturg.StateUnavailable, match=r"cancelling needs a state store.*\[state\] url"):
        dramaturg.cancel(str(uuid.uuid4()))


def test_two_cancels_racing_make_one_request_and_a_worker_reads_each_once(redis_server: Any) -> None:
    import redis

    from dramaturg.cancelling.requests import CancelRequests

    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    requests = CancelRequests(client, namespace=f"test-{uuid.uuid4().hex[:8]}", ttl_ms=60_000)
    for round_ in range(50):
        # Given two callers asking to cancel the same task at the same instant
        message_id = f"task-{round_}"
        barrier = threading.Barrier(2)
        new: list[tuple[str, list[str]]] = []

        def ask(by: str, message_id: str = message_id, barrier: Any = barrier, new: Any = new) -> None:
            barrier.wait()
            new.append((by, requests.request([message_id], by)))

        threads = [threading.Thread(target=ask, args=(by,)) for by in ("ada", "bob")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        # Then one request is made, and it is the one the store keeps
        (winner,) = [by for by, made in new if made == [message_id]]
        assert [made for _, made in new].count([]) == 1
        stored = requests.get(message_id)
        assert stored is not None and stored.by == winner

    # and a reader of the feed sees each request once, in order, reading on from where it stopped
    found, last = requests.feed(None)
    assert [(message_id, withdrawn) for message_id, _, withdrawn in found] == [(f"task-{n}", False) for n in range(50)]
    assert requests.feed(last) == ([], last)
    requests.request(["task-50", "task-0"], "ada")
    found, last = requests.feed(last)
    assert [message_id for message_id, _, _ in found] == ["task-50"]
    # and a withdrawal (a kick's) comes after the request it withdraws, and a new request after it
    # (only a request made before its task was held: a later one is a deliberate cancel)
    now_ms = int(time.time() * 1000) + 60_000
    assert requests.withdraw({"task-3": now_ms, "task-999": now_ms, "task-4": 0}) == ["task-3"]
    assert requests.get("task-3") is None and requests.get("task-4") is not None
    assert requests.request(["task-3"], "bob") == ["task-3"]
    found, _ = requests.feed(last)
    assert [(message_id, withdrawn) for message_id, _, withdrawn in found] == [("task-3", True), ("task-3", False)]


def test_a_task_cancelled_the_moment_it_was_sent_never_runs(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    ran = Runs()

    @dramaturg.actor(queue_name="cancel-at-once")
    def work(n: int) -> None:
        ran.add(n)

    # Given a task sent and cancelled at once (its first record may not be written yet)
    message = work.send(1)
    assert dramaturg.cancel(message.message_id).outcome == "requested"

    # When a worker takes it, and then the next one
    start_worker(threads=1)
    work.send(2)

    # Then only the next one ran
    assert ran.wait(1) == [2]
    assert status_when(message.message_id, "cancelled").attempt == 1


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_cancelling_a_purged_task_says_it_had_ended(broker: dramatiq.Broker) -> None:
    @dramaturg.actor(queue_name="cancel-purged")
    def work() -> None:
        pass

    # Given a task purged from its queue
    message = work.send()
    assert dramaturg.purge_queue("cancel-purged") == 1

    # When it is cancelled
    answer = dramaturg.cancel(message.message_id)

    # Then nothing is requested: it had ended, purged
    assert (answer.outcome, answer.state) == ("ended", "purged")
    assert answer.detail.startswith("it was purged from its queue")


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_a_stopped_worker_leaves_no_cancel_reader_behind(
    broker: dramatiq.Broker, start_worker: Callable[..., Any]
) -> None:
    ran = Runs()

    @dramaturg.actor(queue_name="cancel-reader")
    def work() -> None:
        ran.add(1)

    def readers() -> int:
        return sum(thread.name == "dramaturg-cancel-watch" and thread.is_alive() for thread in threading.enumerate())

    # Given a worker that ran a task (its process reads the cancel feed meanwhile)
    before = readers()
    worker = start_worker(threads=1, queues={"cancel-reader"})
    work.send()
    ran.wait(1)
    assert readers() == before + 1

    # When it stops, its reader thread ends with it
    worker.stop()
    assert readers() == before


def test_the_reader_finds_the_store_answering_again_while_no_task_runs() -> None:
    # Pure logic, with a feed of the test's own: a read failed (the store did not answer) and
    # then the process had no task to run. Threads taking a task do not read while the last
    # read failed, so the reader thread itself must find out that the store answers again:
    # had it slept until a task was taken, a task cancelled meanwhile would start unchecked.
    from dramaturg.cancelling.watch import _Watcher

    class Feed:
        ttl_ms = 60_000
        answers = 0

        def feed(self, after: str | None) -> tuple[list[tuple[str, float, bool]], str | None]:
            self.answers += 1
            if self.answers == 1:
                raise ConnectionError("the state store does not answer")
            return [("cancelled-meanwhile", time.time() * 1000, False)], "1-0"

    watcher = _Watcher(Feed())  # type: ignore[arg-type]
    try:
        watcher.read()
        assert watcher.failing
        watcher.wake()  # a task was taken and ended at once: nothing runs now

        poll_until(lambda: not watcher.failing, "the reader reads again while idle", timeout=5)
        assert "cancelled-meanwhile" in watcher.cancelled
    finally:
        watcher.stop()


def test_a_read_interrupted_after_the_feed_answered_is_read_again() -> None:
    # Pure logic, with a feed of the test's own: a worker thread reads the feed with its
    # task's TTR deadline armed, and the interrupt may land while the requests found are
    # being recorded. Where the feed ended must not be kept then: the next read starts
    # where that one did, and finds the requests it had not recorded.
    from dramaturg.cancelling.watch import _Watcher

    class Interrupted(BaseException):
        pass

    class Landing:
        """The requests found; the interrupt lands after the first is recorded."""

        def __iter__(self) -> Any:
            yield ("first", time.time() * 1000, False)
            raise Interrupted

    class Feed:
        ttl_ms = 60_000

        def __init__(self) -> None:
            self.afters: list[str | None] = []

        def feed(self, after: str | None) -> tuple[Any, str | None]:
            self.afters.append(after)
            if len(self.afters) == 1:
                return Landing(), "2-0"
            return [("first", time.time() * 1000, False), ("second", time.time() * 1000, False)], "2-0"

    feed = Feed()
    watcher = _Watcher(feed)  # type: ignore[arg-type]
    try:
        with pytest.raises(Interrupted):
            watcher.read()
        watcher.read()
        assert feed.afters[:2] == [None, None]
        assert {"first", "second"} <= set(watcher.cancelled)
    finally:
        watcher.stop()


def test_the_reader_interrupts_a_running_task_whose_interrupt_was_lost_and_no_other() -> None:
    # Pure logic: a request was recorded by a worker thread's read, but the interrupt it
    # was to send to the running task was lost (that thread interrupted meanwhile). The
    # reader thread, polling while tasks run, sends it; not to a running task named by an
    # older request (it may no longer stand: kicked since, its withdrawal not read yet).
    from dramaturg.cancelling.watch import _Watcher

    class Feed:
        ttl_ms = 60_000

        def __init__(self) -> None:
            self.reads = 0
            self.polled = threading.Event()

        def feed(self, after: str | None) -> tuple[list[tuple[str, float, bool]], str | None]:
            self.reads += 1
            if self.reads == 1:
                return [("lost", time.time() * 1000, False)], "1-0"
            if self.reads >= 4:
                self.polled.set()
            return [], after

    class Deadline:
        def __init__(self) -> None:
            self.fired = threading.Event()

        def fire(self, exception: type[BaseException]) -> bool:
            if self.fired.is_set():
                return False
            self.fired.set()
            return True

    feed = Feed()
    watcher = _Watcher(feed)  # type: ignore[arg-type]
    try:
        lost, older = Deadline(), Deadline()
        watcher.running["lost"] = lost  # type: ignore[assignment]
        watcher.running["older"] = older  # type: ignore[assignment]
        watcher.cancelled["older"] = time.time() * 1000 - 5_000
        with watcher._lock:
            assert watcher._read(None) == ["lost"]  # recorded; its interrupt never sent
        watcher.wake()
        assert lost.fired.wait(5)
        assert feed.polled.wait(5)  # three polls more
        assert not older.fired.is_set()
    finally:
        watcher.stop()


def test_a_kicked_task_taken_while_the_reader_prunes_never_fails() -> None:
    # Pure logic, with a feed of the test's own: a cancelled task that was kicked (its
    # request withdrawn, the feed not saying so yet) is looked up when a worker takes it,
    # and forgotten. A read prunes old requests meanwhile, once a minute; switching threads
    # every microsecond, the forgetting landed inside the prune, whose walk over the
    # requests then raised RuntimeError: out of this test's read (in a worker thread's read,
    # failing whichever task it was taking; in the reader thread, logged, and the prune put
    # off for a minute).
    from dramaturg.cancelling.watch import CancelWatch, _Watcher

    class Withdrawn:
        ttl_ms = 60_000

        def feed(self, after: str | None) -> tuple[list[tuple[str, float, bool]], str | None]:
            return [], after

        def get(self, message_id: str) -> None:
            return None  # kicked: the request is withdrawn

    watcher = _Watcher(Withdrawn())  # type: ignore[arg-type]
    watch = CancelWatch(url=None, ttl_ms=60_000)
    ids = [f"kicked-{j}" for j in range(200)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def take_kicked_tasks() -> None:
        while not stop.is_set():
            for message_id in ids:
                try:
                    assert not watch._still_requested(watcher, message_id)
                except BaseException as error:
                    errors.append(error)
                    return

    try:
        with switching_every_microsecond():
            taker = threading.Thread(target=take_kicked_tasks, daemon=True)
            taker.start()
            try:
                for _ in range(300):
                    with watcher._lock:
                        watcher.cancelled.update(dict.fromkeys(ids, 1.0))
                    watcher._newest, watcher._pruned_at = 2.0, float("-inf")  # a prune is due
                    watcher.read()
            finally:
                stop.set()
                taker.join(timeout=60)
    finally:
        watcher.stop()
    assert errors == []  # each look-up answered that the request no longer stands
