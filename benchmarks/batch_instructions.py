"""What a batch member costs, counted in machine instructions: the same tasks with and without a batch.

``batches.py`` times drains, and on a shared 2-core machine two equal drains read up to
13% apart, more than the cost it looks for. This counts instead: valgrind's callgrind
counts the instructions the worker process and the Redis server execute, which come out
the same however busy the machine is. On a saturated machine the drain rate follows the
work done per task, so the ratio of instructions per task is what a batch costs the drain,
without the noise (system calls and cache misses are not counted; a member adds no system
call of its own: its end goes with the acknowledgement).

On a private Redis run under callgrind, ``--count`` tasks are sent to one queue ("plain")
and as many to another as the members of one batch ("batch"), no-ops or with ``--task
import`` the showcase's user import as ``batches.py`` runs it. Each mode is then drained
by ``dramatiq bench_app -p 1 -t 8`` under callgrind; both counters are zeroed once a fifth
is done and read at nine tenths (the start and the end left out), and divided by the tasks
done in between. Redis's timer work (``serverCron``) is taken out. Valgrind slows the
worker about fiftyfold, so work done on a timer weighs more per task than at full speed;
the batch writer's flush, which writes "running" for the members it finds running, is
stretched as much (``BENCH_BATCH_FLUSH_S``) so that it finds as few as at full speed, and
so is the count the benchmark's worker writes every 10 ms (``BENCH_COUNT_EVERY_S``).

Needs valgrind (``apt install valgrind``). About two minutes a mode for 3,000 tasks.

``--keep`` keeps callgrind's files (their directory is printed) for ``callgrind_annotate``,
which splits each count by function: Redis's part 1 is the plain mode's window and its
part 2 the batch's; each mode's worker is a process of its own, whose part 1 is its
window. Debian's ``redis-server`` has no symbols: for Redis's part, put a
``redis-server`` built from Debian's source (``apt-get source redis``, ``make
MALLOC=libc``) first on ``PATH``.

    python benchmarks/batch_instructions.py                  # no-ops, 3,000 tasks a mode
    python benchmarks/batch_instructions.py --task import    # the user import
    python benchmarks/batch_instructions.py --keep           # and keep the files, to split by function
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import redis  # noqa: E402
from drain_rounds import free_port  # noqa: E402
from peer_apps import work  # noqa: E402
from throughput import children, counts, stop, wait_for  # noqa: E402

import dramaturg  # noqa: E402

#: The batch writer's flush interval and bench_app's count interval under valgrind (0.1 s
#: and 10 ms at full speed), stretched about as much as the worker is slowed.
FLUSH_S, COUNT_S = "5", "0.5"


def callgrind(out: Path, *command: str) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={out}.%p", *command]


def control(pid: int, option: str) -> None:
    """Zero (``-z``) or dump (``-d``) the counters of the process ``pid`` runs under callgrind."""
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True)


def dumped(out: Path, pid: int, without: str | None = None) -> int:
    """Instructions in the newest dump of ``pid`` (since the counters were zeroed), less
    those spent in the function ``without`` and what it called."""
    newest = max(glob.glob(f"{out}.{pid}.*"), key=os.path.getmtime)
    with open(newest) as dump:
        total = next(int(line.split()[1]) for line in dump if line.startswith(("summary:", "totals:")))
    if without:
        annotated = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", "--threshold=100", newest],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for line in annotated.splitlines():
            if line.rstrip().split(":")[-1].split(" ")[0] == without:
                total -= int(line.split()[0].replace(",", ""))
                break
    return total


def count_mode(env: dict[str, str], out: Path, redis_pid: int, mode: str, count: int) -> dict[str, float]:
    """Drain ``mode``'s queue in ``dramatiq bench_app`` under callgrind; its instructions per task."""
    with tempfile.TemporaryDirectory() as directory:
        worker = subprocess.Popen(
            callgrind(
                out,
                str(Path(sys.executable).with_name("dramatiq")),
                *("bench_app", "--path", str(HERE), "-p", "1", "-t", "8", "-Q", f"bench-{mode}"),
            ),
            env={**env, "BENCH_QUEUE": f"bench-{mode}", "BENCH_COUNT_DIR": directory},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: _started(worker, Path(directory), count // 5), 1800, f"the {mode} worker never started")
            (process,) = children(worker.pid)
            control(process, "-z")
            control(redis_pid, "-z")
            first = counts(Path(directory))[0]
            wait_for(lambda: counts(Path(directory))[0] >= count * 9 // 10, 1800, f"the {mode} drain never ended")
            control(process, "-d")
            control(redis_pid, "-d")
            done = counts(Path(directory))[0] - first
        finally:
            stop(worker)
    return {
        "tasks": done,
        "worker": dumped(out, process) / done,
        "redis": dumped(out, redis_pid, without="serverCron") / done,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="tasks a mode (default: 3000)")
    parser.add_argument(
        "--task", choices=("noop", "import"), default="noop", help="noop (default), or import (the user import)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep callgrind's files for callgrind_annotate (prints where)"
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt install valgrind)")
    scratch = Path(tempfile.mkdtemp(prefix="bench-batch-instructions-"))
    out = scratch / "callgrind"
    port = free_port()
    server = subprocess.Popen(
        callgrind(
            out,
            *("redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"),
            *("--dir", str(scratch)),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(port), 120, "Redis under valgrind never answered")
        url = f"redis://127.0.0.1:{port}/0"
        # Each mode its own database, so that neither upserts into a table the other filled.
        databases = {mode: str(scratch / f"users-{mode}.sqlite3") for mode in ("plain", "batch")}
        actor_name = "noop" if args.task == "noop" else "peer_import_user"
        if args.task == "import":
            for database in databases.values():
                work.create_database(database)
        broker = dramaturg.bootstrap(dramaturg.Settings(broker={"url": url, "namespace": "bench-dramaturg"}))
        for mode in ("plain", "batch"):
            sender = dramaturg.actor(queue_name=f"bench-{mode}", actor_name=actor_name)(lambda item: None)
            items: Any = (
                range(args.count)
                if args.task == "noop"
                else work.user_rows(args.count, step=2, offset=0 if mode == "plain" else 1)
            )
            if mode == "batch":
                with dramaturg.batch("bench"):
                    sender.send_many(items)
            else:
                sender.send_many(items)
            broker.actors.pop(actor_name)
        dramaturg.shutdown()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DRAMATURG_", "dramatiq_"))},
            "BENCH_SYSTEM": "dramaturg",
            "BENCH_URL": url,
            "BENCH_SETTINGS": json.dumps({}),
            "BENCH_PROCESSED_DIR": str(scratch),
            "BENCH_BATCH_FLUSH_S": FLUSH_S,
            "BENCH_COUNT_EVERY_S": COUNT_S,
            "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src")]),
        }
        counted = {
            mode: count_mode({**env, "BENCH_SQLITE": databases[mode]}, out, server.pid, mode, args.count)
            for mode in ("plain", "batch")
        }
    finally:
        server.terminate()
        server.wait()
    plain, batch = counted["plain"], counted["batch"]
    print(
        f"\nInstructions per task, {args.task} tasks, Redis, 1 worker process of 8 threads "
        f"({plain['tasks']:.0f} and {batch['tasks']:.0f} tasks counted):\n"
    )
    print("| | plain | batch | batch / plain | a member adds |")
    print("|---|---:|---:|---:|---:|")
    for label, key in (("worker process", "worker"), ("Redis (without its timer)", "redis")):
        print(
            f"| {label} | {plain[key]:,.0f} | {batch[key]:,.0f} | {batch[key] / plain[key]:.3f} "
            f"| {batch[key] - plain[key]:,.0f} |"
        )
    both_plain, both_batch = plain["worker"] + plain["redis"], batch["worker"] + batch["redis"]
    print(
        f"| both | {both_plain:,.0f} | {both_batch:,.0f} | {both_batch / both_plain:.3f} "
        f"| {both_batch - both_plain:,.0f} |"
    )
    if args.keep:
        print(f"\ncallgrind's files: {scratch} (Redis's part 1: plain, part 2: batch; a worker's part 1: its mode)")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _started(worker: subprocess.Popen[bytes], directory: Path, tasks: int) -> bool:
    """Whether the worker has done ``tasks``; raises if it ended first (it failed to start)."""
    if worker.poll() is not None:
        raise SystemExit(f"the worker ended with exit code {worker.returncode} (run it without valgrind to see why)")
    return counts(directory)[0] >= tasks


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port).ping())
    except redis.ConnectionError:
        time.sleep(0.2)
        return False


if __name__ == "__main__":
    sys.exit(main())
