"""Resident memory of a worker process: bare Dramatiq against dramaturg started as users start it.

For each broker and each way of starting a worker, in interleaved rounds: start one
worker process with 8 threads (``-p 1 -t 8``), send N no-ops (``benchmarks/memory_app.py``),
wait until the worker has run them all, then read its worker process's memory from
``/proc/<pid>/status``: ``VmRSS`` (resident now), ``VmHWM`` (peak resident), and the
anonymous and file-backed parts of ``VmRSS``. The workers read their configuration the
way users' do: ``DRAMATURG_*`` variables, no ``Settings(...)`` in the application
(``benchmarks/throughput.py``'s app builds one, so its RSS column includes pydantic).

    python benchmarks/worker_memory.py                     # both brokers, 5,000 no-ops, 3 rounds
    python benchmarks/worker_memory.py --brokers redis --rounds 1

Memory does not depend on how busy the machine is, unlike the CPU times of the other
benchmarks: a run next to other work measures the same.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput import stop

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

#: label -> (system, argv of the worker)
STARTS: dict[str, tuple[str, list[str]]] = {
    "Dramatiq (`dramatiq memory_app`)": ("dramatiq", [str(BIN / "dramatiq"), "memory_app", "-p", "1", "-t", "8"]),
    "dramaturg (`dramatiq dramaturg.worker`)": (
        "dramaturg",
        [str(BIN / "dramatiq"), "dramaturg.worker", "-p", "1", "-t", "8"],
    ),
    "dramaturg (`dramaturg worker`)": ("dramaturg", [str(BIN / "dramaturg"), "worker", "-p", "1", "-t", "8"]),
}
FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def memory_mb(pid: int) -> dict[str, float]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in FIELDS:
            values[name] = int(rest.split()[0]) / 1024
    return values


def done(directory: Path) -> int:
    return sum(int(path.read_text() or 0) for path in directory.glob("*.count"))


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def reset(url: str) -> None:
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter("memory-*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def run_once(label: str, url: str, count: int) -> dict[str, float]:
    system, argv = STARTS[label]
    reset(url)
    with tempfile.TemporaryDirectory() as directory:
        count_dir = Path(directory, "counts")
        count_dir.mkdir()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DRAMATURG_", "dramatiq_"))},
            "MEMORY_SYSTEM": system,
            "MEMORY_URL": url,
            "MEMORY_COUNT_DIR": str(count_dir),
            "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src")]),
        }
        if system == "dramaturg":
            env |= {
                "DRAMATURG_BROKER_URL": url,
                "DRAMATURG_BROKER_NAMESPACE": "memory-dramaturg",
                "DRAMATURG_WORKER_MODULES": "memory_app",
            }
        worker = subprocess.Popen(argv, cwd=directory, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            subprocess.run(
                [sys.executable, str(HERE / "memory_app.py"), str(count)], cwd=directory, env=env, check=True
            )
            wait_for(lambda: done(count_dir) >= count, 300, f"{label}: the worker never ran them all")
            (pid,) = children(worker.pid)
            return memory_mb(pid)
        finally:
            stop(worker)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", nargs="+", default=["redis", "rabbitmq"], choices=["redis", "rabbitmq"])
    parser.add_argument("--count", type=int, default=5_000, help="no-ops per run, a multiple of 500 (default: 5000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15", help="(default: %(default)s)")
    parser.add_argument(
        "--rabbitmq-url", default="amqp://guest:guest@127.0.0.1:5672/%2F", help="(default: %(default)s)"
    )
    args = parser.parse_args()
    urls = {"redis": args.redis_url, "rabbitmq": args.rabbitmq_url}
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for round_number in range(args.rounds):
        for broker in args.brokers:
            for label in STARTS:
                measured = run_once(label, urls[broker], args.count)
                results.setdefault((broker, label), []).append(measured)
                shown = "  ".join(f"{name} {value:5.1f}" for name, value in measured.items())
                print(f"round {round_number + 1} {broker:8} {label:42} {shown}", file=sys.stderr, flush=True)
    print(f"\nworker process after {args.count:,} no-ops, medians of {args.rounds} rounds (MB):\n")
    print("| broker | worker | VmRSS | VmHWM (peak) | anonymous | file-backed | VmRSS vs Dramatiq |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for broker in args.brokers:
        base = statistics.median(r["VmRSS"] for r in results[(broker, next(iter(STARTS)))])
        for label in STARTS:
            rows = results[(broker, label)]
            med = {name: statistics.median(r[name] for r in rows) for name in FIELDS}
            ratio = "" if label == next(iter(STARTS)) else f"{med['VmRSS'] / base:.2f}x"
            print(
                f"| {broker} | {label} | {med['VmRSS']:.1f} | {med['VmHWM']:.1f} | {med['RssAnon']:.1f}"
                f" | {med['RssFile']:.1f} | {ratio} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
