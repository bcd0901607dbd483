"""The middleware that enforces limits and unique keys, and finds flow control's state store.

Where it sits in the stack (:func:`dramaturg.middleware.framework_middleware`): just
before ``Outcomes``, so that its after-hook runs once ``Outcomes`` has decided what
became of the run (a unique key is released only on a terminal state), and after the
context, status and batch middleware, whose hooks see a task that waits as one put back.

- **Send** (``before_enqueue``): the keys of the actor's limits and unique key are made
  from the message (a missing argument or context value: :class:`~dramaturg.FlowSendError`
  naming the key, nothing sent); a unique key is claimed for the message's id, or the
  send is refused with :class:`~dramaturg.DuplicateTask` naming the task that holds it
  (which ``Actor.send`` turns into that task's message, by default). A message put back
  to wait, retried or kicked carries its key already and claims nothing.
- **Start** (``before_process_message``): every limit is taken in one round trip, all or
  none (``limits.lua``), or with no call on credits the process took ahead where a limit
  has room (:meth:`~dramaturg.flow.state.RedisFlowState.acquire`). A task that may not
  start now is **put back to wait**: a copy,
  same id, options and attempt (no retry spent, nothing counted as a failure), is
  enqueued with a delay and the delivery skipped, its status ``waiting`` with the reason
  ``waiting for concurrency tenant:fr``. No worker thread sleeps on a limit. A process
  the store refused a key puts the key's next tasks back for :data:`REMEMBER_REFUSAL_MS`
  without asking (:meth:`FlowControl._refused_locally`); on Redis and embedded the copy is
  written by the delivery's acknowledgement, in the same step
  (:meth:`~dramaturg.brokers.redis.RedisBroker.put_back_with_ack`).
- **Run**: the task's slots are leases (default: its ttr), renewed by its ``touch()``;
  a worker killed mid-task frees them when they end. A lease is named by the *run*: the
  message id and a token made for this delivery, so two deliveries of one message
  running at once (RabbitMQ delivering it again after a lost connection, or a Redis
  claim recovered, while the first still runs) need a slot each, the second waiting as
  any other task, and each run renews and releases only its own.
- **End** (``after_process_message``, ``after_skip_message``): its slots are released
  whatever the outcome; its unique key on a terminal one (succeeded, held, rejected,
  cancelled), or
  when it started (``until="started"``).

Why a delayed copy and not a parked list kicked when a slot frees: the copy is the
broker's, durable as any message (a worker or the state store dying loses nothing), it
needs no second queue per key nor a kicker that must itself survive crashes, and it
works the same on RabbitMQ, Redis and embedded. The price is latency and polling: a
concurrency wait backs off from 100 ms to :data:`MAX_WAIT_MS` (never past the lease it
waits for), so a freed slot is taken within that; a rate wait is the exact time until
the oldest start leaves the window, spread by a jitter of a few token intervals. A key
with a queue has its tasks' returns paced at the rate it takes them
(:mod:`dramaturg.flow.pacing`), so that they are not turned over again and again ahead
of other keys' tasks.

The state store going away: a send that needs it (a unique key) fails with
:class:`~dramaturg.FlowSendError`; a task that cannot take its limits is put back to wait
as if denied (a WARNING once per outage), never run unlimited.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import dramatiq
from dramatiq.middleware import SkipMessage

from ..errors import DuplicateTask, FlowSendError, StateUnavailable
from ..held import durable_write
from ..queues import canonical_queue
from ..task import Hold, RunOutcome, Task, run_of, start_run, taken_back, touch_observers
from .limits import Concurrency, Declared
from .pacing import Pacing
from .state import FlowState, LimitSpec, MemoryFlowState, RedisFlowState, new_run

__all__ = [
    "FLOW_OPTION",
    "MAX_WAIT_MS",
    "UNIQUE_OPTION",
    "WAITING_OPTION",
    "FlowControl",
    "close_flow",
    "declared_of",
    "flow_of",
    "state_of",
]

logger = logging.getLogger("dramaturg.flow")
R = TypeVar("R")

#: The actor option holding its checked limits and unique key (set by ``@actor``).
FLOW_OPTION = "dramaturg_flow"
#: The message option of a task put back to wait: what it waits for ("concurrency tenant:fr").
WAITING_OPTION = "dramaturg_waiting"
#: The message option counting how often a task was put back to wait (for the backoff).
WAITS_OPTION = "dramaturg_waits"
#: The message option of a task that holds a unique key: the key.
UNIQUE_OPTION = "dramaturg_unique"
#: The longest a task waits between two tries at a concurrency limit.
MAX_WAIT_MS = 2_000
#: The first wait.
FIRST_WAIT_MS = 100
#: How long a worker process that was refused a limit's key puts the key's next tasks back
#: without asking the state store (see FlowControl._refused_locally): its own release of a
#: slot of the key ends it sooner.
REMEMBER_REFUSAL_MS = 100
#: The attribute of a processed message (Dramatiq's proxy) naming the slots its run holds:
#: (keys, lease in ms, the store, the run's token, when it started on the monotonic clock).
_SLOTS = "_dramaturg_slots"
#: Outcomes after which a task never runs again (None: its handler returned).
_TERMINAL = frozenset({None, RunOutcome.SUCCEEDED, RunOutcome.HELD, RunOutcome.REJECTED, RunOutcome.CANCELLED})


def declared_of(broker: dramatiq.Broker, actor_name: str) -> Declared | None:
    actor = broker.actors.get(actor_name)
    if actor is None:
        return None
    found: Declared | None = actor.options.get(FLOW_OPTION)
    return found


class FlowControl(dramatiq.Middleware):
    """Enforces the limits and unique keys of actors (see the module); keeps the state
    store of locks too. ``url``: ``[state] url``."""

    def __init__(self, url: str | None, namespace: str = "dramaturg") -> None:
        self.url = url
        self.namespace = namespace
        self._state: FlowState | None = None
        self._lock = threading.Lock()
        self._outage_since: float | None = None
        self._ttr: Any = None
        #: Per thread: the unique key the last send claimed, until its enqueue is done.
        self._sending = threading.local()
        #: The limits' keys this process was refused lately ("c:tenant:fr"): until when (the
        #: monotonic clock), the wait the store gave, and the limit (and a rate's window)
        #: refused (see _refused_locally).
        self._refused: dict[str, tuple[float, float, int, int]] = {}
        #: What a task of an actor whose keys are all constant asks for, by (its Declared's
        #: id, queue name): (the Declared, the specs, the longest lease, the canonical queue,
        #: the concurrency keys). Made once instead of for every task (see _specs_of).
        self._specs: dict[tuple[int, str], tuple[Declared, tuple[LimitSpec, ...], int, str, tuple[str, ...]]] = {}
        #: (the broker, whether it runs tasks inline), looked up once.
        self._inline: tuple[Any, bool] = (None, False)
        #: When the tasks put back for each key come back (see dramaturg.flow.pacing).
        self._pacing = Pacing()
        if self._renew_on_touch not in touch_observers:
            touch_observers.append(self._renew_on_touch)

    @property
    def actor_options(self) -> set[str]:
        return {"limits", "unique"}

    # -- the store ---------------------------------------------------------------------------

    def state(self, broker: dramatiq.Broker) -> FlowState:
        """The store, made on first use (raises :class:`~dramaturg.StateUnavailable`)."""
        if self._state is None:
            with self._lock:
                if self._state is None:
                    self._state = self._make_state(broker)
        return self._state

    def _make_state(self, broker: dramatiq.Broker) -> FlowState:
        from dramatiq.brokers.stub import StubBroker

        if getattr(broker, "runs_inline", False) or isinstance(broker, StubBroker):
            return MemoryFlowState()
        from ..state_redis import state_redis

        client = state_redis(broker, self.url, needs="locks, limits and unique tasks need")
        return RedisFlowState(client, namespace=self.namespace)

    # -- sending -----------------------------------------------------------------------------

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        options = message.options
        if WAITING_OPTION in options or UNIQUE_OPTION in options:
            return  # put back, retried or kicked: its keys were made when it was first sent
        declared = declared_of(broker, message.actor_name)
        if declared is None:
            return
        for limit, template in declared.limits:
            render(template, message, limit.describe)  # a message whose keys cannot be made is refused now
        try:
            state = self.state(broker)
        except StateUnavailable as error:
            raise FlowSendError(f"{error}; {message.actor_name} was not sent") from None
        if declared.unique is None:
            return
        spec, template = declared.unique
        key = render(template, message, "unique")
        try:
            holder = state.claim(key, message.message_id, spec.ttl_ms)
        except Exception as error:
            # The claim may have been made and its reply lost: the key would then name, for
            # its whole ttl, a task that was never sent, and every send of the key would
            # return that one. Give it back (only if this message holds it).
            self._unclaim(broker, key, message.message_id)
            raise FlowSendError(
                f"the state store did not answer, so unique key {key!r} could not be claimed and"
                f" {message.actor_name} was not sent: {type(error).__name__}: {error}"
            ) from None
        if holder is not None and holder != message.message_id:
            raise DuplicateTask(key, holder, message.actor_name)
        options[UNIQUE_OPTION] = key
        claims = self._claims()
        if len(claims) >= 10_000:
            claims.clear()  # sends whose after-hook never came, and that nobody told us of
        claims[message.message_id] = key

    def _claims(self) -> dict[str, str]:
        """Per thread: the unique keys claimed by sends whose enqueue is not done yet, by message id."""
        claims: dict[str, str] | None = getattr(self._sending, "claims", None)
        if claims is None:
            claims = self._sending.claims = {}
        return claims

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        claims = getattr(self._sending, "claims", None)
        if claims:
            claims.pop(message.message_id, None)

    def forget_unsent(self, broker: dramatiq.Broker) -> None:
        """Release the unique keys this thread's sends claimed, if they failed after the
        claim (Dramatiq has no hook for a failed send: ``Actor.send`` calls this)."""
        claims = getattr(self._sending, "claims", None)
        if not claims:
            return
        self._sending.claims = {}
        for message_id, key in claims.items():
            self._unclaim(broker, key, message_id)

    def after_unsent_many(self, broker: dramatiq.Broker, messages: Sequence[Any]) -> None:
        """Messages of ``send_many`` certainly not sent (a chunk that failed, for instance at
        a duplicate) give back the unique keys they claimed."""
        claims = getattr(self._sending, "claims", None)
        if not claims:
            return
        for message in messages:
            key = claims.pop(message.message_id, None)
            if key:
                self._unclaim(broker, key, message.message_id)

    # -- starting ----------------------------------------------------------------------------

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        inner = getattr(message, "_message", message)  # the proxy's __getattr__ costs ~1 us a name
        declared = declared_of(broker, inner.actor_name)
        if declared is None:
            return
        run = run_of(message)
        if run is not None and run.purged:
            return  # dropped unrun further on (CancelWatch): never put back to wait as a fresh copy
        if declared.limits:
            self._take_limits(broker, message, declared)
        key = inner.options.get(UNIQUE_OPTION)
        if key and declared.unique is not None and declared.unique[0].until == "started":
            self._unclaim(broker, key, inner.message_id)

    def _take_limits(self, broker: dramatiq.Broker, message: Any, declared: Declared) -> None:
        try:
            state = self.state(broker)
        except StateUnavailable as error:
            raise Hold(str(error)) from None
        inner = getattr(message, "_message", message)  # the proxy's __getattr__ costs ~1 us a name
        specs, lease_ms, queue, slot_keys = self._specs_of(broker, inner, declared)
        message_id = inner.message_id
        inline = self._inline[1] if self._inline[0] is broker else self._runs_inline(broker)
        if self._refused and not inline:
            local = self._refused_locally(specs)
            if local is not None:
                index, until_ms = local
                spec = specs[index]
                what = f"{'concurrency' if spec.kind == 'c' else 'rate'} {spec.key}"
                with contextlib.suppress(Exception):
                    state.refused_later(message_id, spec.key, queue)
                self._wait(broker, message, (spec, until_ms), what)
                raise SkipMessage(f"waiting for {what}")
        run = new_run()  # this delivery's: the same for every ask below, so an ask repeated takes nothing twice
        while True:
            try:
                denied = state.acquire(message_id, run, specs, queue, waited=WAITING_OPTION in inner.options)
            except Exception as error:
                if lease_ms:
                    # Its reply may be what was lost, the slots taken: give them back (this
                    # run's only) once the store answers, not when their lease ends.
                    with contextlib.suppress(Exception):
                        state.release_later(message_id, run, slot_keys, maybe=True)
                self._note_outage(error)
                self._wait(broker, message, None, "the state store (limits cannot be checked)")
                raise SkipMessage("the state store did not answer") from None
            if self._outage_since is not None:
                self._outage_since = None
                logger.warning("flow control: the state store answers again")
            if denied is None:
                break
            spec = specs[denied.index]
            what = f"{'concurrency' if spec.kind == 'c' else 'rate'} {spec.key}"
            if inline:
                # Eager mode: the sender's own thread runs it, so it waits here, as it would queued.
                with state.changed:  # type: ignore[attr-defined]
                    state.changed.wait(min(max(denied.wait_ms, 1), 50) / 1000)  # type: ignore[attr-defined]
                continue
            self._remember_refusal(spec, denied.wait_ms)
            self._wait(broker, message, (spec, denied.wait_ms), what)
            raise SkipMessage(f"waiting for {what}")
        if WAITING_OPTION in inner.options:
            # It waits no more: a copy made of it from now on (a retry, a release) must not
            # say so in its status, nor back off as if it had waited.
            inner.options.pop(WAITING_OPTION, None)
            inner.options.pop(WAITS_OPTION, None)
        if lease_ms:
            message.__dict__[_SLOTS] = (slot_keys, lease_ms, state, run, time.monotonic())

    def _specs_of(
        self, broker: dramatiq.Broker, inner: Any, declared: Declared
    ) -> tuple[tuple[LimitSpec, ...], int, str, tuple[str, ...]]:
        """What the task ``inner`` asks for: its limits' specs, the longest lease among
        them (0: no concurrency limit), its canonical queue and its concurrency keys.

        Kept per actor and queue where every key is constant and the message names no ttr
        of its own (a lease is the ttr unless given): making them cost about a third of a
        limit's work per task. A key made from the task's arguments or context is made
        for each task (raises :class:`~dramaturg.Hold` when it cannot be)."""
        options = inner.options
        own_ttr = "ttr" in options
        if not own_ttr:
            found = self._specs.get((id(declared), inner.queue_name))
            if found is not None and found[0] is declared:
                return found[1], found[2], found[3], found[4]
        made: list[LimitSpec] = []
        lease_ms = 0
        constant = True
        for limit, template in declared.limits:
            key = template.constant
            if key is None:
                constant = False
                try:
                    key = template.render(inner.args, inner.kwargs, options.get("dramaturg_context") or {})
                except KeyError as missing:
                    raise Hold(
                        f"{limit.describe}: the key cannot be made: the message has no {missing.args[0]}"
                    ) from None
            if isinstance(limit, Concurrency):
                ms = limit.lease_ms or self._ttr_ms(broker, inner)
                lease_ms = max(lease_ms, ms)
                made.append(LimitSpec("c", key, limit.limit, ms))
            else:
                made.append(LimitSpec("r", key, limit.limit, limit.per_ms))
        specs = tuple(made)
        queue = canonical_queue(inner.queue_name)
        slot_keys = tuple(spec.key for spec in specs if spec.kind == "c")
        if constant and not own_ttr:
            if len(self._specs) >= 1_000:  # actors declared again and again (tests): never grows for ever
                self._specs.clear()
            self._specs[(id(declared), inner.queue_name)] = (declared, specs, lease_ms, queue, slot_keys)
        return specs, lease_ms, queue, slot_keys

    def _runs_inline(self, broker: dramatiq.Broker) -> bool:
        inline = bool(getattr(broker, "runs_inline", False))  # RedisBroker's __getattr__: ~1 us
        self._inline = (broker, inline)
        return inline

    def _remember_refusal(self, spec: LimitSpec, wait_ms: int) -> None:
        """The store refused ``spec``'s key: its next tasks in this process are put back
        without asking, for :data:`REMEMBER_REFUSAL_MS` (or the wait, if shorter)."""
        now = time.monotonic()
        refused = self._refused
        if len(refused) >= 10_000:  # keys of a template (tenant:{store}) must not pile up
            for name in [name for name, entry in list(refused.items()) if entry[0] <= now]:
                refused.pop(name, None)
        refused[spec.kind + ":" + spec.key] = (
            now + min(wait_ms, REMEMBER_REFUSAL_MS) / 1000,
            now + wait_ms / 1000,
            spec.limit,
            spec.ms,
        )

    def _refused_locally(self, specs: Sequence[LimitSpec]) -> tuple[int, int] | None:
        """A limit of ``specs`` this process was refused within :data:`REMEMBER_REFUSAL_MS`:
        its index, and the ms until the lease or window end the store named (for the backoff).

        Why: a tenant's long queue makes every worker thread take its tasks, one by one,
        and put them back; asking the store for each costs a round trip and the store's
        time, for an answer that a refusal a few ms earlier already gave. Remembering it
        only ever refuses (a task is put back, never started, without the store), so no
        limit can be exceeded; a slot freed meanwhile by another process is taken up to
        :data:`REMEMBER_REFUSAL_MS` later, a slot freed by this process at once (its
        release forgets the refusal). Entries are dropped when they run out."""
        now = time.monotonic()
        refused = self._refused
        for index, spec in enumerate(specs):
            name = spec.kind + ":" + spec.key
            entry = refused.get(name)
            if entry is None:
                continue
            if entry[0] <= now:
                refused.pop(name, None)
            elif spec.limit <= entry[2] and (spec.kind == "c" or spec.ms == entry[3]):
                # Refused at that limit: refused at any lower one too. Actors that share a key
                # with a higher limit (or another window) ask the store: it may let them start.
                return index, max(0, int((entry[1] - now) * 1000))
        return None

    def _forget_refusals(self, keys: Sequence[str]) -> None:
        """This process releases slots of ``keys``: a task of theirs asks the store again."""
        if self._refused:
            for key in keys:
                self._refused.pop("c:" + key, None)

    def _ttr_ms(self, broker: dramatiq.Broker, message: Any) -> int:
        ttr = self._ttr
        if ttr is None:
            from ..middleware.ttr import TimeToRun

            ttr = self._ttr = next((m for m in broker.middleware if isinstance(m, TimeToRun)), False)
        return ttr.ttr_ms(broker, message) if ttr else 600_000

    def _wait(self, broker: dramatiq.Broker, message: Any, denied: tuple[LimitSpec, int] | None, what: str) -> None:
        """Put ``message`` back to wait (see the module): a delayed copy, same id and attempt."""
        from ..middleware.outcomes import _enqueue_copy, _undone

        waits = int(message.options.get(WAITS_OPTION, 0)) + 1
        delay = wait_ms(denied, waits)
        start_run(message).outcome = RunOutcome.RELEASED
        if taken_back(message):  # RabbitMQ delivers it again by itself
            return
        if denied is not None:  # (after: a copy never made must not take a place in the schedule)
            delay = self._pacing.delay_ms(denied[0], delay)
        copy = message.copy(
            queue_name=canonical_queue(message.queue_name), options={WAITING_OPTION: what, WAITS_OPTION: waits}
        )
        put_back = getattr(broker, "put_back_with_ack", None)
        if put_back is not None and put_back(message, copy, delay=delay):
            # Redis, embedded: the copy is enqueued by the acknowledgement, in the same step.
            logger.debug("%s (message %s) waits %d ms for %s", message.actor_name, message.message_id, delay, what)
            return
        error = durable_write(lambda: _enqueue_copy(broker)(copy, delay=delay))
        if error is not None:
            outcome = _undone(broker, message, error)
            logger.error(
                "%s (message %s) waits for %s, and could not be put back (%s: %s); it is %s",
                message.actor_name,
                message.message_id,
                what,
                type(error).__name__,
                error,
                "rejected into the dead-letter queue" if outcome is RunOutcome.REJECTED else "left to run again",
            )
            return
        logger.debug("%s (message %s) waits %d ms for %s", message.actor_name, message.message_id, delay, what)

    def _note_outage(self, error: Exception) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.warning(
                "flow control: the state store did not answer (%s: %s); tasks with limits wait until it does",
                type(error).__name__,
                error,
            )

    # -- running and ending ------------------------------------------------------------------

    def _renew_on_touch(self, task: Task) -> None:
        held = task.message.__dict__.get(_SLOTS)
        if held is None or held[2] is not self._state:
            return
        slots, lease_ms, state, run, _ = held
        try:
            if state.renew(task.message_id, run, slots, lease_ms) < len(slots):
                logger.warning(
                    "%s (message %s): a concurrency slot's lease had ended before touch() (a slot of %s);"
                    " touch() more often than the lease (the ttr)",
                    task.actor_name,
                    task.message_id,
                    ", ".join(slots),
                )
        except Exception as error:
            logger.warning("touch(): the concurrency slots of %s were not renewed: %s", task.message_id, error)

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        inner = getattr(message, "_message", message)
        held = message.__dict__.pop(_SLOTS, None)
        if held is not None:
            if self._pacing.watching:
                self._pacing.ran(held[0], time.monotonic() - held[4])
            if self._refused:
                self._forget_refusals(held[0])
            try:
                held[2].release_later(inner.message_id, held[3], held[0])
            except Exception as error:
                logger.warning(
                    "the concurrency slots of %s (%s) were not released (%s); they free when their lease ends",
                    inner.message_id,
                    ", ".join(held[0]),
                    error,
                )
        key = inner.options.get(UNIQUE_OPTION)
        if not key:
            return
        run = run_of(message)
        outcome = None if run is None else run.outcome
        if outcome is None and exception is not None:
            return  # skipped before any outcome was decided: it runs again
        if outcome in _TERMINAL:
            self._unclaim(broker, key, message.message_id)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        held = message.__dict__.pop(_SLOTS, None)
        if held is not None:
            self._forget_refusals(held[0])
            try:
                held[2].release_later(message.message_id, held[3], held[0])
            except Exception:
                logger.warning("the concurrency slots of %s were not released", message.message_id, exc_info=True)

    def release_unique(self, broker: dramatiq.Broker, key: str, message_id: str) -> None:
        """Give back the unique key ``key`` that the task ``message_id`` holds, for a task
        that ended without running (purged from its queue); a failure is logged, the key
        then expires with its ttl."""
        self._unclaim(broker, key, message_id)

    def _unclaim(self, broker: dramatiq.Broker, key: str, message_id: str) -> None:
        try:
            self.state(broker).unclaim(key, message_id)
        except Exception as error:
            logger.warning("unique key %r of %s was not released (%s); it expires with its ttl", key, message_id, error)

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        # Pacing holds at most three quarters of the copies its delay queues' consumers can hold (see pacing).
        self._pacing.budget = int(getattr(worker, "delay_prefetch", 0)) * 3 // 4

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        if self._state is not None:
            # Its threads have stopped: the credits it holds go back with the releases
            # (a worker process exits without close()).
            give_back = getattr(self._state, "give_back_credits", None)
            if give_back is not None:
                give_back()
            self._state.flush()

    def close(self) -> None:
        if self._renew_on_touch in touch_observers:
            touch_observers.remove(self._renew_on_touch)
        if self._state is not None:
            self._state.close()


def render(template: Any, message: Any, what: str) -> str:
    """The key ``template`` makes of ``message``; :class:`~dramaturg.FlowSendError` naming it if it cannot."""
    try:
        return str(template.render(message.args, message.kwargs, message.options.get("dramaturg_context") or {}))
    except KeyError as missing:
        raise FlowSendError(
            f"{message.actor_name}: {what}: key {template.text!r} cannot be made: the message has no"
            f" {missing.args[0]}; it was not sent"
        ) from None


def wait_ms(denied: tuple[LimitSpec, int] | None, waits: int) -> int:
    """How long a task put back waits before its next try (see the module)."""
    if denied is not None and denied[0].kind == "r":
        spec, until_ms = denied
        spread = min(max(spec.ms // spec.limit, 10) * 4, MAX_WAIT_MS)
        return until_ms + random.randint(0, spread)
    backoff = min(FIRST_WAIT_MS * 2 ** min(waits - 1, 10), MAX_WAIT_MS)
    if denied is not None and denied[1] > 0:
        backoff = min(backoff, denied[1])  # the lease it waits for ends then at the latest
    return max(10, int(backoff * random.uniform(0.5, 1.0)))


def close_flow(middleware: Sequence[dramatiq.Middleware]) -> None:
    """Write the slot releases a broker's flow control buffers, and stop observing touch()."""
    for item in middleware:
        if isinstance(item, FlowControl):
            item.close()


