"""Where flow control's state is kept: Redis (every real broker), or memory (eager mode).

Both answer the same steps with the same meaning, so that a lock or a limit behaves the
same inline as across workers:

- locks: ``lock_acquire`` (with a fencing token that only grows: the greater of the
  name's last token + 1 and the store's clock in microseconds, so that a store wiped
  since, whose counters are gone, still hands out greater tokens than before; assumed:
  its clock, after the wipe, reads later than when the last token before it was handed
  out), ``lock_release`` and ``lock_renew`` (refused unless the caller still holds it),
  ``lock_holder`` and ``locks`` (what is held, for ``dramaturg locks list``);
- limits: ``acquire`` takes every limit of a task at once or none (a concurrency slot is
  a lease named by the *run*: the task's message id and a token made for that delivery
  by :func:`new_run`, so that two deliveries of one message running at once hold a slot
  each; a rate limit counts starts in a sliding window), ``release`` and ``renew`` a
  run's own leases (never another run's), ``usage`` (for ``dramaturg limits``);
- unique tasks: ``claim`` a key for a message id (or learn who holds it), ``unclaim``.

On Redis each step is one call of a Lua script (``lock.lua``, ``limits.lua``,
``unique.lua`` beside this module), on Redis's clock. Keys:
``<namespace>:__lock__:<name>`` (a held lock), ``<namespace>:__lock_fences__`` (a hash:
the last fencing token of each name; never expires, so tokens only grow, and once it is
lost the clock keeps them growing),
``<namespace>:__limit__:c:<key>`` and ``...:r:<key>`` (the leases, or the starts, of
a concurrency or rate limit's key, expiring with the last lease or window),
``<namespace>:__limit_waiting__:<key>`` (the tasks refused for the key),
``<namespace>:__unique__:<key>`` (the task holding a key).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import redis

__all__ = ["Denied", "FlowState", "HeldLock", "LimitSpec", "MemoryFlowState", "RedisFlowState", "Usage", "new_run"]

#: How long a refused task counts as waiting unless refused again (as WAITING_MS in limits.lua).
WAITING_MS = 60_000

_SCRIPTS = resources.files("dramaturg.flow")
_LOCK = _SCRIPTS.joinpath("lock.lua").read_text(encoding="utf-8")
_LIMITS = _SCRIPTS.joinpath("limits.lua").read_text(encoding="utf-8")
_UNIQUE = _SCRIPTS.joinpath("unique.lua").read_text(encoding="utf-8")
_LIMITS_SHA = hashlib.sha1(_LIMITS.encode()).hexdigest()
#: How often a process writes the slot releases its tasks left (see RedisFlowState.release_later).
RELEASE_INTERVAL_S = 0.005
#: How many releases a process buffers before it stops adding those of asks that may have
#: taken nothing (``maybe``): in an outage every ask fails, and each would add one.
MAYBE_RELEASES_MAX = 10_000
#: How long a limit's credit may be used after the call that took it was sent (as
#: CREDIT_MS in limits.lua; see RedisFlowState.acquire).
CREDIT_S = 0.2
#: The most credits a call takes for one limit, and the part of the limit they may be at
#: most (a limit under 16 takes none: a credit unused holds a start or a slot for 200 ms).
CREDITS_MAX = 32
CREDITS_PART = 16
#: How many buffered slot releases an ask carries along (see RedisFlowState._acquire_many).
RELEASES_PER_ASK = 200

logger = logging.getLogger("dramaturg.flow")


_random = random.Random()
os.register_at_fork(after_in_child=_random.seed)  # a forked worker must not repeat its parent's tokens


def new_run() -> str:
    """A token for one run of a task (one delivery being started): random, made before
    the run asks for its limits, so that asking again with it (after a lost reply) is the
    same run, and takes nothing twice.

    From a generator of its own seeded from ``os.urandom`` (again in a forked child; a
    user's ``random.seed()`` does not reach it), not ``os.urandom`` for each: that call
    lets go of the GIL, and a worker thread getting it back behind the other threads
    cost more than the rest of the limit's work per task (py-spy, ``benchmarks/flow.py``).
    Tokens are unique, not secret."""
    return f"{_random.getrandbits(64):016x}"


def run_name(message_id: str, run: str) -> str:
    """What a run's leases and starts are named by (as ``limits.lua`` names them)."""
    return f"{message_id}:{run}"


@dataclass(frozen=True)
class LimitSpec:
    """One limit to take for a task: ``kind`` "c" (concurrency: ``limit`` running, each a
    lease of ``ms``) or "r" (rate: ``limit`` starts in any window of ``ms``), on ``key``."""

    kind: str
    key: str
    limit: int
    ms: int


@dataclass(frozen=True)
class Denied:
    """A task may not start: limit ``index`` of those asked for said no; ``wait_ms``: when a
    lease ends (concurrency) or the oldest start leaves the window (rate)."""

    index: int
    wait_ms: int


@dataclass(frozen=True)
class HeldLock:
    """A held lock as ``dramaturg locks list`` shows it."""

    name: str
    token: int
    holder: str
    expires_in_ms: int


@dataclass(frozen=True)
class Usage:
    """A limit's key as ``dramaturg limits`` shows it: leases (or starts in the window) now."""

    key: str
    #: Concurrency slots taken (leases that have not ended).
    in_use: int
    #: Tasks put back to wait for it in the last minute that have not started since.
    waiting: int = 0
    #: Rate: the starts of the window, as of the last start.
    started: int = 0


class FlowState(Protocol):
    def lock_acquire(self, name: str, owner: str, ttl_ms: int, holder: str) -> tuple[int | None, int]: ...
    def lock_release(self, name: str, owner: str) -> bool: ...
    def lock_renew(self, name: str, owner: str, ttl_ms: int) -> bool: ...
    def lock_holder(self, name: str) -> HeldLock | None: ...
    def locks(self) -> list[HeldLock]: ...
    def acquire(
        self, message_id: str, run: str, limits: Sequence[LimitSpec], queue: str = "", *, waited: bool = False
    ) -> Denied | None: ...
    def release(self, message_id: str, run: str, keys: Sequence[str]) -> int: ...
    def release_later(self, message_id: str, run: str, keys: Sequence[str], *, maybe: bool = False) -> None: ...
    def refused_later(self, message_id: str, key: str, queue: str) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def renew(self, message_id: str, run: str, keys: Sequence[str], ms: int) -> int: ...
    def usage(self) -> list[Usage]: ...
    def waiting_in(self, queues: Sequence[str]) -> dict[str, int]: ...
    def claim(self, key: str, message_id: str, ttl_ms: int) -> str | None: ...
    def unclaim(self, key: str, message_id: str) -> bool: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisFlowState:
    """Flow control in a Redis (the broker's own, or ``[state] url``)."""

    def __init__(self, client: redis.Redis, *, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.lock_prefix = f"{namespace}:__lock__:"
        self.fences = f"{namespace}:__lock_fences__"
        self.limit_prefix = f"{namespace}:__limit__:"
        self.waiting_prefix = f"{namespace}:__limit_waiting__:"
        self.queue_waiting_prefix = f"{namespace}:__limit_waiting_queue__:"
        self.unique_prefix = f"{namespace}:__unique__:"
        self._lock = client.register_script(_LOCK)
        self._limits = client.register_script(_LIMITS)
        self._unique = client.register_script(_UNIQUE)
        #: Per worker thread: a connection of its own for the message path (see OwnConnection).
        self._own = threading.local()
        self._releases: deque[tuple[str, str]] = deque()
        #: Tasks put back without asking, to count as waiting (see refused_later).
        self._refusals: deque[tuple[str, str, str]] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_pid = 0
        self._closed = False
        self._start_lock = threading.Lock()
        from ..group_commit import GroupCommit

        self._acquires: GroupCommit[tuple[str, str, Sequence[LimitSpec], str], Denied | None] = GroupCommit(
            self._acquire_many
        )
        #: Credits this process holds, by (stored key, lease or window): (usable until, member), oldest first.
        self._credits: dict[tuple[str, int], deque[tuple[float, str]]] = {}
        #: The concurrency credits runs took, by (message id, run): {key: the slot's member}.
        self._lent: dict[tuple[str, str], dict[str, tuple[str, float, int]]] = {}
        self._credit_lock = threading.Lock()
        self._credit_pid = os.getpid()

    def _run_own(self, keys: list[str], args: list[Any]) -> Any:
        """``limits.lua`` on this thread's own connection: about 15 us of CPU a call against
        40 through redis-py's ``Script`` (see :class:`~dramaturg.brokers.redis.connection.OwnConnection`)."""
        own = getattr(self._own, "connection", None)
        if own is None:
            from ..brokers.redis.connection import OwnConnection  # redis: imported only when used

            own = self._own.connection = OwnConnection(self.client)
        return own.run(_LIMITS_SHA, _LIMITS, keys, args)

    # -- locks ---------------------------------------------------------------------------

    def lock_acquire(self, name: str, owner: str, ttl_ms: int, holder: str) -> tuple[int | None, int]:
        """(fencing token, 0) when taken; (None, ms until it expires) when another holds it."""
        taken, value = self._lock(
            keys=[self.lock_prefix + name, self.fences], args=["acquire", owner, ttl_ms, name, holder]
        )
        return (int(value), 0) if int(taken) else (None, max(0, int(value)))

    def lock_release(self, name: str, owner: str) -> bool:
        return bool(int(self._lock(keys=[self.lock_prefix + name, self.fences], args=["release", owner])))

    def lock_renew(self, name: str, owner: str, ttl_ms: int) -> bool:
        return bool(int(self._lock(keys=[self.lock_prefix + name, self.fences], args=["renew", owner, ttl_ms])))

    def lock_holder(self, name: str) -> HeldLock | None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.get(self.lock_prefix + name)
            pipe.pttl(self.lock_prefix + name)
            value, pttl = pipe.execute()
        if value is None:
            return None
        _, fence, holder = _text(value).split(" ", 2)
        return HeldLock(name, int(fence), holder, max(0, int(pttl)))

    def locks(self) -> list[HeldLock]:
        found = []
        for key in self.client.scan_iter(match=_glob(self.lock_prefix) + "*", count=500):
            held = self.lock_holder(_text(key)[len(self.lock_prefix) :])
            if held is not None:
                found.append(held)
        return sorted(found, key=lambda held: held.name)

    # -- limits --------------------------------------------------------------------------

    def acquire(
        self, message_id: str, run: str, limits: Sequence[LimitSpec], queue: str = "", *, waited: bool = False
    ) -> Denied | None:
        """Take every limit of the run ``run`` (a token of :func:`new_run`) of the task
        ``message_id``, or none (see ``limits.lua``). Asked again with the same run, it
        answers as the first time and takes nothing more. A task refused counts as waiting
        in ``queue`` (its canonical queue, for ``dramaturg stats``) until it is let start.

        The worker threads starting tasks meanwhile share the round trip: their acquires go
        in one call (:class:`~dramaturg.group_commit.GroupCommit`: a lone one goes at once,
        nobody waits for a timer), each still all-or-none, in the order they came.

        A task may start on credits instead, with no call: starts and slots a call took
        ahead for this process where there was room and nobody waited (up to
        :data:`CREDITS_MAX` a limit, a :data:`CREDITS_PART` of the limit at most), used only
        within :data:`CREDIT_S` of the call and counted in the store as taken until then
        (see ``limits.lua``), so the bound stays exact; those left unused are given back.
        A concurrency credit is a slot of its own: the run releases and renews it as it
        would its slot. ``waited``: the task was put back to wait before, and asks the store
        (which then stops counting it as waiting).
        """
        if not waited and self._credits and self._use_credits(message_id, run, limits):
            return None
        return self._acquires.submit((message_id, run, limits, queue))

    def _use_credits(self, message_id: str, run: str, limits: Sequence[LimitSpec]) -> bool:
        """Take a credit of every limit in ``limits`` if this process holds one of each."""
        now = time.monotonic()
        prefix = self.limit_prefix
        with self._credit_lock:
            if self._credit_pid != os.getpid():  # a forked child: its parent's credits are the parent's
                self._credits.clear()
                return False
            found = []
            for spec in limits:
                stored = prefix + spec.kind + ":" + spec.key
                credits = self._credits.get((stored, spec.ms))
                if not credits:
                    return False
                if credits[0][0] <= now:
                    while credits and credits[0][0] <= now:
                        self._give_back(stored, credits.popleft()[1])
                    if not credits:
                        return False
                found.append(credits)
            slots = None
            for spec, credits in zip(limits, found, strict=True):
                until, member = credits.popleft()
                if spec.kind == "c":
                    if slots is None:
                        slots = {}
                    slots[spec.key] = (member, until, spec.ms)
            if slots is not None:
                self._lent[(message_id, run)] = slots
            return True

    def _member(self, message_id: str, run: str, key: str, *, done: bool = False) -> str:
        """What the run's slot of ``key`` is named by: its own, or the credit it took."""
        lent = self._lent.get((message_id, run))
        if lent is None:
            return run_name(message_id, run)
        slot = lent.get(key)
        member = run_name(message_id, run) if slot is None else slot[0]
        if done:
            self._lent.pop((message_id, run), None)
        return member

    def _recycle(self, lent: dict[str, tuple[str, float, int]], keys: Sequence[str]) -> list[str]:
        """A slot taken on credit whose credit is still good goes back to the credits, for
        the next task of the process (its lease still runs the whole lease past the credit's
        end, and it never stopped counting as taken); the keys left to release."""
        now = time.monotonic()
        left = []
        prefix = self.limit_prefix + "c:"
        with self._credit_lock:
            same = self._credit_pid == os.getpid()
            for key in keys:
                slot = lent.get(key)
                if slot is None or not same or slot[1] <= now:
                    left.append(key)
                    continue
                stored = (prefix + key, slot[2])
                credits = self._credits.get(stored)
                if credits is None:
                    credits = self._credits[stored] = deque()
                credits.appendleft((slot[1], slot[0]))
        return left

    def _give_back(self, stored: str, member: str) -> None:
        """An unused credit leaves the window with the next write of releases."""
        self._releases.append((stored, member))
        if self._thread is None or self._thread_pid != os.getpid():
            self._start()
        self._wake.set()

    def _acquire_many(self, items: list[tuple[str, str, Sequence[LimitSpec], str]]) -> list[Denied | None]:
        # The slot releases buffered so far go first, in the same call (their runs ended
        # before; a call that fails gives them back to the buffer: a release is idempotent).
        releases: list[tuple[str, str]] = []
        with contextlib.suppress(IndexError):  # another thread may take the last
            while self._releases and len(releases) < RELEASES_PER_ASK:
                releases.append(self._releases.popleft())
        keys: list[str] = [key for key, _ in releases]
        args: list[Any] = ["acquire_many", len(releases), *(member for _, member in releases)]
        asked: set[tuple[str, int]] = set()
        wanted: list[tuple[str, str]] = []  # the credits this call may take: (limit key, member)
        for message_id, run, limits, queue in items:
            keys.append(self.queue_waiting_prefix + queue)
            args += [message_id, run, len(limits)]
            for spec in limits:
                stored = f"{self.limit_prefix}{spec.kind}:{spec.key}"
                keys += [stored, self.waiting_prefix + spec.key]
                want = 0
                if (stored, spec.ms) not in asked:  # the first of a group asks for its key's credits
                    asked.add((stored, spec.ms))
                    want = min(CREDITS_MAX, spec.limit // CREDITS_PART)
                    wanted += [(stored, f"{run_name(message_id, run)}:{j}") for j in range(1, want + 1)]
                args += [spec.kind, spec.limit, spec.ms, want]
        sent = time.monotonic()
        try:
            answers = self._run_own(keys, args)
        except BaseException:
            self._releases.extendleft(reversed(releases))
            # Credits it may have taken, its reply lost: given back (a release of one never taken is harmless).
            self._releases.extend(wanted)
            raise
        found: list[Denied | None] = []
        for (message_id, run, limits, _), answer in zip(items, answers, strict=True):
            if not int(answer[0]):
                found.append(Denied(int(answer[1]) - 1, int(answer[2])))
                continue
            found.append(None)
            if len(answer) > 1:
                self._keep_credits(run_name(message_id, run), limits, [int(n) for n in answer[1:]], sent)
        return found

    def _keep_credits(self, member: str, limits: Sequence[LimitSpec], granted: list[int], sent: float) -> None:
        until = sent + CREDIT_S
        with self._credit_lock:
            if self._credit_pid != os.getpid():
                self._credits.clear()
                self._credit_pid = os.getpid()
            for spec, count in zip(limits, granted, strict=True):
                if count:
                    stored = f"{self.limit_prefix}{spec.kind}:{spec.key}"
                    credits = self._credits.setdefault((stored, spec.ms), deque())
                    credits.extend((until, f"{member}:{j}") for j in range(1, count + 1))
        if self._thread is None or self._thread_pid != os.getpid():
            self._start()  # it gives back the credits left unused
        self._wake.set()  # a thread waiting with no credits to sweep: it sweeps these

    def release(self, message_id: str, run: str, keys: Sequence[str]) -> int:
        """Give back the slots the run holds of ``keys`` (only its own): how many it held."""
        if (message_id, run) in self._lent:
            members = [self._member(message_id, run, key) for key in keys]
            self._lent.pop((message_id, run), None)
            stored = [self.limit_prefix + "c:" + key for key in keys]
            return int(self._limits(keys=stored, args=["release_many", *members]))
        stored = [self.limit_prefix + "c:" + key for key in keys]
        return int(self._limits(keys=stored, args=["release", run_name(message_id, run)]))

    def release_later(self, message_id: str, run: str, keys: Sequence[str], *, maybe: bool = False) -> None:
        """Release the run's slots soon, off the message path: a thread of this process
        writes the releases of every task that ended within :data:`RELEASE_INTERVAL_S` in
        one call. A slot is freed that much later than its task ended, never earlier, so
        the bound holds; releases not written when the process dies end with their lease.
        ``maybe``: the slots of an ask that got no answer, which may have taken nothing;
        left out once :data:`MAYBE_RELEASES_MAX` releases wait (a store down for long: its
        asks took nothing, and any that did ends with its lease). A slot the run took on
        credit goes back to the credits instead while the credit is good (see :meth:`_recycle`)."""
        if maybe and len(self._releases) >= MAYBE_RELEASES_MAX:
            return
        lent = self._lent.pop((message_id, run), None)
        if lent is not None:
            keys = self._recycle(lent, keys)
        if not keys:
            return  # every slot went back to the credits (or none held): nothing to write
        member = run_name(message_id, run)
        for key in keys:
            slot = None if lent is None else lent.get(key)
            self._releases.append((self.limit_prefix + "c:" + key, member if slot is None else slot[0]))
        if self._thread is None or self._thread_pid != os.getpid():
            self._start()
        if not self._wake.is_set():
            self._wake.set()

    def refused_later(self, message_id: str, key: str, queue: str) -> None:
        """Count a task put back without asking (its process was refused ``key`` a moment
        before) as waiting for ``key``, as a refusal would: written with the releases, off
        the message path; at most :data:`MAYBE_RELEASES_MAX` wait (beyond, a task is counted
        at its next refusal by the store)."""
        if len(self._refusals) >= MAYBE_RELEASES_MAX:
            return
        self._refusals.append((self.waiting_prefix + key, self.queue_waiting_prefix + queue, message_id))
        if self._thread is None or self._thread_pid != os.getpid():
            self._start()
        if not self._wake.is_set():
            self._wake.set()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is not None and self._thread_pid == os.getpid():
                return
            self._thread_pid = os.getpid()
            self._thread = threading.Thread(target=self._release_loop, name="dramaturg-flow-release", daemon=True)
            self._thread.start()

    def _release_loop(self) -> None:
        while not self._closed:
            # While credits are held, wake to give back those that ran out unused (a key no
            # task of this process asks for again would otherwise hold them until their lease ends).
            if not self._wake.wait(CREDIT_S if self._credits else None):
                self._sweep_credits()
                continue  # flush at the next turn, with any release that comes meanwhile
            self._wake.clear()
            time.sleep(RELEASE_INTERVAL_S)  # gather the releases of the next few ms
            self._sweep_credits()
            self.flush()

    def _sweep_credits(self) -> None:
        """Give back every credit this process may no longer use."""
        now = time.monotonic()
        with self._credit_lock:
            if self._credit_pid != os.getpid():
                return
            for (stored, ms), credits in list(self._credits.items()):
                good = deque(credit for credit in credits if credit[0] > now)
                if len(good) != len(credits):
                    self._releases.extend((stored, member) for until, member in credits if until <= now)
                if good:
                    self._credits[(stored, ms)] = good
                else:  # a key of a template (tenant:{store}) must not stay here for ever
                    del self._credits[(stored, ms)]
        if self._releases:
            self._wake.set()

    def flush(self) -> None:
        """Write the releases buffered so far (a failed write is retried with the next), and
        the refusals (a failed write is dropped: they only count what waits)."""
        refusals: list[tuple[str, str, str]] = []
        with contextlib.suppress(IndexError):
            while self._refusals and len(refusals) < 1000:
                refusals.append(self._refusals.popleft())
        if refusals:
            try:
                keys = [key for waiting, queued, _ in refusals for key in (waiting, queued)]
                self._limits(keys=keys, args=["refused_many", *(message_id for _, _, message_id in refusals)])
            except Exception as error:
                logger.warning("flow control: %d tasks put back were not counted as waiting (%s)", len(refusals), error)
        items: list[tuple[str, str]] = []
        while self._releases and len(items) < 1000:
            items.append(self._releases.popleft())
        if not items:
            return
        try:
            self._limits(keys=[key for key, _ in items], args=["release_many", *(member for _, member in items)])
        except Exception as error:
            logger.warning("flow control: %d slot releases not written yet (%s); retrying", len(items), error)
            self._releases.extendleft(reversed(items))
            time.sleep(0.5)
        if self._releases or self._refusals:
            self._wake.set()

    def give_back_credits(self) -> None:
        """Put every credit this process holds among the releases to write (its worker stopped)."""
        with self._credit_lock:
            if self._credit_pid == os.getpid():
                for (stored, _), credits in self._credits.items():
                    self._releases.extend((stored, member) for _, member in credits)
            self._credits.clear()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.give_back_credits()
        with contextlib.suppress(Exception):
            self.flush()

    def renew(self, message_id: str, run: str, keys: Sequence[str], ms: int) -> int:
        if (message_id, run) in self._lent:  # a slot taken on credit is named by the credit
            return sum(
                int(
                    self._limits(
                        keys=[self.limit_prefix + "c:" + key], args=["renew", self._member(message_id, run, key), ms]
                    )
                )
                for key in keys
            )
        stored = [self.limit_prefix + "c:" + key for key in keys]
        return int(self._limits(keys=stored, args=["renew", run_name(message_id, run), ms]))

    def usage(self) -> list[Usage]:
        now_s, now_us = self.client.time()
        now = int(now_s) * 1000 + int(now_us) // 1000
        found: dict[str, Usage] = {}
        for key in self.client.scan_iter(match=_glob(self.limit_prefix) + "*", count=500):
            kind, _, name = _text(key)[len(self.limit_prefix) :].partition(":")
            before = found.get(name) or Usage(name, 0)
            if kind == "c":
                found[name] = replace(before, in_use=int(self.client.zcount(key, f"({now}", "+inf")))
            else:
                found[name] = replace(before, started=int(self.client.zcard(key)))
        for key in self.client.scan_iter(match=_glob(self.waiting_prefix) + "*", count=500):
            name = _text(key)[len(self.waiting_prefix) :]
            waiting = int(self.client.zcount(key, now - WAITING_MS, "+inf"))
            found[name] = replace(found.get(name) or Usage(name, 0), waiting=waiting)
        return sorted(found.values(), key=lambda usage: usage.key)

    def waiting_in(self, queues: Sequence[str]) -> dict[str, int]:
        """How many tasks of each of ``queues`` were put back to wait for a limit in the
        last minute and have not started since (one call, whatever the number of queues)."""
        if not queues:
            return {}
        now_s, now_us = self.client.time()
        since = int(now_s) * 1000 + int(now_us) // 1000 - WAITING_MS
        with self.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.zcount(self.queue_waiting_prefix + queue, since, "+inf")
            counts = pipe.execute()
        return {queue: int(count) for queue, count in zip(queues, counts, strict=True)}

    # -- unique tasks ----------------------------------------------------------------------

    def claim(self, key: str, message_id: str, ttl_ms: int) -> str | None:
        holder = _text(self._unique(keys=[self.unique_prefix + key], args=["claim", message_id, ttl_ms]))
        return holder or None

    def unclaim(self, key: str, message_id: str) -> bool:
        return bool(int(self._unique(keys=[self.unique_prefix + key], args=["release", message_id])))


def _glob(text: str) -> str:
    """``text`` with Redis's glob characters escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class MemoryFlowState:
    """Flow control in this process (eager mode and the stub broker), with the same meaning
    as in Redis; ``changed`` wakes a waiting lock as soon as one is released."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self._locks: dict[str, tuple[str, int, str, float]] = {}
        self._fences: dict[str, int] = {}
        self._limits: dict[str, dict[str, float]] = {}
        self._unique: dict[str, tuple[str, float]] = {}
        self._waiting: dict[str, dict[str, float]] = {}
        self._queue_waiting: dict[str, dict[str, float]] = {}

    @staticmethod
    def _now() -> float:
        return time.monotonic() * 1000

    def lock_acquire(self, name: str, owner: str, ttl_ms: int, holder: str) -> tuple[int | None, int]:
        now = self._now()
        with self.changed:
            held = self._locks.get(name)
            if held is not None and held[3] > now:
                if held[0] == owner:  # as lock.lua: this holding asking again
                    self._locks[name] = (*held[:3], now + ttl_ms)
                    return held[1], 0
                return None, int(held[3] - now)
            # As lock.lua: a process started again (its memory gone) goes on above the last.
            fence = self._fences[name] = max(self._fences.get(name, 0) + 1, time.time_ns() // 1000)
            self._locks[name] = (owner, fence, holder, now + ttl_ms)
            return fence, 0

    def lock_release(self, name: str, owner: str) -> bool:
        with self.changed:
            held = self._locks.get(name)
            if held is None or held[0] != owner or held[3] <= self._now():
                return False
            del self._locks[name]
            self.changed.notify_all()
            return True

    def lock_renew(self, name: str, owner: str, ttl_ms: int) -> bool:
        now = self._now()
        with self.changed:
            held = self._locks.get(name)
            if held is None or held[0] != owner or held[3] <= now:
                return False
            self._locks[name] = (*held[:3], now + ttl_ms)
            return True

    def lock_holder(self, name: str) -> HeldLock | None:
        now = self._now()
        with self.changed:
            held = self._locks.get(name)
            if held is None or held[3] <= now:
                return None
            return HeldLock(name, held[1], held[2], int(held[3] - now))

    def locks(self) -> list[HeldLock]:
        found = [self.lock_holder(name) for name in sorted(self._locks)]
        return [held for held in found if held is not None]

    def acquire(
        self, message_id: str, run: str, limits: Sequence[LimitSpec], queue: str = "", *, waited: bool = False
    ) -> Denied | None:
        now = self._now()
        member = run_name(message_id, run)
        with self.changed:
            denied = self._take(message_id, member, limits, now)
            waiting = self._queue_waiting.setdefault(queue, {})
            if denied is None:
                waiting.pop(message_id, None)
            else:
                waiting[message_id] = now
            return denied

    def _take(self, message_id: str, member: str, limits: Sequence[LimitSpec], now: float) -> Denied | None:
        for index, spec in enumerate(limits):
            entries = self._limits.setdefault(f"{spec.kind}:{spec.key}", {})
            if spec.kind == "c":
                for name in [n for n, end in entries.items() if end <= now]:
                    del entries[name]
                if member not in entries and len(entries) >= spec.limit:
                    self._waiting.setdefault(spec.key, {})[message_id] = now
                    return Denied(index, int(max(0, min(entries.values()) - now)))
            else:
                for name in [n for n, at in entries.items() if at <= now - spec.ms]:
                    del entries[name]
                if member not in entries and len(entries) >= spec.limit:
                    self._waiting.setdefault(spec.key, {})[message_id] = now
                    return Denied(index, int(max(1, min(entries.values()) + spec.ms - now)))
        for spec in limits:
            entries = self._limits[f"{spec.kind}:{spec.key}"]
            self._waiting.get(spec.key, {}).pop(message_id, None)
            if spec.kind == "c":
                entries[member] = now + spec.ms
            else:
                entries.setdefault(member, now)
        return None

    def release(self, message_id: str, run: str, keys: Sequence[str]) -> int:
        member = run_name(message_id, run)
        with self.changed:
            held = sum(1 for key in keys if self._limits.get("c:" + key, {}).pop(member, None) is not None)
            self.changed.notify_all()
            return held

    def release_later(self, message_id: str, run: str, keys: Sequence[str], *, maybe: bool = False) -> None:
        self.release(message_id, run, keys)

    def refused_later(self, message_id: str, key: str, queue: str) -> None:
        now = self._now()
        with self.changed:
            self._waiting.setdefault(key, {})[message_id] = now
            self._queue_waiting.setdefault(queue, {})[message_id] = now

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def renew(self, message_id: str, run: str, keys: Sequence[str], ms: int) -> int:
        now = self._now()
        member = run_name(message_id, run)
        with self.changed:
            held = 0
            for key in keys:
                entries = self._limits.get("c:" + key, {})
                if member in entries:
                    entries[member] = now + ms
                    held += 1
            return held

    def usage(self) -> list[Usage]:
        now = self._now()
        with self.changed:
            in_use: dict[str, int] = {}
            started: dict[str, int] = {}
            for stored, entries in self._limits.items():
                kind, _, name = stored.partition(":")
                if kind == "c":
                    in_use[name] = sum(1 for end in entries.values() if end > now)
                else:
                    started[name] = len(entries)
            waiting = {
                name: sum(1 for at in entries.values() if at > now - WAITING_MS)
                for name, entries in self._waiting.items()
            }
            names = sorted(
                {n for n, c in in_use.items() if c}
                | {n for n, c in started.items() if c}
                | {n for n, w in waiting.items() if w}
            )
            return [Usage(name, in_use.get(name, 0), waiting.get(name, 0), started.get(name, 0)) for name in names]

    def waiting_in(self, queues: Sequence[str]) -> dict[str, int]:
        since = self._now() - WAITING_MS
        with self.changed:
            return {
                queue: sum(1 for at in self._queue_waiting.get(queue, {}).values() if at > since) for queue in queues
            }

    def claim(self, key: str, message_id: str, ttl_ms: int) -> str | None:
        now = self._now()
        with self.changed:
            held = self._unique.get(key)
            if held is not None and held[1] > now:
                return held[0]
            self._unique[key] = (message_id, now + ttl_ms)
            return None

    def unclaim(self, key: str, message_id: str) -> bool:
        with self.changed:
            held = self._unique.get(key)
            if held is None or held[0] != message_id:
                return False
            del self._unique[key]
            return True
