"""Schedules: slots (cron with time zones across daylight-saving changes, every=), the
ledger that fires each slot once however many schedulers race (RabbitMQ with a Redis
state store, Redis, embedded; eager for inline runs), restarts, catch-up, pause, and the
bad input a scheduler refuses to start with."""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import dramatiq
import pytest

import dramaturg
from dramaturg import schedules
from dramaturg.schedules import Schedule, Scheduler, firing_id, load_schedules, state_of
from dramaturg.schedules.state import CLAIMED, MemoryScheduleState, RedisScheduleState

from .conftest import (
    Runs,
    bin_path,
    broker_url,
    free_port,
    pending_messages,
    poll_until,
    run_cli,
    settings_with_state,
    write_config,
)

PARIS = ZoneInfo("Europe/Paris")
REAL_BROKERS = ("rabbitmq", "redis", "embedded")


@pytest.fixture(autouse=True)
def forget_declared() -> Iterator[None]:
    schedules._forget_declared()
    yield
    schedules._forget_declared()


@pytest.fixture(params=REAL_BROKERS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dramaturg.Settings:
    """A namespace of this test's own; RabbitMQ gets the private Redis as its state store."""
    return settings_with_state(broker_kind, request, tmp_path)


def at(year: int, month: int, day: int, hour: int, minute: int = 0) -> int:
    """An instant in Paris, as ms since the epoch."""
    return int(datetime(year, month, day, hour, minute, tzinfo=PARIS).timestamp() * 1000)


def local(slots: list[int]) -> list[str]:
    return [datetime.fromtimestamp(s / 1000, PARIS).isoformat() for s in slots]


# -- slots: pure logic -----------------------------------------------------------------------


def test_a_daily_slot_in_the_skipped_hour_fires_when_the_clock_jumps_forward() -> None:
    # Given 02:30 every day in Paris, where 2026-03-29 02:00 does not exist (-> 03:00)
    daily = Schedule(id="d", actor="a", cron="30 2 * * *", timezone="Europe/Paris")
    # Then that day's slot is 03:00 CEST (cronsim, like Debian's cron), the others 02:30
    assert local(daily.slots_between(at(2026, 3, 28, 12), at(2026, 3, 31, 12))) == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]


def test_an_hourly_slot_has_no_skipped_hour_and_both_repeated_hours() -> None:
    hourly = Schedule(id="h", actor="a", cron="0 * * * *", timezone="Europe/Paris")
    # Clocks go forward: 01:00 CET, then 03:00 CEST, one hour of real time later
    spring = hourly.slots_between(at(2026, 3, 29, 0, 30), at(2026, 3, 29, 3, 30))
    assert local(spring) == ["2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00"]
    assert spring[1] - spring[0] == 3_600_000
    # Clocks go back: 02:00 comes twice (CEST, then CET), each a slot of its own
    autumn = hourly.slots_between(at(2026, 10, 25, 0, 30), at(2026, 10, 25, 3, 30))
    assert local(autumn) == [
        "2026-10-25T01:00:00+02:00",
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]
    assert [b - a for a, b in itertools.pairwise(autumn)] == [3_600_000] * 3


def test_a_daily_slot_in_the_repeated_hour_fires_once() -> None:
    daily = Schedule(id="d", actor="a", cron="30 2 * * *", timezone="Europe/Paris")
    slots = daily.slots_between(at(2026, 10, 24, 12), at(2026, 10, 26, 12))
    assert local(slots) == ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]


def test_every_slots_are_aligned_on_the_epoch_whatever_the_zone() -> None:
    every = Schedule(id="e", actor="a", every_ms=30_000, timezone="Asia/Kolkata")
    assert every.slots_between(1_000_000_001, 1_000_060_000) == [1_000_020_000, 1_000_050_000]


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"cron": "61 * * * *"}, "cron '61 * * * *' is not valid: bad minute"),
        ({"cron": "* * *"}, "write five fields"),
        ({"cron": "0 3 * * *", "timezone": "Europe/Pariss"}, "unknown time zone 'Europe/Pariss'"),
        ({"cron": "0 3 * * *", "every_ms": 1000}, "either a cron expression or every="),
        ({"every_ms": 10}, "the shortest interval is 1s"),
    ],
)
def test_a_bad_schedule_says_what_is_wrong(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("*", r"\*")):
        Schedule(id="x", actor="a", **fields)


def test_periodic_refuses_a_bad_expression_at_import() -> None:
    with pytest.raises(dramaturg.ActorError, match=r"@periodic on 'tick': cron '\* \* \*' is not valid"):

        @dramaturg.periodic("* * *")
        @dramaturg.actor
        def tick() -> None: ...


# -- the scheduler's logic, on a fake clock (eager: firings run inline) -----------------------


class Clock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def eager() -> Iterator[dramatiq.Broker]:
    yield dramaturg.bootstrap(dramaturg.Settings(broker={"url": "eager://"}))


def recording_actor(name: str = "tick") -> tuple[dramaturg.Actor[..., None], Runs]:
    ran = Runs()

    @dramaturg.actor(queue_name="ticks", actor_name=name)
    def tick() -> None:
        ran.add(dramaturg.current_task().message_id)

    return tick, ran