def flow_of(broker: dramatiq.Broker) -> FlowControl:
    """The :class:`FlowControl` of ``broker`` (raises :class:`~dramaturg.StateUnavailable` without one)."""
    for middleware in broker.middleware:
        if isinstance(middleware, FlowControl):
            return middleware
    raise StateUnavailable(
        "locks, limits and unique tasks need dramaturg's FlowControl middleware:"
        " make the broker with dramaturg.bootstrap()"
    )


def state_of(broker: dramatiq.Broker | None = None) -> FlowState:
    """The flow control state store of ``broker`` (default: the app's)."""
    if broker is None:
        from ..app import get_broker

        broker = get_broker()
    return flow_of(broker).state(broker)


def send_with_flow(
    actor: Any,
    send: Callable[..., dramatiq.Message[R]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
    delay: Any,
    options: dict[str, Any],
) -> dramatiq.Message[R]:
    """``Actor.send_with_options`` of an actor with limits or a unique key: a duplicate of a
    unique task returns that task's message (marked ``dramaturg_duplicate``) or raises, and
    a send that fails after its key was claimed releases the key."""
    try:
        return send(args=args, kwargs=kwargs, delay=delay, **options)
    except DuplicateTask as duplicate:
        declared: Declared = actor.options[FLOW_OPTION]
        if declared.unique is None or declared.unique[0].on_duplicate == "raise":
            raise
        logger.info("%s", duplicate)
        message = actor.message_with_options(args=args, kwargs=kwargs or {}, **options)
        copy: dramatiq.Message[R] = message.copy(
            message_id=duplicate.existing_id, options={UNIQUE_OPTION: duplicate.key, "dramaturg_duplicate": True}
        )
        return copy
    except BaseException:
        broker = actor.broker
        for middleware in broker.middleware:
            if isinstance(middleware, FlowControl):
                middleware.forget_unsent(broker)
        raise
