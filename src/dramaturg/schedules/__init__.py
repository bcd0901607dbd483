"""Periodic tasks that fire once per slot, however many schedulers run.

::

    @dramaturg.periodic("*/5 * * * *", timezone="Europe/Paris")   # or every="30s"
    @dramaturg.actor(queue_name="reports")
    def report() -> None: ...

or in the config file::

    [[schedules]]
    id = "nightly-cleanup"
    cron = "0 3 * * *"
    actor = "shop.tasks:cleanup"
    args = [30]

``dramaturg scheduler`` (or ``dramaturg worker --scheduler``) fires them; run it on every
host if you like: each slot is claimed in a ledger in the state store (``[state] url``,
else the broker's own Redis; memory on the eager and stub brokers) by a compare-and-set,
and its message id is derived from (schedule id, slot), so a slot fires once whatever
the number of schedulers, their restarts and their clocks (within a minute of each other:
:mod:`dramaturg.schedules.scheduler`). Each firing is an ordinary message (outcomes,
retries, context, status by id). When and how slots fall, daylight-saving changes
included: :mod:`dramaturg.schedules.spec`. What the ledger keeps:
:mod:`dramaturg.schedules.state`.

Schedules are upserted by id when a scheduler starts: the ones it knows become the
registered ones, a removed schedule stops firing, and a changed one fires its new slots
from the newest one already fired (none twice).
"""

from __future__ import annotations

import importlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import dramatiq

from ..errors import ActorError, ConfigError, ScheduleNotFound, StateUnavailable, did_you_mean
from .scheduler import Scheduler, firing_id, send_firing
from .spec import Overlap, Schedule, config_line, parse_every
from .state import MemoryScheduleState, RedisScheduleState, ScheduleState

if TYPE_CHECKING:
    from ..config import Settings  # not at run time: worker processes never import pydantic

__all__ = [
    "Schedule",
    "ScheduleInfo",
    "ScheduleNotFound",
    "Scheduler",
    "firing_id",
    "load_schedules",
    "missed_slots",
    "pause",
    "periodic",
    "resume",
    "run_now",
    "schedule_infos",
    "state_of",
]

A = TypeVar("A", bound=dramatiq.Actor[Any, Any])

#: Schedules declared in code with :func:`periodic`, by id, in declaration order.
_declared: dict[str, Schedule] = {}
_states_lock = threading.Lock()


def periodic(
    cron: str | None = None,
    *,
    every: str | int | timedelta | None = None,
    timezone: str = "UTC",
    id: str | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    overlap: Overlap = "queue",
    catch_up: str | int | timedelta | None = None,
) -> Callable[[A], A]:
    """Fire the actor below on a schedule: a cron expression (in ``timezone``) or ``every``
    interval (``"30s"``). ``id`` defaults to the actor's name; ``args``/``kwargs`` are sent
    with each firing; ``overlap`` and ``catch_up`` as in ``[[schedules]]``.

    A bad expression, time zone or policy raises :class:`~dramaturg.ActorError` here, at import.
    """

    def decorate(actor: A) -> A:
        if not isinstance(actor, dramatiq.Actor):
            raise ActorError("@dramaturg.periodic goes above @dramaturg.actor (it schedules an actor)")
        schedule_id = id or actor.actor_name
        where = f"@periodic on {actor.actor_name!r}"
        try:
            schedule = Schedule(
                id=schedule_id,
                actor=actor.actor_name,
                cron=cron,
                every_ms=parse_every(every) if every is not None else None,
                timezone=timezone,
                args=tuple(args),
                kwargs=dict(kwargs or {}),
                overlap=overlap,
                catch_up_ms=parse_every(catch_up) if catch_up is not None else None,
                origin=f"code {actor.fn.__module__}:{actor.fn.__qualname__}",
            )
        except ValueError as error:
            raise ActorError(f"{where}: {error}") from None
        previous = _declared.get(schedule_id)
        if previous is not None and previous.actor != actor.actor_name:
            raise ActorError(f"{where}: schedule id {schedule_id!r} is already used by {previous.origin}")
        _declared[schedule_id] = schedule
        return actor

    return decorate


