"""What a limit costs the drain: the same no-op tasks drained with and without a limit that never denies.

On a private Redis server (a free port, no persistence), in interleaved rounds, for each
of "plain" (no limit), "concurrency" (``concurrency(1_000_000, key="bench")``: one Lua
call to take the slot at the start, its release after) and "rate" (``rate(1_000_000_000,
per="1s", key="bench")``: one Lua call at the start, nothing after):

1. send N no-op messages with ``send_many`` (not timed into the drain);
2. start a Dramatiq worker in this process (``--threads`` threads) and time the drain
   from its start to the end of the last task (msgs/s), and the CPU time this process
   spent meanwhile (us/msg: steadier than the rate on a machine whose cores are shared;
   it includes the Redis client's work but not Redis's own).

Medians over the rounds are printed as a Markdown table with each mode's ratio to plain.
The issue's bar: a limit that never denies costs under 10% of the drain rate.

    python benchmarks/flow.py                         # 20,000 tasks, 3 rounds
    python benchmarks/flow.py --count 5000 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import dramatiq  # noqa: E402

import dramaturg  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server without persistence; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH")
    port = free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", directory],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return server, f"redis://127.0.0.1:{port}/0"


MODES = ("plain", "concurrency", "rate")


def run_once(mode: str, url: str, count: int, threads: int) -> dict[str, float]:
    """One drain of ``count`` no-op tasks; its rate and CPU time per task."""
    settings = dramaturg.Settings(
        broker={"url": url, "namespace": f"bench-{uuid.uuid4().hex[:8]}"}, worker={"threads": threads}
    )
    broker = dramaturg.bootstrap(settings)
    done = threading.Event()
    ended = [0]
    lock = threading.Lock()
    limits: dict[str, list[Any]] = {
        "plain": [],
        "concurrency": [dramaturg.concurrency(1_000_000, key="bench")],
        "rate": [dramaturg.rate(1_000_000_000, per="1s", key="bench")],
    }

    @dramaturg.actor(queue_name="bench", actor_name=f"noop_{mode}", limits=limits[mode])
    def noop(n: int) -> None:
        with lock:
            ended[0] += 1
            if ended[0] == count:
                done.set()

    noop.send_many(range(count))
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    cpu0, t0 = time.process_time(), time.perf_counter()
    worker.start()
    if not done.wait(timeout=max(120, count / 200)):
        raise SystemExit(f"{mode}: only {ended[0]} of {count} ran")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    worker.stop()
    dramaturg.shutdown()
    return {"rate": count / seconds, "us_per_msg": cpu / count * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="tasks per drain (default: 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--threads", type=int, default=8, help="worker threads (default: 8)")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="bench-flow-")
    server, url = start_redis(directory)
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    try:
        for round_ in range(args.rounds):
            for mode in MODES if round_ % 2 == 0 else tuple(reversed(MODES)):
                result = run_once(mode, url, args.count, args.threads)
                results[mode].append(result)
                print(f"round {round_ + 1} {mode}: {result['rate']:,.0f} msgs/s, {result['us_per_msg']:.1f} us/msg")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(directory, ignore_errors=True)
    medians = {
        mode: {k: statistics.median(r[k] for r in rs) for k in ("rate", "us_per_msg")} for mode, rs in results.items()
    }
    plain = medians["plain"]
    print()
    print(f"{args.count:,} no-op tasks, Redis, one worker process with {args.threads} threads, median of {args.rounds}")
    print(f"(machine: {os.cpu_count()} cores; python {sys.version.split()[0]})")
    print()
    print("| | drain (msgs/s) | CPU (us/msg) | drain / plain | CPU / plain |")
    print("|---|---:|---:|---:|---:|")
    for mode in MODES:
        m = medians[mode]
        print(
            f"| {mode} | {m['rate']:,.0f} | {m['us_per_msg']:.1f} | {m['rate'] / plain['rate']:.3f}"
            f" | {m['us_per_msg'] / plain['us_per_msg']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