def test_a_slot_fires_on_time_once_and_a_late_one_within_grace_only(eager: dramatiq.Broker) -> None:
    _tick, ran = recording_actor()
    start = 1_800_000_000_000  # a whole minute
    clock = Clock(start + 5)
    schedule = Schedule(id="every-minute", actor="tick", cron="* * * * *")
    scheduler = Scheduler(eager, [schedule], MemoryScheduleState(clock), clock=clock, max_sleep_ms=3_600_000)
    scheduler.register()
    # The next wake is the next slot (it sleeps until then)
    assert scheduler.tick() == 60_000 - 5
    clock.now_ms = start + 60_000
    scheduler.tick()
    scheduler.tick()  # a second look at the same time fires nothing more
    assert ran.seen == [firing_id("every-minute", start + 60_000)]
    # Three minutes with no look: the slot 59 s ago still fires, the two before are missed
    clock.now_ms = start + 4 * 60_000 + 59_000
    scheduler.tick()
    assert ran.seen[1:] == [firing_id("every-minute", start + 4 * 60_000)]
    assert scheduler.state.read("every-minute")["missed"] == "2"


def test_catch_up_fires_each_missed_slot_once_oldest_first(eager: dramatiq.Broker) -> None:
    _tick, ran = recording_actor()
    start = 1_800_000_000_000
    clock = Clock(start)
    state = MemoryScheduleState(clock)
    schedule = Schedule(id="s", actor="tick", every_ms=60_000, catch_up_ms=3 * 60_000)
    Scheduler(eager, [schedule], state, clock=clock).register()
    # When no scheduler runs for five slots, then one starts
    clock.now_ms = start + 5 * 60_000
    again = Scheduler(eager, [schedule], state, clock=clock)
    again.register()
    again.tick()
    again.tick()
    # Then the slots of the last three minutes fire, once each, oldest first; the two before are missed
    assert ran.seen == [firing_id("s", start + n * 60_000) for n in (3, 4, 5)]
    assert state.read("s")["missed"] == "2"


def test_a_paused_schedule_fires_nothing_and_resumes_from_its_next_slot(eager: dramatiq.Broker) -> None:
    _tick, ran = recording_actor()
    start = 1_800_000_000_000
    clock = Clock(start)
    state = MemoryScheduleState(clock)  # the store's clock: where a resumed schedule starts
    schedule = Schedule(id="s", actor="tick", every_ms=60_000, catch_up_ms=3_600_000)
    scheduler = Scheduler(eager, [schedule], state, clock=clock)
    scheduler.register()
    state.pause("s")
    clock.now_ms = start + 2 * 60_000
    scheduler.tick()
    assert ran.seen == []
    state.resume("s")
    scheduler.tick()
    assert ran.seen == []  # the paused slots never fire, even with catch-up
    clock.now_ms = start + 3 * 60_000
    scheduler.tick()
    assert ran.seen == [firing_id("s", start + 3 * 60_000)]


def test_a_removed_or_changed_schedule_stops_firing_on_older_schedulers(eager: dramatiq.Broker) -> None:
    _tick, ran = recording_actor()
    start = 1_800_000_000_000
    clock = Clock(start)
    state = MemoryScheduleState(clock)
    old = Schedule(id="s", actor="tick", every_ms=60_000)
    older = Scheduler(eager, [old], state, clock=clock)
    older.register()
    # When a newer scheduler starts with another definition of "s"
    new = Schedule(id="s", actor="tick", every_ms=120_000)
    newer = Scheduler(eager, [new], state, clock=clock)
    newer.register()
    clock.now_ms = start + 120_000
    older.tick()
    newer.tick()
    # Then only the newer one fires it, once
    assert ran.seen == [firing_id("s", start + 120_000)]
    # And a scheduler that declares no "s" any more makes every other stop firing it
    Scheduler(eager, [], state, clock=clock).register()
    clock.now_ms = start + 240_000
    newer.tick()
    assert len(ran.seen) == 1


def test_schedule_run_runs_inline_in_eager_mode(eager: dramatiq.Broker) -> None:
    _tick, ran = recording_actor()
    schedule = Schedule(id="s", actor="tick", every_ms=3_600_000)
    message_id = schedules.run_now(schedule, eager)
    assert ran.seen == [message_id]
    assert state_of(eager).read("s")["last_id"] == message_id


# -- exactly once on real brokers ------------------------------------------------------------


@pytest.fixture
def broker(settings: dramaturg.Settings) -> Iterator[dramatiq.Broker]:
    built = dramaturg.bootstrap(settings)
    yield built
    if built.settings.type == "rabbitmq":  # type: ignore[attr-defined]
        from .conftest import delete_rabbitmq_queues

        delete_rabbitmq_queues(built)


def own_state(broker: dramatiq.Broker, settings: dramaturg.Settings) -> RedisScheduleState:
    """A ledger client of its own, as another scheduler process would have."""
    import redis

    url = settings.state.url
    pool = None if url else broker.client.connection_pool  # type: ignore[attr-defined]
    client = redis.Redis.from_url(url) if url else redis.Redis(connection_pool=pool)
    return RedisScheduleState(client, namespace=settings.broker.namespace)


def registered_at(state: RedisScheduleState, schedule: Schedule) -> int:
    """The schedule's last slot at or before it was registered (by the state store's
    clock): a fake clock starting there sees the slots after it due, none before."""
    assert schedule.every_ms is not None
    last = int(state.read(schedule.id)["last"])
    return last - last % schedule.every_ms


class Killed(BaseException):
    """A scheduler killed between claiming a slot and sending it (as by kill -9)."""


