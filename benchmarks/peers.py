"""dramaturg against its peers: bare Dramatiq, Celery, RQ and Huey, same machine, same run.

Three scenarios, each system doing the same work (``peer_apps/work.py``):

- ``noop``: N no-op tasks (default 10,000): enqueue rate, drain rate, worker CPU per task;
- ``sleep``: tasks that sleep 10 ms (default 2,000): drain rate, and efficiency, the rate
  over what the worker's slots (processes x threads) could do at best (slots / 10 ms);
- ``import``: the user import (default 20,000 rows): validate the e-mail address and
  upsert the row into SQLite (WAL) through a per-thread connection.

For each broker, scenario and system, in interleaved rounds: clear the broker (its own
Redis database, its own RabbitMQ queues), enqueue from a fresh process one by one with
the system's ordinary API (dramaturg's ``send_many`` is an extra row), then start the
workers as subprocesses and time the drain from the first processed task to the last
(each task appends a byte to a count file: the same cost on every system), with the CPU
time the worker processes (and RQ's work horses) spent meanwhile; stop them with SIGTERM.
A drain that takes longer than ``--max-drain-seconds`` is cut there and its rate taken
over the tasks done by then (marked ``*``).

Workers, 2 processes x 8 threads where the system has threads:

- dramaturg and Dramatiq: ``dramatiq bench_app -p 2 -t 8`` (dramaturg: every middleware
  of ``dramaturg.bootstrap`` and its defaults, as ``dramaturg worker`` runs them; on
  Redis also without its task states, to show what they cost); Dramatiq with its
  defaults, and with the prefetch dramaturg uses on that broker;
- Celery: ``celery worker -P prefork -c 2`` (what the issue names) and ``-P threads -c 16``;
- Huey: two ``huey_consumer -k thread -w 8``;
- RQ: two ``rq worker`` (a fork per job) and two with ``SimpleWorker`` (no fork).

Medians over the rounds go into one Markdown table per scenario with ratios to
dramaturg on the same broker; ``--write benchmarks/RESULTS.md`` puts them, with the
machine and versions, in that file's "Peers" section (replaced, other sections kept).

    make bench-peers                                              # everything, 3 rounds
    python benchmarks/peers.py --count 2000 --sleep-count 500 --import-count 2000 --rounds 1
    python benchmarks/peers.py --brokers redis --systems dramaturg huey --scenarios noop
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from peer_apps import work  # noqa: E402
from throughput import children, cpu_seconds, machine, publish, server_versions  # noqa: E402

from dramaturg.middleware.worker_config import DEFAULT_PREFETCH  # noqa: E402

BIN = Path(sys.executable).parent
QUEUE = "peers-bench"
SCENARIOS = ("noop", "sleep", "import")
SECTION = "## Peers ("  # the generated section's heading: "## Peers (2026-11-24)"


@dataclass(frozen=True)
class System:
    """One system as benchmarked: how it enqueues and how its workers start."""

    name: str  # what --systems selects
    label: str
    brokers: tuple[str, ...]
    enqueue: list[str]  # enqueue.py's arguments after the scenario's
    slots: int  # tasks the workers run at once
    workers: Callable[[str, argparse.Namespace], list[list[str]]]  # (url, args) -> one command per process
    env: Callable[[str], dict[str, str]] = field(default=lambda broker: {})


def dramatiq_workers(url: str, args: argparse.Namespace) -> list[list[str]]:
    command = [str(BIN / "dramatiq"), "bench_app", "--path", str(HERE)]
    return [[*command, "--processes", str(args.processes), "--threads", str(args.threads)]]


def celery_workers(pool: str, concurrency: int) -> Callable[[str, argparse.Namespace], list[list[str]]]:
    def commands(url: str, args: argparse.Namespace) -> list[list[str]]:
        return [
            [
                str(BIN / "celery"),
                "-A",
                "peer_apps.celery_app",
                "worker",
                "--pool",
                pool,
                "--concurrency",
                str(concurrency),
                "--queues",
                QUEUE,
                "--loglevel",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        ]

    return commands


def huey_workers(url: str, args: argparse.Namespace) -> list[list[str]]:
    command = [str(BIN / "huey_consumer"), "peer_apps.huey_app.huey", "-k", "thread", "-w", str(args.threads), "-q"]
    return [command] * args.processes


def rq_workers(worker_class: str | None) -> Callable[[str, argparse.Namespace], list[list[str]]]:
    def commands(url: str, args: argparse.Namespace) -> list[list[str]]:
        command = [str(BIN / "rq"), "worker", "--url", url, "--quiet", "--path", str(HERE)]
        if worker_class:
            command += ["--worker-class", worker_class]
        return [[*command, QUEUE]] * args.processes

    return commands


def systems(args: argparse.Namespace) -> list[System]:
    threads = args.processes * args.threads
    both = ("redis", "rabbitmq")
    return [
        System("dramaturg", "dramaturg, defaults", both, ["dramaturg"], threads, dramatiq_workers),
        System("dramaturg-bulk", "dramaturg, send_many", both, ["dramaturg", "--bulk"], threads, dramatiq_workers),
        System(
            "dramaturg-nostate",
            "dramaturg, [state] enabled = false",
            ("redis",),
            ["dramaturg"],
            threads,
            dramatiq_workers,
            lambda broker: {"BENCH_SETTINGS": json.dumps({"state": {"enabled": False}})},
        ),
        System("dramatiq", "Dramatiq, defaults", both, ["dramatiq"], threads, dramatiq_workers),
        System(
            "dramatiq-prefetch",
            "Dramatiq, prefetch {prefetch}",
            both,
            ["dramatiq"],
            threads,
            dramatiq_workers,
            lambda broker: {"dramatiq_queue_prefetch": str(DEFAULT_PREFETCH[broker])},
        ),
        System("celery", "Celery, prefork -c 2", both, ["celery"], 2, celery_workers("prefork", 2)),
        System(
            "celery-threads",
            f"Celery, threads -c {threads}",
            both,
            ["celery"],
            threads,
            celery_workers("threads", threads),
        ),
        System(
            "huey", f"Huey, {args.processes} x thread -w {args.threads}", ("redis",), ["huey"], threads, huey_workers
        ),
        System(
            "rq",
            f"RQ, {args.processes} x rq worker (fork per job)",
            ("redis",),
            ["rq"],
            args.processes,
            rq_workers(None),
            lambda broker: {"BENCH_COUNT_BY_PARENT": "1"},
        ),
        System(
            "rq-simple",
            f"RQ, {args.processes} x SimpleWorker",
            ("redis",),
            ["rq"],
            args.processes,
            rq_workers("rq.worker.SimpleWorker"),
        ),
    ]


def label(system: System, broker: str) -> str:
    return system.label.format(prefetch=DEFAULT_PREFETCH[broker])


@dataclass
class Result:
    enqueue: float  # msgs/s
    drain: float  # msgs/s
    cpu_us: float  # worker CPU per task
    steady: float = 0.0  # msgs/s once every worker process had begun
    capped: bool = False
    users_ok: bool | None = None  # import: the table holds exactly the valid rows


def reset(url: str) -> None:
    """Empty the benchmark's own Redis database, or delete its own RabbitMQ queues."""
    if url.startswith("amqp"):
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        for suffix in ("", ".DQ", ".XQ", ".HQ"):
            channel.queue_delete(QUEUE + suffix)
        channel.exchange_delete(QUEUE)  # Celery's, named after its default queue
        connection.close()
    else:
        import redis

        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()