def load_schedules(settings: Settings, broker: dramatiq.Broker) -> list[Schedule]:
    """Every schedule: declared in code, then ``[[schedules]]`` of ``settings``, checked.

    Raises :class:`~dramaturg.ConfigError` (exit 78) naming the schedule, where it was
    declared (the config file's line) and the problem: an invalid expression, an unknown
    time zone, actor or policy, arguments that do not fit the actor, a duplicate id.
    """
    found: dict[str, Schedule] = {}
    for schedule in _declared.values():
        _check_actor(schedule, broker, f"schedule {schedule.id!r} ({schedule.origin})")
        found[schedule.id] = schedule
    path = settings.config_file
    for index, table in enumerate(settings.schedules):
        where = config_line(path, table.id, index)
        head = f"schedules: {table.id!r} ({where})"
        if table.id in found:
            raise ConfigError(f"{head}: duplicate id, also declared in {found[table.id].origin}", key="schedules")
        if (table.actor is None) == (table.drain is None):
            raise ConfigError(
                f"{head}: give an actor (module:attribute) or a drain = {{ queues, budget }}, not both or neither",
                key="schedules",
            )
        actor = _import_actor(table.actor, head) if table.actor is not None else None
        try:
            schedule = Schedule(
                id=table.id,
                actor=actor.actor_name if actor is not None else "",
                drain_queues=tuple(table.drain.queues) if table.drain else (),
                drain_budget_ms=table.drain.budget if table.drain else None,
                drain_threads=table.drain.threads if table.drain else 8,
                cron=table.cron,
                every_ms=table.every,
                timezone=table.timezone,
                args=tuple(table.args),
                kwargs=dict(table.kwargs),
                overlap=table.overlap,
                catch_up_ms=table.catch_up,
                origin=where,
            )
        except ValueError as error:
            raise ConfigError(f"{head}: {error}", key="schedules") from None
        _check_actor(schedule, broker, head)
        found[schedule.id] = schedule
    return list(found.values())


def _import_actor(name: str, head: str) -> dramatiq.Actor[Any, Any]:
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{head}: actor {name!r}: write it as 'module:attribute' (e.g. 'shop.tasks:cleanup')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{head}: actor {name!r}: cannot import {module_name!r}: {error}") from None
    except Exception as error:
        raise ConfigError(f"{head}: actor {name!r}: importing {module_name!r} failed: {error}") from None
    found = getattr(module, attribute, None)
    if not isinstance(found, dramatiq.Actor):
        actors = [n for n, v in vars(module).items() if isinstance(v, dramatiq.Actor)]
        hint = did_you_mean(attribute, actors)
        what = "no such attribute" if found is None else "not an actor"
        raise ConfigError(f"{head}: actor {name!r}: {what} in {module_name!r}{hint}", key="schedules")
    return found


def _check_actor(schedule: Schedule, broker: dramatiq.Broker, head: str) -> None:
    from ..actors import _misfit

    if schedule.drain_queues:
        from ..drain import _check_queues
        from ..errors import DramaturgError

        try:
            _check_queues(broker, schedule.drain_queues)
        except DramaturgError as error:
            raise ConfigError(f"{head}: drain: {error}", key="schedules") from None
        return
    try:
        actor = broker.get_actor(schedule.actor)
    except dramatiq.errors.ActorNotFound:
        raise ConfigError(f"{head}: unknown actor {schedule.actor!r}", key="schedules") from None
    misfit = _misfit(actor.fn, tuple(schedule.args), dict(schedule.kwargs))
    if misfit is not None:
        raise ConfigError(f"{head}: the arguments do not fit {schedule.actor}{misfit}", key="schedules")
    try:
        json.dumps([list(schedule.args), dict(schedule.kwargs)])
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{head}: the arguments are not JSON: {error}", key="schedules") from None


def state_of(broker: dramatiq.Broker) -> ScheduleState:
    """The ledger of ``broker``'s schedules, made on first use: memory on the eager and stub
    brokers, else ``[state] url`` or the broker's own Redis. Raises
    :class:`~dramaturg.StateUnavailable` on RabbitMQ without ``[state] url``."""
    found: ScheduleState | None = getattr(broker, "_dramaturg_schedules", None)
    if found is not None:
        return found
    with _states_lock:
        found = getattr(broker, "_dramaturg_schedules", None)
        if found is None:
            found = _make_state(broker)
            broker._dramaturg_schedules = found  # type: ignore[attr-defined]
    return found


def _make_state(broker: dramatiq.Broker) -> ScheduleState:
    from ..app import current_broker_or_none, current_settings
    from ..state_redis import state_redis

    kind = getattr(getattr(broker, "settings", None), "type", None) or type(broker).__name__
    if getattr(broker, "runs_inline", False) or kind == "stub":
        return MemoryScheduleState()
    settings = current_settings() if current_broker_or_none() is broker else None
    url = settings.state.url if settings is not None else None
    namespace = getattr(getattr(broker, "settings", None), "namespace", "dramaturg")
    client = state_redis(broker, url, needs="schedules need")
    return RedisScheduleState(client, namespace=namespace)