def test_racing_schedulers_fire_each_slot_exactly_once(
    broker: dramatiq.Broker, settings: dramaturg.Settings, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    # Given six schedulers with their own ledger clients, all looking at the same instants
    _tick, ran = recording_actor()
    schedule = Schedule(id="race", actor="tick", every_ms=1000)
    clock = Clock(0)

    def new_scheduler() -> Scheduler:
        made = Scheduler(broker, [schedule], own_state(broker, settings), clock=clock, lease_ms=3000)
        made.register()
        instances.append(made)
        return made

    instances: list[Scheduler] = []
    seats = [new_scheduler() for _ in range(6)]
    start = clock.now_ms = registered_at(seats[0].state, schedule)  # type: ignore[arg-type]
    worker = start_worker()
    slots, kill_at, restart_at = 20, 8, 12
    move = threading.Barrier(len(seats), action=lambda: setattr(clock, "now_ms", clock.now_ms + 1000))
    looked = threading.Barrier(len(seats))
    killed = threading.Event()
    errors: list[BaseException] = []

    def die(schedule: Schedule, slot: int) -> None:
        raise Killed

    def race(seat: int) -> None:
        try:
            for round_ in range(1, slots + 1):
                move.wait(timeout=20)  # the clock moves one slot; all look at once
                if round_ == kill_at and seat == 0:  # seat 0 claims this slot first, and dies sending it
                    seats[0]._send = die  # type: ignore[method-assign]
                    with pytest.raises(Killed):
                        seats[0].tick()
                    seats[0] = new_scheduler()  # and is started again
                    killed.set()
                elif round_ == kill_at:
                    assert killed.wait(20)
                if round_ == restart_at and seat == 1:
                    seats[1] = new_scheduler()  # a clean restart: a new instance, the same ledger
                seats[seat].tick()
                looked.wait(timeout=20)
        except BaseException as error:  # reported below
            errors.append(error)

    # When they race for twenty slots, one killed mid-slot and another restarted
    threads = [threading.Thread(target=race, args=(seat,)) for seat in range(len(seats))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors

    # Then, once the killed scheduler's lease (3 s by the state store's clock) has ended,
    # another sends its slot
    expected = {firing_id("race", start + n * 1000) for n in range(1, slots + 1)}
    killed_slot = firing_id("race", start + kill_at * 1000)
    poll_until(
        lambda: seats[2].tick() is not None and killed_slot in [m for i in instances for m in i.fired],
        "the killed scheduler's slot sent again once its lease ended",
    )
    # And the worker ran each slot's firing once, by message id, and no other
    ran.wait(slots)
    worker.stop()  # what it took has run; nothing more waits on the queue
    assert pending_messages(broker, "ticks") == 0
    assert sorted(ran.seen) == sorted(expected)
    fired = [message_id for instance in instances for message_id in instance.fired]
    assert sorted(fired) == sorted(expected)
    assert firing_id("race", start + kill_at * 1000) in fired


def test_a_slot_whose_scheduler_died_mid_firing_is_sent_again_with_the_same_id(
    broker: dramatiq.Broker, settings: dramaturg.Settings, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    _tick, ran = recording_actor()
    start = 1_800_000_000_000
    schedule = Schedule(id="crash", actor="tick", every_ms=60_000)
    clock = Clock(start)
    state = own_state(broker, settings)
    survivor = Scheduler(broker, [schedule], own_state(broker, settings), clock=clock)
    survivor.register()
    # Given a scheduler that claimed the slot under a 2 s lease and died before sending it
    clock.now_ms = start + 60_000
    assert state.claim("crash", schedule.digest, start + 60_000, 2000, 0) == CLAIMED
    survivor.tick()
    assert survivor.fired == []  # the claimant's lease runs
    # When its lease ends (by the state store's clock)
    poll_until(lambda: survivor.tick() is not None and survivor.fired, "the slot sent again once its lease ended")
    survivor.tick()
    # Then the survivor sends it once, with the id derived from the slot
    start_worker()
    assert ran.wait(1) == [firing_id("crash", start + 60_000)]
    assert survivor.fired == [firing_id("crash", start + 60_000)]
    assert "pending" not in state.read("crash")


def test_a_scheduler_whose_clock_runs_a_minute_ahead_takes_no_live_lease_and_fires_no_slot_twice(
    broker: dramatiq.Broker, settings: dramaturg.Settings, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    _tick, ran = recording_actor()
    schedule = Schedule(id="skew", actor="tick", every_ms=3_600_000)
    slot = schedule.next_slot(int(time.time() * 1000))
    clock = Clock(slot - 1000)
    on_time = Scheduler(broker, [schedule], own_state(broker, settings), clock=clock)
    on_time.register()
    clock.now_ms = slot
    # A minute ahead of the other: more than the 30 s lease
    ahead = Scheduler(broker, [schedule], own_state(broker, settings), clock=Clock(slot + 60_000))
    # Given a scheduler that claimed the slot and is still sending it (a slow publish)
    claimed, release = threading.Event(), threading.Event()
    send = on_time._send

    def slow_send(schedule: Schedule, slot: int) -> None:
        claimed.set()
        assert release.wait(30)
        send(schedule, slot)

    on_time._send = slow_send  # type: ignore[method-assign]
    sending = threading.Thread(target=on_time.tick)
    sending.start()
    assert claimed.wait(10)
    # When the scheduler whose clock runs a minute ahead looks at the schedule, twice
    ahead.tick()
    ahead.tick()
    release.set()
    sending.join(30)
    # Then it left the slot to its claimant, whose lease runs by the state store's clock
    assert ahead.fired == []
    assert on_time.fired == [firing_id("skew", slot)]
    # And the slot's firing ran once, and nothing else waits
    worker = start_worker()
    assert ran.wait(1) == [firing_id("skew", slot)]
    worker.stop()
    assert pending_messages(broker, "ticks") == 0
    assert ran.seen == [firing_id("skew", slot)]


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_a_scheduler_whose_clock_runs_a_minute_ahead_skips_no_slot_when_it_registers(
    broker: dramatiq.Broker, settings: dramaturg.Settings
) -> None:
    recording_actor()
    schedule = Schedule(id="early", actor="tick", every_ms=10_000)
    now = int(time.time() * 1000)
    slot = schedule.next_slot(now + 2000)  # 2 to 12 s from now
    # Given a new schedule registered by a scheduler whose clock runs a minute ahead
    Scheduler(broker, [schedule], own_state(broker, settings), clock=Clock(now + 60_000)).register()
    # When a scheduler whose clock is right comes to the schedule's next slot
    on_time = Scheduler(broker, [schedule], own_state(broker, settings), clock=Clock(slot))
    on_time.tick()
    # Then the slot fires: the schedule starts from the state store's now, not the minute ahead
    assert firing_id("early", slot) in on_time.fired


def test_stopped_schedulers_catch_up_each_missed_slot_once(
    broker: dramatiq.Broker, settings: dramaturg.Settings, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    _tick, ran = recording_actor()
    start = 1_800_000_000_000
    schedule = Schedule(id="cu", actor="tick", every_ms=60_000, catch_up_ms=600_000)
    clock = Clock(start)
    first = [Scheduler(broker, [schedule], own_state(broker, settings), clock=clock) for _ in range(3)]
    for scheduler in first:
        scheduler.register()
    start = clock.now_ms = registered_at(first[0].state, schedule)  # type: ignore[arg-type]
    clock.now_ms = start + 60_000
    for scheduler in first:
        scheduler.tick()
    # When all of them stop across two slots and three start again
    clock.now_ms = start + 3 * 60_000 + 500
    again = [Scheduler(broker, [schedule], own_state(broker, settings), clock=clock) for _ in range(3)]
    for scheduler in again:
        scheduler.register()
        scheduler.tick()
    worker = start_worker()
    # Then slots 2 and 3 fire once each, after slot 1
    expected = [firing_id("cu", start + n * 60_000) for n in (1, 2, 3)]
    ran.wait(3)
    worker.stop()
    assert pending_messages(broker, "ticks") == 0
    assert sorted(ran.seen) == sorted(expected)
    assert [m for s in again for m in s.fired] == expected[1:]


def test_overlap_skip_leaves_a_slot_out_while_the_previous_firing_has_not_ended(
    broker: dramatiq.Broker, settings: dramaturg.Settings, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    _tick, ran = recording_actor()
    start = 1_800_000_000_000
    schedule = Schedule(id="skip", actor="tick", every_ms=60_000, overlap="skip")
    clock = Clock(start)
    scheduler = Scheduler(broker, [schedule], own_state(broker, settings), clock=clock)
    scheduler.register()
    # Given a firing still queued (no worker runs)
    clock.now_ms = start + 60_000
    scheduler.tick()
    first = firing_id("skip", start + 60_000)
    poll_until(lambda: dramaturg.task_status(first, broker).state == "queued", "the first firing recorded as queued")
    # When the next slot comes, it is left out
    clock.now_ms = start + 120_000
    scheduler.tick()
    assert scheduler.fired == [first]
    # And once the first has ended, the next slot fires
    start_worker()
    assert ran.wait(1) == [first]
    poll_until(lambda: dramaturg.task_status(first, broker).state == "succeeded", "the first firing succeeded")
    clock.now_ms = start + 180_000
    scheduler.tick()
    assert scheduler.fired == [first, firing_id("skip", start + 180_000)]
    assert ran.wait(2)[1] == firing_id("skip", start + 180_000)


def test_overlap_cancel_previous_cancels_a_running_firing_and_sends_the_slot(
    broker: dramatiq.Broker, settings: dramaturg.Settings, start_worker: Callable[..., dramatiq.Worker]
) -> None:
    from tests.apps.simulated import busy

    started, ended = Runs(), Runs()

    @dramaturg.actor(queue_name="ticks", actor_name="long_tick")
    def long_tick() -> None:
        message_id = dramaturg.current_task().message_id
        started.add(message_id)
        if len(started.seen) == 1:
            busy(60)  # the first firing runs until it is interrupted
        ended.add(message_id)

    start = 1_800_000_000_000
    schedule = Schedule(id="cancel", actor="long_tick", every_ms=60_000, overlap="cancel-previous")
    clock = Clock(start)
    scheduler = Scheduler(broker, [schedule], own_state(broker, settings), clock=clock)
    scheduler.register()
    # Given a firing that is running
    start_worker()
    clock.now_ms = start + 60_000
    scheduler.tick()
    first = firing_id("cancel", start + 60_000)
    assert started.wait(1) == [first]
    poll_until(lambda: dramaturg.task_status(first, broker).state == "running", "the first firing recorded as running")
    # When the next slot comes
    clock.now_ms = start + 120_000
    scheduler.tick()
    second = firing_id("cancel", start + 120_000)
    # Then the first is cancelled by the schedule, and the slot is sent and runs
    assert scheduler.fired == [first, second]
    assert ended.wait(1) == [second]
    status = poll_until(
        lambda: (s := dramaturg.task_status(first, broker)).state == "cancelled" and s, "the first firing cancelled"
    )
    assert status.to_dict().get("cancel_requested_by") == "schedule cancel", status


def test_a_drain_schedule_works_its_queue_for_its_budget_on_one_scheduler_per_slot(
    broker: dramatiq.Broker, settings: dramaturg.Settings
) -> None:
    # Given five tasks waiting on "imports" and three schedulers with a drain schedule
    ran = Runs()

    @dramaturg.actor(queue_name="imports")
    def import_row(n: int) -> None:
        ran.add(n)

    for n in range(5):
        import_row.send(n)
    start = 1_800_000_000_000
    schedule = Schedule(id="drain-imports", actor="", every_ms=60_000, drain_queues=("imports",), drain_budget_ms=1500)
    clock = Clock(start)
    schedulers = [Scheduler(broker, [schedule], own_state(broker, settings), clock=clock) for _ in range(3)]
    for scheduler in schedulers:
        scheduler.register()
    # When the slot comes: one of them claims it and drains
    clock.now_ms = start + 60_000
    for scheduler in schedulers:
        scheduler.tick()
    draining = [s for s in schedulers if s.fired]
    assert len(draining) == 1
    draining[0].wait_for_drain(30)
    # Then every task ran once, and the drain's summary is the firing's outcome
    assert sorted(ran.seen) == [0, 1, 2, 3, 4]
    (info,) = schedules.schedule_infos([schedule], broker)
    assert info.last_outcome is not None and "5 processed" in info.last_outcome, info
    assert info.actor == "drain imports for 1500ms"


@pytest.fixture(params=["memory", "redis"])
def ledger(request: pytest.FixtureRequest) -> Any:
    """The ledger's two implementations: the Lua script on a real Redis, and memory."""
    if request.param == "memory":
        return MemoryScheduleState()
    import redis

    server = request.getfixturevalue("redis_server")
    client = redis.Redis(host=server.host, port=server.port)
    return RedisScheduleState(client, namespace=f"test-{uuid.uuid4().hex[:8]}")


def test_the_ledger_counts_missed_slots_once_and_never_a_fired_one(ledger: Any) -> None:
    # A schedule registered ten minutes back by the store's clock: its slots below are past
    ledger.register({"s": "d1"}, back_ms=600_000)
    base = int(ledger.read("s")["last"])
    assert abs(base + 600_000 - time.time() * 1000) < 5000  # the store's clock, not the caller's
    # A claim that passes over two slots, from the newest it saw, counts them
    assert ledger.claim("s", "d1", base + 3000, 0, 2, base) == CLAIMED
    # One whose view is stale (another claimed since) counts nothing, and a slot not newer is taken
    assert ledger.claim("s", "d1", base + 6000, 0, 5, base) == CLAIMED
    assert ledger.claim("s", "d1", base + 6000, 30_000, 0, base + 3000) == 0
    assert ledger.read("s")["missed"] == "2"
    # Both slots are pending until sent; the oldest whose lease ended (a lease of 0 ms:
    # at once) is recovered first
    assert ledger.read("s")["pending"] == f"{base + 3000},{base + 6000}"
    assert ledger.recover("s", "d1", 30_000) == base + 3000
    assert ledger.recover("s", "d1", 30_000) == base + 6000
    assert ledger.recover("s", "d1", 30_000) is None  # both under a new lease now
    ledger.sent("s", base + 6000, "m7", 40_000)
    ledger.sent("s", base + 3000, "m4", 40_001)  # an older slot sent later is not the last run
    assert (ledger.read("s")["last_id"], "pending" in ledger.read("s")) == ("m7", False)
    # A definition that is not the registered one claims nothing, recovers nothing
    assert ledger.claim("s", "d0", base + 9000, 30_000, 0, base + 6000) == -2
    ledger.pause("s")
    assert ledger.claim("s", "d1", base + 9000, 30_000, 0, base + 6000) == -1
    ledger.resume("s")  # from the store's now: the ten minutes passed while paused
    assert ledger.claim("s", "d1", base + 9000, 30_000, 0, base + 6000) == 0
    assert ledger.register({}) == 1 and ledger.registered() == {}


def test_schedules_on_rabbitmq_need_a_state_store(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    settings = dramaturg.Settings(broker={"url": broker_url("rabbitmq", request, tmp_path)})
    broker = dramaturg.bootstrap(settings)
    with pytest.raises(dramaturg.StateUnavailable, match=r"^schedules need a state store, .* set \[state\] url"):
        state_of(broker)


# -- the commands ----------------------------------------------------------------------------

TASKS = """
import dramaturg
from pathlib import Path

@dramaturg.periodic(every="1s", id="every-second")
@dramaturg.actor(queue_name="ticks")
def tick() -> None:
    import os
    with open(Path(__file__).with_name("ticks.log"), "a") as log:
        log.write(dramaturg.current_task().message_id + "\\n")

@dramaturg.actor(queue_name="ticks")
def cleanup(days: int) -> None: ...
"""


def project(tmp_path: Path, settings: dramaturg.Settings, schedules_toml: str) -> Path:
    (tmp_path / "shoptasks.py").write_text(TASKS)
    config = write_config(tmp_path, settings, modules=["shoptasks"])
    config.write_text(config.read_text() + schedules_toml)
    return config


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ('cron = "61 3 * * *"\nactor = "shoptasks:cleanup"\nargs = [30]', "cron '61 3 * * *' is not valid: bad minute"),
        (
            'cron = "0 3 * * *"\ntimezone = "Mars/Olympus"\nactor = "shoptasks:cleanup"\nargs = [30]',
            "unknown time zone",
        ),
        ('cron = "0 3 * * *"\nactor = "shoptasks:clenup"', "no such attribute in 'shoptasks'; did you mean 'cleanup'"),
        ('cron = "0 3 * * *"\nactor = "shoptasks:cleanup"\nargs = [1, 2]', "the arguments do not fit"),
    ],
)
def test_a_bad_schedule_in_the_config_file_stops_the_scheduler_naming_it_and_its_line(
    tmp_path: Path, toml: str, problem: str
) -> None:
    settings = dramaturg.Settings(broker={"url": "stub://"})
    project(
        tmp_path,
        settings,
        f'\n[[schedules]]\nid = "ok"\nevery = "1h"\nactor = "shoptasks:cleanup"\nargs = [1]\n'
        f'\n[[schedules]]\nid = "nightly"\n{toml}\n',
    )
    done = run_cli([bin_path("dramaturg"), "scheduler"], cwd=tmp_path)
    assert done.returncode == 78, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"schedules: 'nightly' ({tmp_path / 'dramaturg.toml'} line " in line
    assert problem in line
    number = int(line.split(" line ")[1].split(")")[0])
    assert (tmp_path / "dramaturg.toml").read_text().splitlines()[number - 1] == 'id = "nightly"'


def test_a_duplicate_schedule_id_stops_the_scheduler(tmp_path: Path) -> None:
    settings = dramaturg.Settings(broker={"url": "stub://"})
    project(tmp_path, settings, '\n[[schedules]]\nid = "every-second"\nevery = "1m"\nactor = "shoptasks:tick"\n')
    done = run_cli([bin_path("dramaturg"), "schedule", "list"], cwd=tmp_path)
    assert done.returncode == 78
    assert "'every-second'" in done.stderr and "duplicate id, also declared in code shoptasks:tick" in done.stderr


def test_a_scheduler_and_a_worker_with_one_fire_each_slot_once_and_stop_cleanly(
    tmp_path: Path, settings: dramaturg.Settings, spawn: Callable[..., Any]
) -> None:
    # Given a scheduler process and a worker running one too (--scheduler), on one Redis
    project(tmp_path, settings, "")
    dramaturg_bin = bin_path("dramaturg")
    scheduler = spawn([dramaturg_bin, "scheduler"])
    worker = spawn([dramaturg_bin, "worker", "--scheduler", "--processes", "1", "--threads", "1"])
    for process in (scheduler, worker):
        process.wait_for_line("scheduler: firing 1 schedule(s): every-second")
    log = tmp_path / "ticks.log"
    poll_until(lambda: log.exists() and len(log.read_text().split()) >= 3, "three firings")
    # When the scheduler stops (SIGTERM: exit 0), the worker's goes on alone
    scheduler.popen.send_signal(signal.SIGTERM)
    assert scheduler.popen.wait(20) == 0
    ran = len(log.read_text().split())
    poll_until(lambda: len(log.read_text().split()) >= ran + 2, "two firings more")
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.popen.wait(60) == 0
    # Then each firing ran once, for consecutive slots (one thread: in order)
    ids = log.read_text().split()
    now_s = int(time.time())
    slot_of = {firing_id("every-second", s * 1000): s for s in range(now_s - 300, now_s + 2)}
    slots = [slot_of[message_id] for message_id in ids]
    assert slots == list(range(slots[0], slots[0] + len(slots)))
    listed = run_cli([dramaturg_bin, "schedule", "list", "--json"], cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    (info,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert info["id"] == "every-second" and info["registered"] and not info["paused"]
    assert info["last_slot"] // 1000 >= slots[-1]


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_missed_slots_and_firings_show_in_stats_and_the_worker_groups_metrics(
    tmp_path: Path, settings: dramaturg.Settings, spawn: Callable[..., Any]
) -> None:
    import urllib.request

    # Given a schedule whose ledger says two slots were missed (no scheduler ran then)
    project(tmp_path, settings, "")
    broker = dramaturg.bootstrap(settings)
    state = state_of(broker)
    state.register({"every-second": "old-definition"}, back_ms=10_000)
    last = int(state.read("every-second")["last"])
    assert state.claim("every-second", "old-definition", last + 1000, 30_000, 2, last) == CLAIMED
    dramaturg.shutdown()
    dramaturg_bin = bin_path("dramaturg")
    # Then stats counts them, in its table and its JSON
    done = run_cli([dramaturg_bin, "stats", "ticks"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "schedules: 1, missed slots: 2 (every-second 2)" in done.stdout
    done = run_cli([dramaturg_bin, "stats", "ticks", "--json"], cwd=tmp_path)
    assert json.loads(done.stdout)["missed_slots"] == {"every-second": 2}
    # And a worker group with a scheduler and a metrics port counts its firings
    port = free_port()
    worker = spawn([dramaturg_bin, "worker", "--scheduler", "-p", "1", "--metrics-port", str(port)])
    worker.wait_for_line("scheduler: firing 1 schedule(s): every-second")

    def scraped() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text: str = response.read().decode()
        except OSError:
            return None
        return text if 'dramaturg_schedule_firings_total{schedule="every-second"}' in text else None

    assert poll_until(scraped, "the scheduler's firings in the metrics")
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.popen.wait(60) == 0


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_schedule_commands_pause_resume_and_run_one(tmp_path: Path, settings: dramaturg.Settings) -> None:
    project(tmp_path, settings, "")
    dramaturg_bin = bin_path("dramaturg")

    def listed() -> dict[str, Any]:
        done = run_cli([dramaturg_bin, "schedule", "list", "--json"], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        info: dict[str, Any] = json.loads(done.stdout)
        return info

    assert run_cli([dramaturg_bin, "schedule", "pause", "every-second"], cwd=tmp_path).returncode == 0
    assert listed()["paused"] is True
    assert run_cli([dramaturg_bin, "schedule", "resume", "every-second"], cwd=tmp_path).returncode == 0
    assert listed()["paused"] is False
    # schedule run sends one firing now and prints its id; the list shows it as the last run
    done = run_cli([dramaturg_bin, "schedule", "run", "every-second"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    message_id = done.stdout.strip()
    info = listed()
    assert info["last_id"] == message_id and info["last_outcome"] == "queued"
    table = run_cli([dramaturg_bin, "schedule", "list"], cwd=tmp_path).stdout
    assert "every-second" in table and "every 1s" in table and "queued" in table
    # An unknown id: one line, exit 2, and the near name
    wrong = run_cli([dramaturg_bin, "schedule", "run", "every-secnd"], cwd=tmp_path)
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == "dramaturg: no schedule 'every-secnd'; did you mean 'every-second'?"


def test_schedule_run_in_eager_mode_runs_the_task_before_it_returns(tmp_path: Path) -> None:
    project(tmp_path, dramaturg.Settings(broker={"url": "eager://"}), "")
    done = run_cli([bin_path("dramaturg"), "schedule", "run", "every-second"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ticks.log").read_text().split() == [done.stdout.strip()]


def test_load_schedules_reads_code_and_file(tmp_path: Path) -> None:
    (tmp_path / "cfg.toml").write_text(
        '[broker]\nurl = "stub://"\n\n[[schedules]]\nid = "n"\ncron = "0 3 * * *"\n'
        'actor = "tests.test_schedules:_cleanup"\n'
    )
    loaded = dramaturg.load_settings(tmp_path / "cfg.toml")
    broker = dramaturg.bootstrap(loaded)

    @dramaturg.periodic("*/5 * * * *", timezone="Europe/Paris")
    @dramaturg.actor(queue_name="reports")
    def hourly_report() -> None: ...

    global _cleanup

    @dramaturg.actor
    def _cleanup() -> None: ...

    found = load_schedules(loaded, broker)
    assert [(s.id, s.expression) for s in found] == [
        ("hourly_report", "*/5 * * * * (Europe/Paris)"),
        ("n", "0 3 * * *"),
    ]
    assert found[1].origin == f"{tmp_path / 'cfg.toml'} line 5"


def test_a_drain_schedule_from_the_config_file_and_its_errors(tmp_path: Path) -> None:
    config = tmp_path / "cfg.toml"
    head = '[broker]\nurl = "stub://"\n\n[[schedules]]\nid = "drain-imports"\ncron = "* * * * *"\n'
    config.write_text(head + 'drain = { queues = ["imports"], budget = "50s" }\n')
    loaded = dramaturg.load_settings(config)
    broker = dramaturg.bootstrap(loaded)

    @dramaturg.actor(queue_name="imports")
    def import_row() -> None: ...

    (schedule,) = load_schedules(loaded, broker)
    assert (schedule.drain_queues, schedule.drain_budget_ms, schedule.what) == (
        ("imports",),
        50_000,
        "drain imports for 50s",
    )
    config.write_text(head + 'drain = { queues = ["imprts"], budget = "50s" }\n')
    with pytest.raises(dramaturg.ConfigError, match=r"'drain-imports' .*line 5\): drain: unknown queue 'imprts'"):
        load_schedules(dramaturg.load_settings(config), broker)
    config.write_text(head + 'actor = "x:y"\ndrain = { queues = ["imports"], budget = "50s" }\n')
    with pytest.raises(dramaturg.ConfigError, match=r"give an actor .* or a drain"):
        load_schedules(dramaturg.load_settings(config), broker)


_cleanup: Any = None


def test_an_unknown_key_in_a_schedule_table_names_the_near_one(tmp_path: Path) -> None:
    config = tmp_path / "cfg.toml"
    config.write_text('[broker]\nurl = "stub://"\n\n[[schedules]]\nid = "n"\ncron = "0 3 * * *"\nactr = "a:b"\n')
    with pytest.raises(dramaturg.ConfigError) as raised:
        dramaturg.load_settings(config)
    assert str(raised.value) == f"schedules.0.actr: unknown key; did you mean 'actor'? (from {config})"


def test_config_show_says_the_schedules_come_from_the_file(tmp_path: Path) -> None:
    config = tmp_path / "cfg.toml"
    config.write_text('[broker]\nurl = "stub://"\n\n[[schedules]]\nid = "n"\nevery = "1m"\nactor = "a:b"\n')
    loaded = dramaturg.load_settings(config)
    assert loaded.source_of("schedules") == str(config)
    assert loaded.source_of("broker.prefetch") == "default"
    assert loaded.flat()["schedules"] == [{"id": "n", "every": 60_000, "actor": "a:b"}]


def test_a_ledger_that_lost_its_data_is_registered_again_and_slots_go_on_firing(
    eager: dramatiq.Broker, ledger: Any
) -> None:
    _tick, ran = recording_actor()
    start = 1_800_000_000_000
    schedule = Schedule(id="wiped", actor="tick", every_ms=60_000)
    clock = Clock(start)
    scheduler = Scheduler(eager, [schedule], ledger, clock=clock)
    scheduler.register()
    clock.now_ms = start + 60_000
    scheduler.tick()
    # Given a state store that lost its data (restarted without persistence, flushed)
    if isinstance(ledger, MemoryScheduleState):
        ledger.__init__()  # type: ignore[misc]
    else:
        ledger.client.delete(ledger.registry, *ledger.client.keys(ledger.prefix + "*"))
    # When the next slots come
    clock.now_ms = start + 120_000
    scheduler.tick()  # finds nothing registered: registers again
    scheduler.tick()
    clock.now_ms = start + 180_000
    scheduler.tick()
    # Then the scheduler goes on firing them, once each
    expected = [firing_id("wiped", start + n * 60_000) for n in (1, 2, 3)]
    assert scheduler.fired == expected
    assert ran.seen == expected


@pytest.mark.parametrize("broker_kind", ["redis"])
def test_a_slot_of_a_unique_actor_whose_task_is_still_queued_is_left_out(
    broker: dramatiq.Broker, settings: dramaturg.Settings
) -> None:
    @dramaturg.actor(queue_name="ticks", unique=dramaturg.unique(key="digest"))
    def digest() -> None:
        pass

    start = 1_800_000_000_000
    schedule = Schedule(id="digest", actor="digest", every_ms=60_000)
    clock = Clock(start)
    state = own_state(broker, settings)
    scheduler = Scheduler(broker, [schedule], state, clock=clock)
    scheduler.register()
    # Given a firing still queued (no worker), holding the actor's unique key
    clock.now_ms = start + 60_000
    scheduler.tick()
    first = firing_id("digest", start + 60_000)
    # When the next slot comes
    clock.now_ms = start + 120_000
    scheduler.tick()
    # Then it is left out, not kept pending to be sent again later
    assert scheduler.fired == [first]
    assert state.read("digest").get("pending", "") == ""
    assert state.read("digest")["last_id"] == first
    assert pending_messages(broker, "ticks") == 1


@pytest.mark.parametrize("broker_kind", ["redis", "rabbitmq"])
def test_a_firing_sent_but_not_marked_sent_is_not_sent_again_by_another_scheduler(
    broker: dramatiq.Broker, settings: dramaturg.Settings
) -> None:
    # A queue of this test's own: on RabbitMQ queues outlive a test's namespace.
    @dramaturg.actor(queue_name="hiccup", actor_name="hiccup_tick")
    def hiccup_tick() -> None:
        pass

    start = 1_800_000_000_000
    schedule = Schedule(id="hiccup", actor="hiccup_tick", every_ms=60_000)
    clock = Clock(start)
    first_state, second_state = own_state(broker, settings), own_state(broker, settings)
    first = Scheduler(broker, [schedule], first_state, clock=clock, lease_ms=1000)
    second = Scheduler(broker, [schedule], second_state, clock=clock)
    first.register()

    # Given a scheduler that sends a slot's firing, and then cannot mark it sent (the
    # state store stopped answering just after the publish)
    def unreachable(*args: Any) -> None:
        raise ConnectionError("the state store went away")

    first_state.sent = unreachable  # type: ignore[method-assign]
    clock.now_ms = start + 60_000
    first.tick()
    firing = firing_id("hiccup", start + 60_000)
    poll_until(lambda: dramaturg.task_status(firing, broker).state == "queued", "the firing recorded as queued")

    # When another scheduler finds the slot pending after its lease (1 s, by the state store's clock)
    poll_until(
        lambda: second.tick() is not None and second_state.read("hiccup").get("pending", "") == "",
        "the pending slot looked at by another scheduler once its lease ended",
    )

    # Then it marks it sent and does not send it again: one message on the queue
    assert second.fired == []
    assert pending_messages(broker, "hiccup") == 1


def test_a_state_store_whose_clock_runs_ahead_skips_no_slot_after_a_register_or_resume(eager: dramatiq.Broker) -> None:
    _tick, ran = recording_actor()
    start = 1_800_000_000_000
    clock = Clock(start + 5)

    # Given a state store whose clock runs 90 s ahead of the scheduler's, and a schedule
    # registered (then paused and resumed) with it
    def store_clock() -> int:
        return clock.now_ms + 90_000

    state = MemoryScheduleState(store_clock)
    schedule = Schedule(id="every-minute", actor="tick", cron="* * * * *")
    scheduler = Scheduler(eager, [schedule], state, clock=clock, max_sleep_ms=3_600_000)
    scheduler.register()

    # When the scheduler's clock reaches the next slot, then the one after a pause and resume
    clock.now_ms = start + 60_000
    scheduler.tick()
    state.pause("every-minute")
    clock.now_ms = start + 90_000
    state.resume("every-minute", now_ms=clock.now_ms)
    clock.now_ms = start + 120_000
    scheduler.tick()

    # Then each fired: neither start was dated by the store's clock, ahead of the slots
    assert len(ran.seen) == 2
