"""What a batch costs the drain: the same tasks drained with and without a batch.

On a private Redis server (a free port, no persistence; ``--broker rabbitmq``: a private
RabbitMQ node, with that Redis as its state store), in rounds. Each round:

1. sends N messages to one queue ("plain") and N to another as the members of one
   batch with an ``on_complete`` ("batch"), with ``send_many`` (not timed); the queues
   are ``bench-a`` and ``bench-b``, the plain mode's on ``bench-a`` in rounds 1 and 2, on
   ``bench-b`` in rounds 3 and 4 (and so on in fours). The tasks are
   no-ops (the worst case: all a task costs is the queue's own work, of which the batch's
   is a share), or with ``--task import`` a stand-in for the showcase's user import as
   ``peers.py`` runs it (``peer_apps/work.py``: check the address, upsert the row into
   SQLite, no welcome e-mail; a new database each round, each mode's own rows);
2. drains them in turns, ``--segments`` turns of each (the tasks left over the turns
   left, in the order plain, batch, batch, plain, plain, batch...; in rounds 2 and 3 (and
   so on in fours) the batch is sent first and drains first: batch, plain, plain,
   batch...). A turn starts
   ``dramatiq bench_app -p P -t T -Q <its queue>`` (``--processes``, 2 by default as
   ``dramaturg worker`` on 2 cores; ``--threads``), times it from its tenth task in ten
   to the turn's last (the counts its processes write every 10 ms, as ``throughput.py``;
   the first tenth holds the start and what the turn before gave back), and stops it.
   The machine's speed drifts over minutes on a shared host; turns of a second or two,
   alternated, see the same drift (whole drains of 100,000 one after the other scattered
   by 15%, more than the cost measured);
3. checks that the batch is complete with N succeeded and that ``on_complete`` ran once.

``--control`` sends the batch mode's tasks without a batch: both modes are plain, and the
ratios show what the benchmark itself makes of two equal drains (on the 2-core machine,
2026-12-02, no-ops: drain 0.87-1.005 of plain per round, worker CPU 0.97 of plain), the scatter
any batch figure is read against. Until 2026-12-03 the plain mode was always on one queue
and went first in rounds 1 and 3: the control's rounds read about 0.93 of plain when plain
went first and 1.01 when it went second (order and queue could not be told apart), so the
median of four read 0.954 and 0.964 for two equal drains. Now each of the four rounds is
one of the four arrangements (plain first or second, on either queue), and the mean of
the rounds' ratios is the balanced figure. ``--turns`` prints each turn.

Per round and mode: tasks / drain time (msgs/s); the worker processes' CPU per task
(us/msg); the machine's, every process counted (the worker, RabbitMQ, Redis), with its
idle share; and the Redis server's own (``INFO cpu``: the broker's, or on RabbitMQ the
state store's, where the members' ends are written). Medians over the rounds are printed
as a Markdown table with the batch's ratio to plain. The issue's bar: a 100,000-member
batch costs at most 5% of the drain rate. The mean of the rounds' ratios comes with its
95% confidence interval (Student's t over the rounds) and says whether the bar is met
(the interval above 0.95), not met (below) or not resolved (the interval holds 0.95):
on the shared 2-core machine the host's speed changes by up to about 30% within seconds, and
a round's ratio scatters by about 5%, so four rounds resolve little and eight about
±3-4%. Numbers in ``docs/batches.md``.

    python benchmarks/batches.py                         # Redis, 100,000 tasks each, 10 turns, 4 rounds
    python benchmarks/batches.py --rounds 8              # a tighter interval (about 16 minutes)
    python benchmarks/batches.py --control               # the same with no batch in either mode
    python benchmarks/batches.py --count 20000 --rounds 1
    python benchmarks/batches.py --broker rabbitmq       # RabbitMQ, batches in a private Redis
    python benchmarks/batches.py --processes 1           # one worker process, as before 2026-12-02
    python benchmarks/batches.py --task import           # the user import instead of no-ops
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import dramatiq  # noqa: E402
import redis  # noqa: E402
from drain_rounds import medians, print_table, private_rabbitmq, private_redis  # noqa: E402
from peer_apps import work  # noqa: E402
from throughput import children, counts, cpu_seconds, stop, wait_for  # noqa: E402

import dramaturg  # noqa: E402

#: The issue's bar: a batch's drain at least this share of the same tasks' without one.
BAR = 0.95

#: Student's t, two-sided 95%, by degrees of freedom (1 to 30; past that the normal's 1.96,
#: an interval at most 4% too narrow).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)  # fmt: skip


def confidence(values: list[float]) -> tuple[float, float]:
    """The 95% confidence interval of the mean of ``values`` (two or more; Student's t)."""
    mean, n = statistics.fmean(values), len(values)
    half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * statistics.stdev(values) / n**0.5
    return mean - half, mean + half


def machine_cpu() -> tuple[float, float]:
    """The machine's busy and idle CPU seconds so far, all cores (``/proc/stat``; 0, 0 elsewhere)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:8]]
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / tick, idle / tick


def redis_cpu(client: Any) -> float:
    """The Redis server's CPU seconds so far, user and system (``INFO cpu``: the server's own
    count, read over its connection)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def drain_turn(
    env: dict[str, str], queue: str, tasks: int, processes: int, threads: int, redis_client: Any
) -> dict[str, float]:
    """Start ``dramatiq bench_app`` on ``queue``; time it from its tenth of
    ``tasks`` to its ``tasks``-th (from the counts bench_app's processes write every 10 ms),
    then stop it. Not the first tenth: the worker starting, and the deliveries the turn
    before took back when it stopped (RabbitMQ delivers them again, first, flagged
    redelivered, which the worker looks into and logs)."""
    with tempfile.TemporaryDirectory() as directory:
        count_dir = Path(directory)
        worker = subprocess.Popen(
            [
                *(str(Path(sys.executable).with_name("dramatiq")), "bench_app", "--path", str(HERE)),
                *("--processes", str(processes), "--threads", str(threads), "--queues", queue),
            ],
            env={**env, "BENCH_QUEUE": queue, "BENCH_COUNT_DIR": directory},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: counts(count_dir)[0] >= max(1, tasks // 10), 120, "the worker never started")
            pids = children(worker.pid)

            def readings() -> tuple[float, int, float, tuple[float, float], float]:
                # Each count read with the clock and the CPU times it is timed with.
                return (
                    time.perf_counter(),
                    counts(count_dir)[0],
                    cpu_seconds(pids),
                    machine_cpu(),
                    redis_cpu(redis_client),
                )

            first, done0, cpu0, (busy0, idle0), redis0 = readings()
            wait_for(lambda: counts(count_dir)[0] >= tasks, 600, f"the turn on {queue} never finished")
            last, done, cpu, (busy, idle), redis_ = readings()
        finally:
            stop(worker)
    return {
        "tasks": done - done0,
        "seconds": last - first,
        "cpu": cpu - cpu0,
        "busy": busy - busy0,
        "idle": idle - idle0,
        "redis": redis_ - redis0,
    }


def import_rows(count: int, mode: str) -> list[dict[str, Any]]:
    """``count`` user rows for ``mode``: the plain mode's ids even, the batch's odd, so that
    both insert across the same range of the users table (not one at its end); one in 50
    invalid in each, at the same places."""
    return work.user_rows(count, step=2, offset=0 if mode == "plain" else 1)


#: Each ``--task``'s actor in bench_app, and the items its messages are sent with (one a
#: message): the same numbers for both modes' no-ops, each mode's own rows for an import.
TASKS: dict[str, tuple[str, Any]] = {
    "noop": ("noop", lambda count, mode: range(count)),
    "import": ("peer_import_user", import_rows),
}


def run_round(
    url: str,
    state_url: str | None,
    count: int,
    processes: int,
    threads: int,
    segments: int,
    prefetch: int | None,
    task: str = "noop",
    show_turns: bool = False,
    first: str = "plain",
    control: bool = False,
    swap: bool = False,
) -> dict[str, dict[str, float]]:
    """One round: ``count`` tasks of each mode drained in alternating turns, ``first`` sent
    first and drained first; each mode's rate and CPU per task. ``control``: the "batch"
    mode's tasks are sent without a batch (both modes plain: what the benchmark itself
    tells them apart by). The modes' queues are ``bench-a`` (plain) and ``bench-b`` (batch),
    or the other way round with ``swap``."""
    overrides: dict[str, Any] = {"broker": {"prefetch": prefetch}, "state": {"url": state_url} if state_url else {}}
    scratch = Path(tempfile.mkdtemp(prefix="bench-batches-"))
    database = scratch / "users.sqlite3"
    if task == "import":
        work.create_database(str(database))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DRAMATURG_", "dramatiq_"))},
        "BENCH_SYSTEM": "dramaturg",
        "BENCH_URL": url,
        "BENCH_SETTINGS": json.dumps(overrides),
        "BENCH_SQLITE": str(database),  # --task import: its rows
        "BENCH_PROCESSED_DIR": str(scratch),  # peer_apps.work's own count (bench_app counts as for no-ops)
        "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src")]),  # this checkout
    }
    actor_name, items = TASKS[task]
    # The sender: bench_app's namespace and settings, its actor names, one queue per mode.
    broker = dramaturg.bootstrap(
        dramaturg.Settings(
            broker={"url": url, "namespace": "bench-dramaturg", "prefetch": prefetch}, state=overrides["state"]
        )
    )
    completes: list[dict[str, Any]] = []

    @dramaturg.actor(queue_name="bench-done", actor_name="batch_done")
    def batch_done(summary: dict[str, Any]) -> None:
        completes.append(summary)

    modes = (first, "batch" if first == "plain" else "plain")
    queues = {"plain": "bench-b", "batch": "bench-a"} if swap else {"plain": "bench-a", "batch": "bench-b"}
    for mode in modes:
        sender = dramaturg.actor(queue_name=queues[mode], actor_name=actor_name)(lambda item: None)
        rows = items(count, mode)
        if mode == "plain" or control:
            sender.send_many(rows)
        else:
            # The callback's summary argument is added when it fires.
            batch = dramaturg.batch("bench", on_complete=batch_done.message())  # type: ignore[call-arg]
            with batch:
                sender.send_many(rows)
        broker.actors.pop(actor_name)  # the next mode's queue

    keys = ("tasks", "seconds", "cpu", "busy", "idle", "redis")
    # The Redis server's own CPU (the broker's, or RabbitMQ's state store: where members' ends go).
    redis_client = redis.Redis.from_url(state_url or url)
    spent = {mode: dict.fromkeys(keys, 0.0) for mode in ("plain", "batch")}
    order = [modes[(i + i // 2) % 2] for i in range(2 * segments)]  # first, other, other, first, first...
    for i, mode in enumerate(order):
        waiting = dramaturg.queue_stats([queues[mode]], broker)[0].ready or 0
        if waiting < 2:  # the turns before ran it all (a worker stopping finishes what it has)
            continue
        turn = drain_turn(env, queues[mode], max(2, waiting // order[i:].count(mode)), processes, threads, redis_client)
        for key in spent[mode]:
            spent[mode][key] += turn[key]
        if show_turns:
            print(
                f"  turn {i + 1} {mode}: {turn['tasks'] / turn['seconds']:,.0f} msgs/s, "
                f"{turn['cpu'] / turn['tasks'] * 1e6:.1f} us/msg, "
                f"machine {turn['busy'] / turn['tasks'] * 1e6:.0f} us/msg, "
                f"Redis {turn['redis'] / turn['tasks'] * 1e6:.1f} us/msg",
                flush=True,
            )
    if not control:
        worker = dramatiq.Worker(broker, queues={"bench-done"}, worker_threads=1, worker_timeout=100)
        worker.start()  # the batch's on_complete, once every member has ended
        deadline = time.monotonic() + 60
        while not completes and time.monotonic() < deadline:
            time.sleep(0.01)
        worker.stop()
        status = batch.status()
        assert status.succeeded == count and status.state == "complete", status
        assert len(completes) == 1, completes
    if task == "import":
        users = work.count_users(str(database))
        assert users == 2 * work.valid_rows(count), f"{users} users in {database}, not {2 * work.valid_rows(count)}"
    redis_client.close()
    dramaturg.shutdown()
    shutil.rmtree(scratch, ignore_errors=True)  # kept when a check above fails, to look into
    return {
        mode: {
            "rate": s["tasks"] / s["seconds"],
            "us_per_msg": s["cpu"] / s["tasks"] * 1e6,
            "machine_us_per_msg": s["busy"] / s["tasks"] * 1e6,
            "idle": s["idle"] / max(s["busy"] + s["idle"], 1e-9),
            "redis_us_per_msg": s["redis"] / s["tasks"] * 1e6,
        }
        for mode, s in spent.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="tasks per drain (default: 100000)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds (default: 4: each mode first in two, on each queue in two, in each half of the run once)",
    )
    parser.add_argument("--segments", type=int, default=10, help="turns of each mode in a round (default: 10)")
    parser.add_argument(
        "--processes", type=int, default=2, help="worker processes (default: 2, dramaturg worker's on 2 cores)"
    )
    parser.add_argument("--threads", type=int, default=8, help="worker threads per process (default: 8)")
    parser.add_argument(
        "--prefetch", type=int, default=None, help="the worker's prefetch (default: dramaturg's for the broker)"
    )
    parser.add_argument(
        "--broker",
        choices=("redis", "rabbitmq"),
        default="redis",
        help="redis (default), or rabbitmq with a private Redis as its state store",
    )
    parser.add_argument(
        "--task",
        choices=sorted(TASKS),
        default="noop",
        help="noop (default: the worst case), or import (a stand-in for the showcase's user import into SQLite)",
    )
    parser.add_argument("--turns", action="store_true", help="print each turn's figures too")
    parser.add_argument(
        "--control",
        action="store_true",
        help="send the batch mode's tasks without a batch: both modes plain, to see the benchmark's own bias",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(private_redis("bench-batches-"))
        url, state_url = redis_url, None
        if args.broker == "rabbitmq":
            url, state_url = stack.enter_context(private_rabbitmq("bench-batches-rabbitmq-")), redis_url
        results: dict[str, list[dict[str, float]]] = {"plain": [], "batch": []}
        for round_ in range(args.rounds):
            # Four rounds balance what the control showed apart from a batch: the mode sent and
            # drained first, the queue each mode is on, and the run's first and second half.
            first = ("plain", "batch", "batch", "plain")[round_ % 4]
            swap = round_ % 4 >= 2
            result = run_round(
                url,
                state_url,
                args.count,
                args.processes,
                args.threads,
                args.segments,
                args.prefetch,
                args.task,
                args.turns,
                first=first,
                control=args.control,
                swap=swap,
            )
            for mode, measured in result.items():
                results[mode].append(measured)
            plain_redis, batch_redis = result["plain"]["redis_us_per_msg"], result["batch"]["redis_us_per_msg"]
            print(
                f"round {round_ + 1} ({first} first, plain on bench-{'b' if swap else 'a'}): "
                f"plain {result['plain']['rate']:,.0f} msgs/s, "
                f"{result['plain']['us_per_msg']:.1f} us/msg; batch {result['batch']['rate']:,.0f} msgs/s, "
                f"{result['batch']['us_per_msg']:.1f} us/msg; machine CPU (all processes) "
                f"{result['plain']['machine_us_per_msg']:.0f} and {result['batch']['machine_us_per_msg']:.0f} us/msg, "
                f"Redis's {plain_redis:.1f} and {batch_redis:.1f} us/msg "
                f"(a member adds {batch_redis - plain_redis:.1f}), "
                f"idle {result['plain']['idle']:.0%} and {result['batch']['idle']:.0%}; "
                f"drain {result['batch']['rate'] / result['plain']['rate']:.3f} of plain",
                flush=True,
            )
    ratios = [b["rate"] / p["rate"] for p, b in zip(results["plain"], results["batch"], strict=True)]
    # Each round is a pair (its turns alternate): its own ratio is the steadier figure.
    print(
        "drain / plain per round: "
        + ", ".join(f"{ratio:.3f}" for ratio in ratios)
        + f" (mean {statistics.fmean(ratios):.3f}, median {statistics.median(ratios):.3f});"
        " the table below compares each mode's median"
    )
    if len(ratios) > 1:
        low, high = confidence(ratios)
        verdict = f"not resolved: the interval holds {BAR}"
        if low >= BAR:
            verdict = "met"
        elif high < BAR:
            verdict = "not met"
        print(
            f"mean of the rounds {statistics.fmean(ratios):.3f}, 95% confidence interval {low:.3f} to {high:.3f}"
            f" (t over {len(ratios)} rounds); the bar, {BAR} of plain: {verdict}"
        )
    name = "RabbitMQ (state in Redis)" if args.broker == "rabbitmq" else "Redis"
    print_table(
        medians(results),
        "plain",
        count=args.count,
        threads=args.threads,
        rounds=args.rounds,
        broker=name,
        processes=args.processes,
        tasks="no-op tasks" if args.task == "noop" else "user-import tasks (validate, upsert into SQLite)",
        labels={"batch": "batch (--control: sent without a batch)"} if args.control else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
