"""One scenario run: its worker processes, the tasks it sent, the faults it caused, and the
count at the end.

The count is the promise: every task whose ``send()`` returned is, at the end, either
**succeeded** (its last attempt wrote ``end`` in the worker logs of
``tests/apps/chaos_tasks.py``), **held** (in the held store) or **still queued** (ready
or delayed on the broker: Redis's queue lists, RabbitMQ's queues); anything else is
**lost**. A message a Redis worker claimed and never gave back is not queued: no worker
will take it, so it counts as lost (``stranded`` in the notes).

A **duplicate** is a task that started twice for the same attempt, or that succeeded and
is still queued or held. A duplicate is explained only when a run of the task was going
on in a process a fault hit, when the fault began or before its processes could notice
it (:meth:`Fault.touches`; for a fault they cannot notice, while it lasted), or ended
while the fault lasted (its outcome and acknowledgement could not reach the broker), or,
for a fault on every process, was waiting as a retry or delayed message when the fault began (a consumer
holds it, unacknowledged, and moves it to its queue when due: a move whose publish or
acknowledgement the fault cut is made again), and a worker logged that the task runs
again ("delivered again", "runs again", "those it had started run again"); every other
duplicate is a failure of the run.

The **time to recover** of a fault is from its end until the tasks it interrupted (those
whose run it touched) have ended again, or, when it interrupted none, until the first
task ended after it; a run's is the longest of its faults'.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import dramatiq

import dramaturg
from dramaturg import app, brokers
from dramaturg.config import resolve_broker
from dramaturg.queues import lanes

from ..conftest import Process, bin_path, poll_until
from ..faults.proxy import FaultProxy

REPO = Path(__file__).resolve().parents[2]
READY = "Worker process is ready for action."
QUEUE = "chaos"
#: A run that ended this long before a fault may not have been acknowledged yet: the
#: ``end`` line is written in the handler, the acknowledgement follows it.
ACK_SLACK_S = 0.5
#: A fault the processes notice (a reset connection) is seen at the consumer's next read:
#: a task a worker thread took from what the consumer had prefetched this long after the
#: fault began may still have started on the lost channel (and runs again, logged).
NOTICE_SLACK_S = 0.1
#: Phrases of the worker log lines that say a task runs again.
RERUN_PHRASES = ("delivered again", "runs again", "run again")
#: The start of a worker log line: ``[2026-11-30 16:17:18,289] [PID 23108] ...``.
_LOG_LINE = re.compile(r"^\[(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\] \[PID (?P<pid>\d+)\]")

#: Every row reported in this session (see conftest's terminal summary).
ROWS: list[Row] = []


@dataclass(frozen=True)
class Event:
    """A line of a worker log: ``<event> <message id> <attempt> <pid> <ppid> <time>``."""

    event: str
    message_id: str
    attempt: int
    pid: int
    ppid: int
    at: float


@dataclass
class TaskRun:
    """One run of one attempt of a task, from its ``start`` to its ``end`` or ``fail`` (if any)."""

    message_id: str
    attempt: int
    pid: int
    ppid: int
    start: float
    end: float | None = None
    failed: bool = False


@dataclass(frozen=True)
class Fault:
    """A fault between ``start`` and ``end`` (``time.time()``), on the processes of
    ``scope`` (worker pids or worker-group pids), or on every process when it is None."""

    name: str
    start: float
    end: float
    scope: frozenset[int] | None = None
    #: The processes cannot notice the fault while it lasts (a host cut off: packets
    #: dropped), so what they start meanwhile is hit too. Otherwise they see it at once
    #: (a reset connection, a signal), and only what was going on when it began is hit.
    silent: bool = False

    def touches(self, run: TaskRun) -> bool:
        """True if ``run`` was going on in a process this fault hit (not yet acknowledged),
        or ended while the fault lasted (its outcome and acknowledgement fell in it)."""
        if self.scope is not None and run.pid not in self.scope and run.ppid not in self.scope:
            return False
        finished = run.end if run.end is not None else float("inf")
        if self.start <= finished <= self.end:
            return True
        began = self.end if self.silent else self.start + NOTICE_SLACK_S
        return run.start <= began and finished >= self.start - ACK_SLACK_S

    def caught_waiting(self, runs: list[TaskRun], delayed_at: float | None = None) -> bool:
        """True if this fault, on every process, began while the task waited between two
        attempts (a retry, due later), or before its first (sent at ``delayed_at`` with a
        delay): held by a consumer that moves it to its queue when it is due, a move the
        fault may cut after its publish and before its acknowledgement."""
        if self.scope is not None:
            return False
        ordered = sorted(runs, key=lambda run: run.start)
        if delayed_at is not None and delayed_at <= self.start and ordered and ordered[0].start >= self.start:
            return True
        return any(
            earlier.end is not None and earlier.end <= self.start and later.start >= self.start
            for earlier, later in itertools.pairwise(ordered)
            if later.attempt == earlier.attempt + 1
        )


@dataclass
class Row:
    """One line of the reliability table (``docs/RELIABILITY.md``)."""

    fault: str
    broker: str
    runs: int = 1
    sent: int = 0
    succeeded: int = 0
    held: int = 0
    queued: int = 0
    lost: int = 0
    duplicates: int = 0
    #: Duplicates of tasks that were not running at a fault, or that no line explained.
    unexplained: int = 0
    #: Seconds from the end of a fault until work caught up (None: not applicable; inf: never).
    recover_s: float | None = None
    #: Tasks not done (ended or held) while workers were running, long after the last fault.
    stuck: int = 0
    #: Anything else the scenario found wrong (a poison message held for the wrong reason).
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.recover_s == float("inf"):
            data["recover_s"] = "never"
        return data

    def failures(self) -> list[str]:
        problems = []
        if self.lost:
            problems.append(f"{self.lost} of {self.sent} tasks lost")
        if self.stuck:
            problems.append(f"{self.stuck} tasks stuck: not done long after the last fault, with workers running")
        if self.unexplained:
            problems.append(
                f"{self.unexplained} of {self.duplicates} duplicates were not running at a fault or not logged"
            )
        return problems + self.problems


def read_events(directory: Path) -> list[Event]:
    found = []
    for path in sorted(directory.glob("*.log")):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 6:  # a line cut short by kill -9 is not one
                event, message_id, attempt, pid, ppid, at = parts
                found.append(Event(event, message_id, int(attempt), int(pid), int(ppid), float(at)))
    return sorted(found, key=lambda e: e.at)


def task_runs(events: Iterable[Event]) -> dict[str, list[TaskRun]]:
    """Runs per message id, in start order; an end or fail closes that process's open run."""
    runs: dict[str, list[TaskRun]] = defaultdict(list)
    open_runs: dict[tuple[str, int, int], TaskRun] = {}
    for event in events:
        key = (event.message_id, event.attempt, event.pid)
        if event.event == "start":
            run = TaskRun(event.message_id, event.attempt, event.pid, event.ppid, event.at)
            runs[event.message_id].append(run)
            open_runs[key] = run
        elif key in open_runs:
            run = open_runs.pop(key)
            run.end, run.failed = event.at, event.event == "fail"
    return runs


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Chaos:
    """A scenario run on one broker (see the module docstring for what it counts)."""

    def __init__(
        self,
        fault: str,
        broker_kind: str,
        settings: dramaturg.Settings,
        tmp_path: Path,
        spawn: Callable[..., Process],
    ) -> None:
        from tests.apps import chaos_tasks

        self.fault_name = fault
        self.broker_kind = broker_kind
        self.settings = settings
        self.tmp_path = tmp_path
        self.spawn = spawn
        self.tasks = chaos_tasks
        self.log_dir = tmp_path / "runs"
        self.log_dir.mkdir()
        self.sent: list[str] = []
        #: When each task sent with a delay was sent (the last send's end: a bound).
        self.delayed: dict[str, float] = {}
        self.faults: list[Fault] = []
        self.workers: list[Process] = []
        self.notes: list[str] = []
        self.stuck = 0
        self.finished = False
        self._proxies: list[FaultProxy] = []
        self._senders: list[Sender] = []
        self._write_config()
        app.register(chaos_tasks.work)  # declared at the first import; isolated_app forgets them after each test
        app.register(chaos_tasks.flaky)
        self.inspector = self._build(settings)
        if broker_kind == "rabbitmq":
            self.delete_queues()
        self.sender: dramatiq.Broker = dramaturg.bootstrap(settings)

    # -- set-up ---------------------------------------------------------------------

    def _write_config(self) -> None:
        broker = self.settings.broker
        lines = [
            "[broker]",
            f'url = "{broker.url}"',
            f'namespace = "{broker.namespace}"',
            f"heartbeat_timeout = {broker.heartbeat_timeout}",
            *([f"heartbeat = {broker.heartbeat}"] if broker.heartbeat is not None else []),
            "",
            "[worker]",
            'modules = ["tests.apps.chaos_tasks"]',
            'shutdown_timeout = "500ms"',
        ]
        (self.tmp_path / "dramaturg.toml").write_text("\n".join(lines) + "\n")

    @staticmethod
    def _build(settings: dramaturg.Settings) -> Any:
        """A broker of its own (no middleware, not the global one) to count with."""
        resolved = resolve_broker(settings)
        return brokers.create_broker(resolved.broker, [])

    def with_url(self, url: str) -> dramaturg.Settings:
        """These settings with another broker URL (a proxy in front of the broker)."""
        return dramaturg.Settings(
            broker={**self.settings.broker.model_dump(exclude_none=True), "url": url},
            worker=self.settings.worker.model_dump(),
        )

    def bootstrap_sender(self, url: str) -> None:
        """Send through ``url`` (a proxy) from now on."""
        self.sender = dramaturg.bootstrap(self.with_url(url))

    def proxy(self) -> tuple[FaultProxy, str]:
        """A fault-injecting proxy in front of the broker (closed with the run), and its URL."""
        parts = urlsplit(self.settings.broker.url or "")
        assert parts.hostname and parts.port, "a proxy needs a TCP broker"
        proxy = FaultProxy()
        port = proxy.start((parts.hostname, parts.port))
        self._proxies.append(proxy)
        netloc = parts.netloc.rsplit("@", 1)
        netloc[-1] = f"127.0.0.1:{port}"
        return proxy, urlunsplit(parts._replace(netloc="@".join(netloc)))

    def delete_queues(self) -> None:
        """RabbitMQ queues have no namespace: each run starts and ends with none of its own."""
        import pika

        connection = pika.BlockingConnection(self.inspector.parameters)
        try:
            channel = connection.channel()
            for suffix in ("", ".DQ", ".XQ", ".HQ"):
                channel.queue_delete(QUEUE + suffix)
        finally:
            connection.close()

    # -- workers ----------------------------------------------------------------------

    def start_worker(
        self,
        *,
        processes: int = 1,
        threads: int = 4,
        url: str | None = None,
        prefix: Sequence[str] = (),
        wait: bool = True,
        **env: str,
    ) -> Process:
        """``dramaturg worker`` as a user runs it, in a process group of its own (Dramatiq
        stops a whole group when one of its processes dies), optionally through a proxy
        (``url``) or on another host (``prefix``: ``ip netns exec NS``)."""
        if url is not None:
            env["DRAMATURG_BROKER_URL"] = url
        argv = [*prefix, bin_path("dramaturg"), "worker", "-p", str(processes), "-t", str(threads)]
        worker = self.spawn(argv, PYTHONPATH=str(REPO), CHAOS_LOG_DIR=str(self.log_dir), **env)
        self.workers.append(worker)
        if wait:
            for _ in range(processes):
                worker.wait_for_line(READY, timeout=60)
        return worker

    def start_workers(self, count: int, **options: Any) -> list[Process]:
        """``count`` worker groups of one process each, started side by side."""
        started = [self.start_worker(wait=False, **options) for _ in range(count)]
        for worker in started:
            worker.wait_for_line(READY, timeout=60)
        return started

    def worker_pids(self, worker: Process) -> list[int]:
        """The processes of a worker group (``ip netns exec`` may stand between)."""
        return descendants(worker.popen.pid)

    def running_pids(self) -> list[int]:
        """Live worker processes that are running a task now (by the logs)."""
        runs = task_runs(read_events(self.log_dir))
        busy = {run.pid for each in runs.values() for run in each if run.end is None}
        return sorted(pid for pid in busy if alive(pid))

    def live_workers(self) -> list[Process]:
        return [worker for worker in self.workers if worker.popen.poll() is None]

    def stop_workers(self, timeout: float = 60.0) -> None:
        for worker in self.live_workers():
            with contextlib.suppress(OSError):
                worker.popen.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.stop(timeout=timeout)
            except Exception:  # hung: kill it, and say so
                self.notes.append(f"worker {worker.popen.pid} did not stop within {timeout} s; killed")
                worker.kill()

    # -- tasks ------------------------------------------------------------------------

    def send(self, count: int, seconds: float | Callable[[int], float], *, delay: int | None = None) -> list[str]:
        """Send ``count`` ``work`` tasks; returns their ids (each send returned)."""
        ids = []
        for n in range(count):
            length = seconds(n) if callable(seconds) else seconds
            message = self.tasks.work.send_with_options(args=(n, length), delay=delay)
            ids.append(message.message_id)
        self.sent += ids
        if delay:
            self.delayed.update(dict.fromkeys(ids, time.time()))
        return ids

    def send_flaky(self, count: int, seconds: float) -> list[str]:
        """Send ``count`` ``flaky`` tasks, whose first attempts fail and wait to be retried."""
        ids = [self.tasks.flaky.send(n, seconds).message_id for n in range(count)]
        self.sent += ids
        return ids

    def events(self) -> list[Event]:
        return read_events(self.log_dir)

    def ended(self) -> set[str]:
        return {e.message_id for e in self.events() if e.event == "end"}

    def wait_for_ends(self, count: int, timeout: float = 60.0) -> None:
        poll_until(lambda: len(self.ended()) >= count, f"{count} tasks ended", timeout)

    def fault(
        self, start: float, end: float | None = None, scope: Iterable[int] | None = None, *, silent: bool = False
    ) -> Fault:
        """Record a fault (``time.time()`` values; ``scope``: the pids it hit, else all)."""
        fault = Fault(
            self.fault_name, start, end if end is not None else start, frozenset(scope) if scope else None, silent
        )
        self.faults.append(fault)
        return fault

    def settle(self, timeout: float) -> bool:
        """Wait until every task sent has ended or is held, for at most ``timeout`` s."""
        wanted = set(self.sent)
        deadline = time.monotonic() + timeout
        next_held = 0.0
        held: set[str] = set()
        while True:
            missing = wanted - self.ended()
            if missing and time.monotonic() >= next_held:
                held = self.held_ids()
                next_held = time.monotonic() + 1.0
            if not missing - held:
                # What a fault put back on the queue after its first run ended runs again
                # now (a duplicate, counted as such): let it, for a little while.
                drained = time.monotonic() + min(10.0, timeout)
                while self.queued_count() and time.monotonic() < drained:
                    time.sleep(0.1)
                return True
            if time.monotonic() >= deadline:
                self.stuck = len(missing - held)
                self.notes.append(f"{self.stuck} tasks not done {timeout:.0f} s after the last fault")
                self.dump_stacks()
                return False
            time.sleep(0.1)  # worker processes write the logs: nothing to wait on

    # -- the count --------------------------------------------------------------------

    def held_ids(self) -> set[str]:
        store = self.inspector.held
        return {task.message_id for task in store.list(QUEUE, limit=1_000_000)}

    def queued_ids(self) -> Counter[str]:
        """Message ids ready or delayed on the broker (with repeats, if a task is there twice)."""
        found: Counter[str] = Counter()
        if self.broker_kind == "rabbitmq":
            import pika

            connection = pika.BlockingConnection(self.inspector.parameters)
            try:
                for name in (QUEUE, f"{QUEUE}.DQ"):
                    channel = connection.channel()
                    try:
                        while True:
                            method, _, body = channel.basic_get(name, auto_ack=False)
                            if method is None:
                                break
                            found[_message_id(body)] += 1
                    except pika.exceptions.ChannelClosedByBroker:
                        pass  # never declared
                    finally:
                        if channel.is_open:
                            channel.close()  # every message read goes back
            finally:
                connection.close()
            return found
        client, namespace = self.inspector.client, self.inspector.namespace
        for lane in lanes(QUEUE):
            for name in (lane, f"{lane}.DQ"):
                ids = client.lrange(f"{namespace}:{name}", 0, -1)
                if ids:
                    for body in client.hmget(f"{namespace}:{name}.msgs", ids):
                        found[_message_id(body)] += 1
        return found

    def queued_count(self) -> int:
        """Messages ready or delayed on the broker now."""
        if self.broker_kind == "rabbitmq":
            return int(self.inspector.pending(QUEUE))
        client, namespace = self.inspector.client, self.inspector.namespace
        with client.pipeline(transaction=False) as pipe:
            for lane in lanes(QUEUE):
                pipe.llen(f"{namespace}:{lane}")
                pipe.llen(f"{namespace}:{lane}.DQ")
            return sum(int(n) for n in pipe.execute())

    def stranded(self) -> int:
        """Redis: bodies of messages not in any queue list (claimed by a worker, never given back)."""
        if self.broker_kind == "rabbitmq":
            return 0
        client, namespace = self.inspector.client, self.inspector.namespace
        total = 0
        for lane in lanes(QUEUE):
            for name in (lane, f"{lane}.DQ"):
                total += int(client.hlen(f"{namespace}:{name}.msgs")) - int(client.llen(f"{namespace}:{name}"))
        return total

    def dead(self) -> int:
        if self.broker_kind == "rabbitmq":
            return 0 if not hasattr(self.inspector, "parameters") else self._rabbitmq_count(f"{QUEUE}.XQ")
        client, namespace = self.inspector.client, self.inspector.namespace
        return sum(int(client.zcard(f"{namespace}:{lane}.XQ")) for lane in lanes(QUEUE))

    def _rabbitmq_count(self, name: str) -> int:
        import pika

        connection = pika.BlockingConnection(self.inspector.parameters)
        try:
            return int(connection.channel().queue_declare(name, passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker:
            return 0
        finally:
            if connection.is_open:
                connection.close()

    def worker_output(self) -> list[str]:
        lines: list[str] = []
        for worker in self.workers:
            lines += worker.output.splitlines()
        return lines

    def noticed(self, phrase: str, since: float) -> dict[int, float]:
        """When each worker process first logged a line holding ``phrase`` at or after
        ``since`` (``time.time()``), by pid: the moment it saw a fault whose start the test
        cannot see (RabbitMQ closes connections some time into ``rabbitmqctl stop``)."""
        seen: dict[int, float] = {}
        for line in self.worker_output():
            match = _LOG_LINE.match(line)
            if match is None or phrase not in line:
                continue
            # Local time as logged, to the millisecond below: the moment is before its end.
            at = datetime.strptime(match["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp() + 0.001
            pid = int(match["pid"])
            if at >= since and at < seen.get(pid, float("inf")):
                seen[pid] = at
        return seen

    def count(self) -> Row:
        """Stop the workers, then count (see the module docstring)."""
        self.stop_workers()
        runs = task_runs(self.events())
        sent = set(self.sent)
        succeeded = {i for i, each in runs.items() if any(r.end is not None and not r.failed for r in each)} & sent
        held = self.held_ids()
        queued = self.queued_ids()
        accounted = succeeded | held | set(queued)
        lost = [i for i in self.sent if i not in accounted]
        # Disjoint, in this order: a task that is in two places is a duplicate (below).
        row = Row(
            fault=self.fault_name,
            broker=self.broker_kind,
            sent=len(self.sent),
            succeeded=len(succeeded),
            held=len((held & sent) - succeeded),
            queued=len((set(queued) & sent) - succeeded - held),
            lost=len(lost),
            stuck=self.stuck,
        )
        # Duplicates: started twice for one attempt; succeeded and also queued or held; queued twice.
        duplicated: dict[str, str] = {}
        for message_id, each in runs.items():
            per_attempt = Counter(run.attempt for run in each)
            if any(n > 1 for n in per_attempt.values()):
                duplicated[message_id] = "ran twice"
        for message_id in succeeded & (set(queued) | held):
            duplicated.setdefault(message_id, "succeeded, and is still " + ("held" if message_id in held else "queued"))
        for message_id, n in queued.items():
            if n > 1:
                duplicated.setdefault(message_id, f"queued {n} times")
        row.duplicates = len(duplicated)
        output = self.worker_output()
        unlisted = any(re.search(r"and \d+ more$", line) and "run again" in line for line in output)
        unexplained = []
        for message_id, how in sorted(duplicated.items()):
            each = runs.get(message_id, [])
            # By task: one whose outcome was in flight at a fault may run again, its
            # later attempts (a retry published twice) included.
            touched = any(f.touches(run) for f in self.faults for run in each) or any(
                f.caught_waiting(each, self.delayed.get(message_id)) for f in self.faults
            )
            at_fault = touched and (how == "ran twice" or how.startswith("succeeded, and is still queued"))
            # One still queued has not run again yet, so no line can say so yet.
            logged = (
                how != "ran twice"
                or unlisted
                or any(message_id in line and any(p in line for p in RERUN_PHRASES) for line in output)
            )
            if at_fault and logged:
                continue
            runs_text = ", ".join(
                f"attempt {r.attempt} pid {r.pid} {r.start:.3f}-{'...' if r.end is None else f'{r.end:.3f}'}"
                for r in each
            )
            unexplained.append(
                f"{message_id}: {how}"
                f"{'' if at_fault else ' (not running at a fault)'}{'' if logged else ' (no line says it runs again)'}"
                f" [{runs_text}]"
            )
        row.unexplained = len(unexplained)
        stranded = self.stranded()
        if stranded:
            row.notes.append(f"{stranded} stranded in a worker's claims")
        dead = self.dead()
        if dead:
            row.notes.append(f"{dead} in the dead-letter queue")
        if lost:
            row.notes.append("lost: " + ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else ""))
        row.notes += unexplained[:10]
        if len(unexplained) > 10:
            row.notes.append(f"and {len(unexplained) - 10} more duplicates not explained")
        row.notes += self.notes
        row.recover_s = self.recovery_s(runs)
        return row

    def recovery_s(self, runs: dict[str, list[TaskRun]]) -> float | None:
        """From the end of each fault until a task succeeded after it and every task it
        interrupted had succeeded; the longest over the faults (inf: never)."""
        if not self.faults:
            return None
        all_runs = [run for each in runs.values() for run in each]
        ends = sorted(run.end for run in all_runs if run.end is not None and not run.failed)
        worst = 0.0
        for fault in self.faults:
            after = [at for at in ends if at > fault.end]
            caught_up = after[0] if after else fault.end  # nothing left to run after it: nothing to catch up
            for hit in all_runs:
                if hit.start <= fault.end and hit.end is None and fault.touches(hit):  # interrupted
                    done = [r.end for r in runs[hit.message_id] if r.end is not None and not r.failed]
                    caught_up = max(caught_up, min(done) if done else float("inf"))
            worst = max(worst, caught_up - fault.end)
        return worst

    def dump_stacks(self) -> None:
        """Print the threads of every live worker process, if py-spy is installed (a stuck run)."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(py_spy).is_file():
            return
        for worker in self.live_workers():
            for pid in self.worker_pids(worker):
                dump = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
                print(f"--- threads of worker process {pid}:\n{dump.stdout}{dump.stderr}")

    def dump_output(self) -> None:
        """Print every worker's output (pytest shows it for a failed test)."""
        for worker in self.workers:
            print(f"--- worker {worker.popen.pid} ({worker.popen.returncode}):\n{worker.output}")

    def finish(self, row: Row) -> None:
        """Report the row, then fail the test with what went wrong, if anything."""
        self.finished = True
        ROWS.append(row)
        if row.failures():
            self.dump_output()
        print(json.dumps(row.as_dict(), indent=1))
        problems = row.failures()
        assert not problems, f"{row.fault} on {row.broker}: " + "; ".join(problems) + "\n" + "\n".join(row.notes)

    def keep_sending(self, every_s: float = 0.02) -> Sender:
        """A thread that sends a 10 ms task every ``every_s`` until stopped; a send that
        raised is not counted (nothing was promised), one that returned is."""
        sender = Sender(self, every_s)
        self._senders.append(sender)
        sender.start()
        return sender

    def close(self) -> None:
        """Stop what the run started; a run that failed before its count is counted now,
        so that it still has its row (marked as cut short)."""
        for sender in self._senders:
            with contextlib.suppress(AssertionError):
                sender.stop()
        if not self.finished:
            with contextlib.suppress(Exception):
                row = self.count()
                row.problems.append("the scenario did not reach its end (see the test's failure)")
                ROWS.append(row)
        for worker in self.workers:
            worker.kill()
        for proxy in self._proxies:
            proxy.stop()
        if self.broker_kind == "rabbitmq":
            with contextlib.suppress(Exception):
                self.delete_queues()
        with contextlib.suppress(Exception):
            self.inspector.close()


class Sender(threading.Thread):
    """Sends tasks through the scenario's sending broker while faults happen."""

    def __init__(self, scenario: Chaos, every_s: float) -> None:
        super().__init__(name="chaos-sender", daemon=True)
        self.scenario = scenario
        self.every_s = every_s
        self.stopped = threading.Event()
        self.failures = 0
        self.first_error: str | None = None

    def run(self) -> None:
        n = 0
        while not self.stopped.is_set():
            n += 1
            try:
                message = self.scenario.tasks.work.send(100_000 + n, 0.01)
            except Exception as error:  # the broker is down: this send promised nothing
                self.failures += 1
                self.first_error = self.first_error or f"{type(error).__name__}: {error}"
            else:
                self.scenario.sent.append(message.message_id)
            self.stopped.wait(self.every_s)

    def stop(self) -> None:
        self.stopped.set()
        self.join(120)
        assert not self.is_alive(), "a send did not return within 120 s"


def _message_id(body: bytes | None) -> str:
    if body is None:
        return "?"
    try:
        return str(json.loads(body)["message_id"])
    except (ValueError, KeyError, TypeError):
        return "?"


def kill_nine(pid: int) -> float:
    """``kill -9`` ``pid``; returns when (``time.time()``)."""
    at = time.time()
    os.kill(pid, signal.SIGKILL)
    return at