def tree(pids: list[int]) -> list[int]:
    """``pids`` and all their descendants."""
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children(pid)
    return found


def cpu_with_reaped(pids: list[int]) -> float:
    """CPU seconds of ``pids``' trees, counting children they have reaped (RQ's work horses)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in tree(pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return cpu_seconds(tree(pids)) + total / ticks


class Progress:
    """Tasks processed so far (the count files' sizes), and when each worker process began."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.began: dict[str, tuple[float, int]] = {}  # file -> (when first seen, tasks done then)

    def done(self) -> int:
        sizes = {}
        for entry in os.scandir(self.directory):
            try:
                sizes[entry.name] = entry.stat().st_size
            except FileNotFoundError:
                continue
        total = sum(sizes.values())
        for name in sizes.keys() - self.began.keys():
            self.began[name] = (time.perf_counter(), total - sizes[name])
        return total

    def all_running(self) -> tuple[float, int]:
        """When the last worker process to begin began, and the tasks done before it."""
        return max(self.began.values())


def run_once(system: System, broker: str, url: str, scenario: str, count: int, args: argparse.Namespace) -> Result:
    reset(url)
    with tempfile.TemporaryDirectory(prefix="peers-") as directory:
        count_dir, database = Path(directory) / "processed", Path(directory) / "users.db"
        count_dir.mkdir()
        progress = Progress(count_dir)
        work.create_database(str(database))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DRAMATURG_", "dramatiq_", "BENCH_"))},
            **system.env(broker),
            "BENCH_SYSTEM": system.enqueue[0],
            "BENCH_URL": url,
            "BENCH_QUEUE": QUEUE,
            "BENCH_PROCESSED_DIR": str(count_dir),
            "BENCH_SQLITE": str(database),
            "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src")]),  # this checkout
        }
        command = [sys.executable, str(HERE / "peer_apps" / "enqueue.py"), system.enqueue[0], scenario, str(count)]
        enqueued = subprocess.run([*command, *system.enqueue[1:]], env=env, capture_output=True, text=True)
        if enqueued.returncode:
            raise RuntimeError(f"{label(system, broker)}: enqueue failed:\n{enqueued.stderr[-3000:]}")
        enqueue_rate = count / json.loads(enqueued.stdout.strip().splitlines()[-1])["seconds"]

        log = (Path(directory) / "worker.log").open("w")
        workers = [
            subprocess.Popen(command, env=env, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
            for command in system.workers(url, args)
        ]
        try:

            def started() -> bool:
                if any(worker.poll() is not None for worker in workers):
                    raise RuntimeError(f"{label(system, broker)}: a worker exited:\n{tail(log.name)}")
                return progress.done() > 0

            first = wait_until(started, 120, f"{label(system, broker)}: no task processed in 120 s")
            pids = [worker.pid for worker in workers]
            cpu_before, done_before = cpu_with_reaped(pids), progress.done()
            deadline = first + args.max_drain_seconds
            last = wait_until(lambda: progress.done() >= count or time.perf_counter() > deadline, 1e9, "")
            cpu_after, done = cpu_with_reaped(pids), min(progress.done(), count)
        finally:
            stop(workers)
            log.close()
        users_ok = None
        if scenario == "import" and done >= count:
            users_ok = work.count_users(str(database)) == work.valid_rows(count)
        all_running, done_then = progress.all_running()
    reset(url)
    return Result(
        enqueue=enqueue_rate,
        drain=done / (last - first),
        steady=(done - done_then) / (last - all_running) if last > all_running else 0.0,
        cpu_us=(cpu_after - cpu_before) / max(done - done_before, 1) * 1e6,
        capped=done < count,
        users_ok=users_ok,
    )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.005)
    return time.perf_counter()


def stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def tail(path: str, lines: int = 30) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def median(results: list[Result]) -> Result:
    return Result(
        enqueue=statistics.median(r.enqueue for r in results),
        drain=statistics.median(r.drain for r in results),
        cpu_us=statistics.median(r.cpu_us for r in results),
        steady=statistics.median(r.steady for r in results),
        capped=any(r.capped for r in results),
        users_ok=None if all(r.users_ok is None for r in results) else all(r.users_ok is not False for r in results),
    )


def ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else ""


def tables(results: dict[tuple[str, str, str], list[Result]], args: argparse.Namespace) -> list[str]:
    chosen = [s for s in systems(args) if s.name in args.systems]
    lines: list[str] = []
    capped = False
    for scenario in args.scenarios:
        count = counts(args)[scenario]
        if scenario == "noop":
            lines += [
                f"**No-op tasks**: {count:,} per run.",
                "",
                "| broker | system | enqueue msgs/s | drain msgs/s | worker CPU us/msg | enqueue vs dramaturg"
                " | drain vs dramaturg | CPU/msg vs dramaturg |",
                "|---|---|---:|---:|---:|---:|---:|---:|",
            ]
        elif scenario == "sleep":
            lines += [
                f"**10 ms I/O-bound tasks**: {count:,} per run; efficiency = drain / (slots / 10 ms); the"
                " steady columns start when the last worker process processed its first task.",
                "",
                "| broker | system | slots | drain tasks/s | efficiency | steady tasks/s | steady efficiency"
                " | drain vs dramaturg |",
                "|---|---|---:|---:|---:|---:|---:|---:|",
            ]
        else:
            lines += [
                f"**User import**: {count:,} rows per run (validate the address, upsert into SQLite;"
                " 1 row in 50 rejected).",
                "",
                "| broker | system | enqueue rows/s | drain rows/s | worker CPU us/row | users table right"
                " | enqueue vs dramaturg | drain vs dramaturg |",
                "|---|---|---:|---:|---:|---|---:|---:|",
            ]
        for broker in args.brokers:
            base = results.get((broker, "dramaturg", scenario))
            b = median(base) if base else None
            for system in chosen:
                if (broker, system.name, scenario) not in results:
                    continue
                r = median(results[(broker, system.name, scenario)])
                capped |= r.capped
                star = "*" if r.capped else ""
                name = label(system, broker)
                if scenario == "noop":
                    lines.append(
                        f"| {broker} | {name} | {r.enqueue:,.0f} | {r.drain:,.0f}{star} | {r.cpu_us:.0f}"
                        f" | {ratio(r.enqueue, b.enqueue if b else None)} | {ratio(r.drain, b.drain if b else None)}"
                        f" | {ratio(r.cpu_us, b.cpu_us if b else None)} |"
                    )
                elif scenario == "sleep":
                    best = system.slots / work.SLEEP_S
                    lines.append(
                        f"| {broker} | {name} | {system.slots} | {r.drain:,.0f}{star} | {r.drain / best:.0%}"
                        f" | {r.steady:,.0f} | {r.steady / best:.0%} | {ratio(r.drain, b.drain if b else None)} |"
                    )
                else:
                    right = {True: "yes", False: "**no**", None: "not checked"}[r.users_ok]
                    lines.append(
                        f"| {broker} | {name} | {r.enqueue:,.0f} | {r.drain:,.0f}{star} | {r.cpu_us:.0f} | {right}"
                        f" | {ratio(r.enqueue, b.enqueue if b else None)} | {ratio(r.drain, b.drain if b else None)} |"
                    )
        lines.append("")
    if capped:
        lines += [
            f"\\* drain cut after {args.max_drain_seconds:g} s: the rate is over the tasks done by then.",
            "",
        ]
    return lines