@dataclass(frozen=True)
class ScheduleInfo:
    """One schedule as ``dramaturg schedule list`` shows it. Times are ms since the epoch."""

    id: str
    expression: str
    actor: str
    overlap: str
    next_run: int
    paused: bool
    #: The newest firing: its message id, slot (None for ``schedule run``) and when it was sent.
    last_id: str | None
    last_slot: int | None
    last_at: int | None
    #: What became of it (its task status: succeeded, running, held, ...; a drain's summary line).
    last_outcome: str | None
    #: Slots that passed with no firing (no scheduler ran, or beyond catch_up).
    missed: int
    #: Whether this is the definition the schedulers fire (False: one started since with another, or none yet).
    registered: bool

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def schedule_infos(schedules: Sequence[Schedule], broker: dramatiq.Broker) -> list[ScheduleInfo]:
    """Where each of ``schedules`` stands, from the ledger and the task status of its last firing."""
    from ..status import task_status

    state = state_of(broker)
    registered = state.registered()
    now = int(time.time() * 1000)
    infos = []
    for schedule in schedules:
        ledger = state.read(schedule.id)
        last_id = ledger.get("last_id") or None
        outcome = ledger.get("last_outcome")  # a drain's summary
        if last_id and outcome is None and not schedule.drain_queues:
            try:
                outcome = task_status(last_id, broker).state
            except Exception:  # no status store: the outcome is unknown
                outcome = None
        last_slot = ledger.get("last_slot")
        infos.append(
            ScheduleInfo(
                id=schedule.id,
                expression=schedule.expression,
                actor=schedule.what,
                overlap=schedule.overlap,
                next_run=schedule.next_slot(now),
                paused=ledger.get("paused") == "1",
                last_id=last_id,
                last_slot=int(last_slot) if last_slot and last_slot.isdigit() else None,
                last_at=int(ledger["last_at"]) if "last_at" in ledger else None,
                last_outcome=outcome,
                missed=int(ledger.get("missed", "0")),
                registered=registered.get(schedule.id) == schedule.digest,
            )
        )
    return infos


def missed_slots(broker: dramatiq.Broker) -> dict[str, int]:
    """The registered schedules' missed slots by id (``dramaturg stats``); empty when there
    is no ledger to read (RabbitMQ without ``[state] url``)."""
    try:
        state = state_of(broker)
    except StateUnavailable:
        return {}
    return {schedule_id: int(state.read(schedule_id).get("missed", "0")) for schedule_id in sorted(state.registered())}


def find(schedules: Sequence[Schedule], schedule_id: str) -> Schedule:
    """The schedule ``schedule_id`` among ``schedules``; :class:`ScheduleNotFound` naming the ids known."""
    for schedule in schedules:
        if schedule.id == schedule_id:
            return schedule
    ids = [s.id for s in schedules]
    hint = did_you_mean(schedule_id, ids)
    raise ScheduleNotFound(
        f"no schedule {schedule_id!r}" + (hint or (f" (schedules: {', '.join(ids)})" if ids else " (none declared)"))
    )


def run_now(schedule: Schedule, broker: dramatiq.Broker) -> str:
    """Fire ``schedule`` once, now, outside its slots (``dramaturg schedule run``); its message id.
    In eager mode the task runs before this returns."""
    import uuid

    if schedule.drain_queues:
        raise ConfigError(f"schedule {schedule.id!r} is a drain: run it with dramaturg drain", key="schedules")
    message_id = str(uuid.uuid4())
    send_firing(broker, schedule, None, message_id)
    state_of(broker).sent(schedule.id, -1, message_id, int(time.time() * 1000))
    return message_id


def pause(schedule: Schedule, broker: dramatiq.Broker) -> None:
    """Stop firing ``schedule`` until :func:`resume` (every scheduler, at its next look)."""
    state_of(broker).pause(schedule.id)


def resume(schedule: Schedule, broker: dramatiq.Broker) -> None:
    """Fire ``schedule`` again from its next slot; the slots that passed while paused do not fire."""
    state_of(broker).resume(schedule.id, now_ms=int(time.time() * 1000))


def _forget_declared() -> None:
    """Forget the schedules declared in code (tests)."""
    _declared.clear()
