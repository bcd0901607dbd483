"""The scheduler: sleeps until the next slot, claims it in the ledger, sends the firing.

Any number of schedulers may run at once, on any hosts (``dramaturg scheduler``, or
``dramaturg worker --scheduler``): each slot is claimed by a compare-and-set on the
schedule's newest claimed slot (:mod:`dramaturg.schedules.state`), so exactly one of
them sends it, and the message it sends has an id derived from (schedule id, slot)
(:func:`firing_id`), so a slot sent again after its scheduler died mid-firing is still
the same task (its status, its outcome).

What a wake does, for each schedule: publish again a slot whose claimant died before it
said it was sent (its lease, :data:`LEASE_MS`, ended); then take the slots due in the
window ``(now - max(grace, catch_up), now]``, oldest first, each one claimed before it
is sent. Slots older than the window are missed: they never fire, and the scheduler that
claims the next slot counts them (``missed``, shown by ``dramaturg schedule list`` and
``dramaturg stats``, and in the Prometheus metrics of ``dramaturg worker --scheduler``:
:func:`prometheus_counters`).

Clocks: a scheduler's clock only decides which slots are due; leases are dated by the
state store's clock (Redis's ``TIME``), and a newly registered or resumed schedule
starts at the earlier of the store's now and its caller's (a start by a clock ahead
would skip the slots in between, one behind fires up to that much of the past), so
schedulers whose clocks disagree, by any amount, agree on whether a claimant's lease has
ended, and none sends a slot its live claimant is sending. The ledger only moves
forward, so they never fire a slot twice; the earliest clock fires it, up to that
clock's error early. A slot is missed only if no scheduler's clock passes through
``[slot, slot + grace]`` while it runs: keep the clocks within :data:`GRACE_MS` (60 s)
of each other (NTP keeps them within milliseconds). Between wakes a scheduler sleeps (an
event wait, woken by ``stop()``) until the next slot of any schedule, and at most
:data:`MAX_SLEEP_MS`, to see pauses, recover dead claimants' slots and notice that a
newer scheduler changed the schedules.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import dramatiq

from ..errors import DuplicateTask, TaskHeld
from ..held import durable_write
from .spec import Schedule
from .state import CLAIMED, PAUSED, STALE, ScheduleState

__all__ = ["GRACE_MS", "LEASE_MS", "MAX_SLEEP_MS", "SCHEDULE_OPTION", "Scheduler", "firing_id", "send_firing"]

logger = logging.getLogger("dramaturg.schedules")

#: How late a slot may still fire when no catch-up is asked for (a scheduler that was
#: busy, or a clock a little behind).
GRACE_MS = 60_000
#: How long a claimed slot waits for its scheduler to say it was sent before another
#: scheduler sends it again (by the state store's clock).
LEASE_MS = 30_000
#: The longest a scheduler sleeps between two looks at the ledger.
MAX_SLEEP_MS = 15_000
#: The message option naming the schedule and slot a firing is for: ``"<id>@<slot ms>"``.
SCHEDULE_OPTION = "dramaturg_schedule"
#: The namespace of firings' message ids (uuid5 of ``"<schedule id>@<slot ms>"``).
_FIRING_IDS = uuid.UUID("0d7b5c36-2f4e-4f0a-9a3f-6f1b8e2c9d57")
#: Task states in which a firing has not ended (``overlap = "skip"`` leaves a slot out then).
_UNFINISHED = frozenset({"queued", "delayed", "running", "retrying", "waiting"})


_counters: dict[str, Any] | None = None
_counters_lock = threading.Lock()


def prometheus_counters() -> dict[str, Any]:
    """This process's Prometheus counters of schedules, when it counts for a worker group's
    metrics server (``dramaturg worker --scheduler --metrics-port``: the group's
    ``PROMETHEUS_MULTIPROC_DIR`` is set); else none:

    - ``dramaturg_schedule_firings_total{schedule}``: slots this process fired;
    - ``dramaturg_schedule_missed_slots_total{schedule}``: slots that passed with no
      firing, counted once, by the scheduler that fired the next slot.
    """
    global _counters
    with _counters_lock:
        if _counters is None:
            _counters = {}
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                try:
                    from prometheus_client import Counter
                except ImportError:
                    return _counters
                _counters = {
                    "fired": Counter("dramaturg_schedule_firings", "Slots fired.", ["schedule"], registry=None),
                    "missed": Counter(
                        "dramaturg_schedule_missed_slots",
                        "Slots that passed with no firing.",
                        ["schedule"],
                        registry=None,
                    ),
                }
        return _counters


def firing_id(schedule_id: str, slot_ms: int) -> str:
    """The message id of the firing of ``schedule_id`` for ``slot_ms``: the same for every send of it."""
    return str(uuid.uuid5(_FIRING_IDS, f"{schedule_id}@{slot_ms}"))


def send_firing(broker: dramatiq.Broker, schedule: Schedule, slot_ms: int | None, message_id: str) -> bool:
    """Send one firing of ``schedule`` (``slot_ms`` None: a manual run) as an ordinary message.

    In eager mode it runs now; a held firing is logged, not raised (a scheduler goes on).
    False when a slot's firing was not sent because its actor is unique and its task is
    still queued or running (the slot is left out); a manual run raises
    :class:`~dramaturg.DuplicateTask` then.
    """
    actor = broker.get_actor(schedule.actor)
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=actor.queue_name,
        actor_name=actor.actor_name,
        args=tuple(schedule.args),
        kwargs=dict(schedule.kwargs),
        options={SCHEDULE_OPTION: f"{schedule.id}@{slot_ms if slot_ms is not None else 'run'}"},
        message_id=message_id,
        message_timestamp=int(time.time() * 1000),
    )
    try:
        broker.enqueue(message)
    except TaskHeld as error:
        logger.warning("schedule %s: the firing %s ran and was held: %s", schedule.id, message_id, error)
    except DuplicateTask as error:  # a unique actor whose task is still queued or running
        if slot_ms is None:
            raise
        logger.info("schedule %s: the firing %s was not sent: %s", schedule.id, message_id, error)
        return False
    return True


class Scheduler:
    """Fires ``schedules`` on ``broker`` until :meth:`stop`. ``clock``: ms since the epoch
    (a seam for tests); ``grace_ms``, ``lease_ms``, ``max_sleep_ms``: see the module."""

    def __init__(
        self,
        broker: dramatiq.Broker,
        schedules: Sequence[Schedule],
        state: ScheduleState,
        *,
        clock: Callable[[], int] | None = None,
        grace_ms: int = GRACE_MS,
        lease_ms: int = LEASE_MS,
        max_sleep_ms: int = MAX_SLEEP_MS,
    ) -> None:
        self.broker = broker
        self.schedules = {schedule.id: schedule for schedule in schedules}
        self.state = state
        self.clock = clock or (lambda: int(time.time() * 1000))
        self.grace_ms = grace_ms
        self.lease_ms = lease_ms
        self.max_sleep_ms = max_sleep_ms
        self._stopped = threading.Event()
        self._stale: set[str] = set()
        #: The drain this scheduler runs, if any: one at a time per process (Dramatiq's worker).
        self._draining: threading.Thread | None = None
        #: Firings this scheduler sent (message ids), for logs and tests.
        self.fired: list[str] = []
        self._metrics = prometheus_counters()

    def register(self) -> int:
        """Upsert this scheduler's schedules by id in the ledger; the others stop firing.
        Returns how many were dropped."""
        removed = self.state.register({s.id: s.digest for s in self.schedules.values()}, now_ms=self.clock())
        if removed:
            logger.info("scheduler: %d schedule(s) no longer declared stop firing", removed)
        return removed

    def stop(self) -> None:
        """Stop :meth:`run` at once (from a signal handler or another thread)."""
        self._stopped.set()

    def run(self, *, register: bool = True) -> None:
        """Register (unless the caller did), then fire slots until :meth:`stop`; sleeps between slots."""
        if register:
            self.register()
        logger.info("scheduler: %d schedule(s): %s", len(self.schedules), ", ".join(self.schedules) or "none")
        while not self._stopped.is_set():
            self._stopped.wait(self.tick() / 1000)
        self.wait_for_drain()  # a drain in progress ends within its budget and grace

    def tick(self) -> int:
        """One wake: fire what is due; how long to sleep (ms) until the next look."""
        now = self.clock()
        wake = now + self.max_sleep_ms
        for schedule in self.schedules.values():
            if schedule.id in self._stale:
                continue
            try:
                self._fire_due(schedule, now)
                wake = min(wake, schedule.next_slot(self.clock()))
            except Exception as error:  # the store or the broker: try again at the next wake
                logger.warning("schedule %s: %s: %s; trying again shortly", schedule.id, type(error).__name__, error)
                wake = min(wake, now + 1000)
        return max(0, wake - self.clock())

    def _busy(self, schedule: Schedule) -> bool:
        """A drain schedule while this scheduler drains: it leaves the slot to another scheduler."""
        return bool(schedule.drain_queues) and self._draining is not None and self._draining.is_alive()

    def _fire_due(self, schedule: Schedule, now: int) -> None:
        if self._busy(schedule):
            return
        for _ in range(100):  # bounded: the rest at the next wake
            recovered = self.state.recover(schedule.id, schedule.digest, self.lease_ms)
            if recovered is None:
                break
            if self._sent_already(schedule, recovered):
                continue
            logger.warning("schedule %s: slot %d was claimed but not sent; sending it again", schedule.id, recovered)
            self._send(schedule, recovered)
            if self._busy(schedule):
                return
        window = max(self.grace_ms, schedule.catch_up_ms or 0)
        last = int(self.state.read(schedule.id).get("last", "-1"))
        # Only the slots after the newest claimed: a long catch-up window of a short
        # interval is not walked through at every wake.
        for slot in schedule.slots_between(max(now - window, last), now):
            missed = schedule.count_between(last, slot) - 1 if last >= 0 else 0
            answer = self.state.claim(schedule.id, schedule.digest, slot, self.lease_ms, max(0, missed), last)
            if answer == STALE:
                if not self.state.registered():
                    # No schedule registered at all: the store lost its data (a restart
                    # without persistence, a failover, a flush), not a newer scheduler.
                    logger.warning(
                        "schedule %s: the ledger has no schedules registered (did the state store lose its data?);"
                        " registering this scheduler's schedules again",
                        schedule.id,
                    )
                    # From the start of the grace window: the slots within it still fire.
                    digests = {s.id: s.digest for s in self.schedules.values()}
                    self.state.register(digests, self.grace_ms + 1, now_ms=self.clock())
                    return  # claimed at the next wake
                self._stale.add(schedule.id)
                logger.warning(
                    "schedule %s was changed or removed by a scheduler started since; this one no longer fires it"
                    " (restart it to take the new definition)",
                    schedule.id,
                )
                return
            if answer == PAUSED:
                return
            last = slot
            if answer == CLAIMED:
                if missed > 0 and "missed" in self._metrics:
                    self._metrics["missed"].labels(schedule.id).inc(missed)
                self._send(schedule, slot)
                if self._busy(schedule):
                    return  # the slots after it are another scheduler's (or missed)

    def _send(self, schedule: Schedule, slot: int) -> None:
        message_id = firing_id(schedule.id, slot)
        if schedule.overlap == "skip" and self._previous_unfinished(schedule):
            logger.info("schedule %s: slot %d skipped: the previous firing has not ended", schedule.id, slot)
            self.state.sent(schedule.id, slot, "", self.clock())
            return
        if schedule.overlap == "cancel-previous":
            self._cancel_previous(schedule, slot)
        if schedule.drain_queues:
            self._start_drain(schedule, slot, message_id)
        elif not send_firing(self.broker, schedule, slot, message_id):
            self.state.sent(schedule.id, slot, "", self.clock())  # left out, as overlap = "skip" does
            return
        # Tried again a few times: a slot left pending is sent again by another scheduler
        # once its lease ends (see _sent_already for what keeps that from a second send).
        error = durable_write(lambda: self.state.sent(schedule.id, slot, message_id, self.clock()))
        if error is not None:
            raise error
        self.fired.append(message_id)
        if "fired" in self._metrics:
            self._metrics["fired"].labels(schedule.id).inc()
        logger.info("schedule %s: fired slot %d as %s", schedule.id, slot, message_id)

    def _sent_already(self, schedule: Schedule, slot: int) -> bool:
        """Whether a pending slot's firing reached the broker after all (its scheduler
        published it, then failed to say so in the ledger): its task status knows it. Then
        the slot is marked sent, not sent again. A firing whose scheduler died before its
        status was written is unknown here, and is sent again (the same message id)."""
        if schedule.drain_queues:
            return False
        message_id = firing_id(schedule.id, slot)
        from ..status import task_status

        try:
            known = task_status(message_id, self.broker).state != "unknown"
        except Exception as error:  # no status to read: it cannot be told; send it
            logger.warning(
                "schedule %s: whether slot %d's firing was sent cannot be told (%s: %s); sending it again",
                schedule.id,
                slot,
                type(error).__name__,
                error,
            )
            return False
        if known:
            logger.warning(
                "schedule %s: slot %d was claimed and its firing %s sent, but not marked sent; marked now",
                schedule.id,
                slot,
                message_id,
            )
            self.state.sent(schedule.id, slot, message_id, self.clock())
        return known

    def _start_drain(self, schedule: Schedule, slot: int, firing: str) -> None:
        """Work the drain's queues for its budget in a thread of this scheduler; its summary
        line becomes the firing's outcome."""
        from ..drain import drain

        def work() -> None:
            try:
                summary = drain(
                    schedule.drain_queues,
                    budget=schedule.drain_budget_ms,
                    threads=schedule.drain_threads,
                    broker=self.broker,
                )
                outcome = summary.line()
            except Exception as error:  # reported in the ledger and the log; the scheduler goes on
                outcome = f"failed: {type(error).__name__}: {error}"
                logger.error("schedule %s: the drain of slot %d %s", schedule.id, slot, outcome)
            try:
                self.state.outcome(schedule.id, slot, outcome)
            except Exception:
                logger.warning("schedule %s: could not record the drain's outcome", schedule.id, exc_info=True)

        self._draining = threading.Thread(target=work, name=f"dramaturg-drain-{schedule.id}", daemon=True)
        self._draining.start()

    def wait_for_drain(self, timeout: float | None = None) -> None:
        """Wait for the drain this scheduler runs, if any (at most its budget and grace)."""
        if self._draining is not None:
            self._draining.join(timeout)

    def _previous_unfinished(self, schedule: Schedule) -> str | None:
        """The message id of the schedule's last firing when it has not ended, else None."""
        previous = self.state.read(schedule.id).get("last_id")
        if not previous:
            return None
        from ..status import task_status

        try:
            return previous if task_status(previous, self.broker).state in _UNFINISHED else None
        except Exception as error:  # no status to read: the policy cannot apply; send it
            logger.warning(
                "schedule %s: overlap = %r cannot read the previous firing's status (%s: %s); sending the slot",
                schedule.id,
                schedule.overlap,
                type(error).__name__,
                error,
            )
            return None

    def _cancel_previous(self, schedule: Schedule, slot: int) -> None:
        """``overlap = "cancel-previous"``: cancel the last firing if it has not ended (a
        waiting one is skipped when a worker takes it, a running one interrupted), then the
        slot is sent. A cancel that fails is logged; the slot is sent all the same."""
        previous = self._previous_unfinished(schedule)
        if previous is None:
            return
        from ..cancelling import cancel

        try:
            done = cancel(previous, by=f"schedule {schedule.id}", broker=self.broker)
        except Exception as error:
            logger.warning(
                "schedule %s: could not cancel the previous firing %s before slot %d (%s: %s); sending the slot",
                schedule.id,
                previous,
                slot,
                type(error).__name__,
                error,
            )
            return
        logger.info(
            "schedule %s: slot %d cancels the previous firing %s (%s)", schedule.id, slot, previous, done.detail
        )


def run_in_thread(scheduler: Scheduler, name: str = "dramaturg-scheduler") -> threading.Thread:
    """Start ``scheduler.run()`` in a daemon thread (``dramaturg worker --scheduler``, tests)."""
    thread = threading.Thread(target=scheduler.run, name=name, daemon=True)
    thread.start()
    return thread