def versions() -> str:
    names = ("dramatiq", "celery", "kombu", "rq", "huey", "redis", "pika")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return "- " + ", ".join(found)


def write_section(path: Path, section: list[str]) -> None:
    """Replace the file's generated "Peers" section (up to the next ``## `` heading), or add
    it before the first section. Notes on the results belong in a section of their own."""
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmark results", ""]
    starts = [i for i, line in enumerate(lines) if line.startswith("## ")]
    mine = next((i for i in starts if lines[i].startswith(SECTION)), None)
    if mine is None:
        at = starts[0] if starts else len(lines)
        lines[at:at] = [*section, ""]
    else:
        end = next((i for i in starts if i > mine), len(lines))
        lines[mine:end] = [*section, ""]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def counts(args: argparse.Namespace) -> dict[str, int]:
    return {"noop": args.count, "sleep": args.sleep_count, "import": args.import_count}


def main() -> int:
    names = [s.name for s in systems(argparse.Namespace(processes=2, threads=8))]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", nargs="+", default=["redis", "rabbitmq"], choices=["redis", "rabbitmq"])
    parser.add_argument("--systems", nargs="+", default=names, choices=names, help="(default: all)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS, help="(default: all)")
    parser.add_argument("--count", type=int, default=10_000, help="no-op tasks per run (default: 10000)")
    parser.add_argument("--sleep-count", type=int, default=2_000, help="10 ms tasks per run (default: 2000)")
    parser.add_argument("--import-count", type=int, default=20_000, help="user rows per run (default: 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker process (default: 8)")
    parser.add_argument("--max-drain-seconds", type=float, default=30, help="cut a longer drain there (default: 30)")
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/9",
        help="a database of its own; it is flushed (default: %(default)s)",
    )
    parser.add_argument(
        "--rabbitmq-url", default="amqp://guest:guest@127.0.0.1:5672/%2F", help="(default: %(default)s)"
    )
    parser.add_argument("--write", metavar="FILE", help="also put the tables in FILE's Peers section")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, interrupted)  # stop this run's workers on the way out
    urls = {"redis": args.redis_url, "rabbitmq": args.rabbitmq_url}

    started = time.monotonic()
    results: dict[tuple[str, str, str], list[Result]] = {}
    for round_number in range(args.rounds):
        for broker in args.brokers:
            for scenario in args.scenarios:
                order = [s for s in systems(args) if s.name in args.systems and broker in s.brokers]
                shift = round_number % max(len(order), 1)
                for system in order[shift:] + order[:shift]:
                    count = counts(args)[scenario]
                    r = run_once(system, broker, urls[broker], scenario, count, args)
                    results.setdefault((broker, system.name, scenario), []).append(r)
                    print(
                        f"round {round_number + 1} {broker:8} {scenario:6} {label(system, broker):40}"
                        f" enqueue {r.enqueue:8,.0f}/s  drain {r.drain:8,.0f}/s{'*' if r.capped else ' '}"
                        f" steady {r.steady:8,.0f}/s cpu {r.cpu_us:6.0f} us/msg  [{time.monotonic() - started:5.0f} s]",
                        file=sys.stderr,
                        flush=True,
                    )

    minutes = (time.monotonic() - started) / 60
    lines = [
        f"Worker {args.processes} processes x {args.threads} threads where the system has threads;"
        f" medians of {args.rounds} interleaved rounds; the run took {minutes:.0f} minutes.",
        "",
        *tables(results, args),
        *machine(),
        versions(),
        *server_versions({broker: urls[broker] for broker in args.brokers}),
    ]
    publish(lines, None)
    if args.write:
        write_section(Path(args.write), [f"{SECTION}{time.strftime('%Y-%m-%d')})", "", *lines])
    return 0


if __name__ == "__main__":
    sys.exit(main())
