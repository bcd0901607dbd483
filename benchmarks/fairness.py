"""How soon another tenant's tasks start behind a long queue of one tenant's, under a limit per tenant.

``N`` tasks of store "big" (300 ms each) are queued before 10 of store "small", every
task under ``concurrency(2, key="tenant:{store}")``; a worker (``--threads`` threads, in
this process) then starts, and the time from its start until the small store's first
started and until its ten have all started (its own limit puts the tenth 1.2 s after the
first at the least) is printed, with that time per task ahead. Without the limit the first of
the small store's would start after N x 300 ms / threads.

    python benchmarks/fairness.py --broker redis --ahead 10000
    python benchmarks/fairness.py --broker rabbitmq --ahead 2000
    python benchmarks/fairness.py --broker redis --ahead 10000 --processes 2

With ``--processes N`` the worker is ``dramaturg worker -p N -t THREADS`` instead, as
deployed (``benchmarks/fairness_app.py``; each process paces its own put-backs); it
prints the first and last start, not the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import dramatiq  # noqa: E402
from drain_rounds import private_rabbitmq, private_redis  # noqa: E402

import dramaturg  # noqa: E402


@contextlib.contextmanager
def servers(kind: str) -> Iterator[tuple[str, str | None]]:
    """The broker URL and the state store's (RabbitMQ needs a Redis beside it)."""
    if kind == "redis":
        with private_redis("bench-fair-") as url:
            yield url, None
    elif kind == "embedded":
        with tempfile.TemporaryDirectory(prefix="bench-fair-") as directory:
            yield f"embedded://{os.path.join(directory, 'embedded.db')}", None
            # The broker closed: its watchdog stops the server, which needs the directory until then.
            deadline = time.monotonic() + 20
            while os.path.exists(os.path.join(directory, "embedded.db.sock")) and time.monotonic() < deadline:
                time.sleep(0.1)
    else:
        with private_redis("bench-fair-") as state, private_rabbitmq("bench-fair-") as url:
            yield url, state


def run_once(url: str, state: str | None, ahead: int, threads: int) -> dict[str, float]:
    settings = dramaturg.Settings(
        broker={"url": url, "namespace": f"bench-{uuid.uuid4().hex[:8]}"},
        worker={"threads": threads},
        **({"state": {"url": state}} if state else {}),
    )
    broker = dramaturg.bootstrap(settings)
    started: dict[str, list[float]] = {"big": [], "small": []}
    guard = threading.Lock()
    small_done = threading.Event()

    @dramaturg.actor(
        queue_name="fair",
        actor_name="fair_sync",
        max_retries=0,
        limits=[dramaturg.concurrency(2, key="tenant:{store}")],
    )
    def sync(n: int) -> None:
        store = dramaturg.current_task().context["store"]
        with guard:
            started[store].append(time.monotonic())
            if len(started["small"]) == 10:
                small_done.set()
        time.sleep(0.3)

    with dramaturg.context(store="big"):
        for first in range(0, ahead, 1000):
            sync.send_many(range(first, min(ahead, first + 1000)))
    with dramaturg.context(store="small"):
        sync.send_many(range(10))
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    began = time.monotonic()
    cpu0 = time.process_time()
    worker.start()
    if not small_done.wait(timeout=600):
        raise SystemExit(f"the small store's tasks did not all start ({len(started['small'])} of 10)")
    seconds, cpu = time.monotonic() - began, time.process_time() - cpu0
    big = len(started["big"])
    worker.stop()
    dramaturg.shutdown()
    broker.close()  # embedded: detach, so that the server stops
    first = min(started["small"]) - began
    return {
        "seconds": seconds,
        "first_s": first,
        "ms_per_ahead": seconds / ahead * 1000,
        "cpu_s": cpu,
        "big_started": big,
    }


def run_processes(url: str, state: str | None, ahead: int, processes: int, threads: int) -> dict[str, float]:
    """The same, with ``dramaturg worker`` processes (see the module)."""
    import redis

    log_url = state or url
    if url.startswith("embedded://"):
        raise SystemExit("--processes: use --broker redis or rabbitmq (the log needs a Redis URL)")
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    env = dict(
        os.environ,
        DRAMATURG_BROKER_URL=url,
        DRAMATURG_BROKER_NAMESPACE=namespace,
        FAIR_LOG_URL=log_url,
        PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent / "src")]),
        **({"DRAMATURG_STATE_URL": state} if state else {}),
    )
    os.environ["FAIR_LOG_URL"] = log_url
    dramaturg.bootstrap(
        dramaturg.Settings(broker={"url": url, "namespace": namespace}, **({"state": {"url": state}} if state else {}))
    )
    sys.path.insert(0, str(HERE))
    import fairness_app

    with dramaturg.context(store="big"):
        for first in range(0, ahead, 1000):
            fairness_app.sync.send_many(range(first, min(ahead, first + 1000)))
    with dramaturg.context(store="small"):
        fairness_app.sync.send_many(range(10))
    dramaturg.shutdown()
    log = redis.Redis.from_url(log_url)
    began = time.time()
    worker = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("dramaturg")),
            "worker",
            "-p",
            str(processes),
            "-t",
            str(threads),
            "fairness_app",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while log.llen("fair:small") < 10:
            if time.time() - began > 600 or worker.poll() is not None:
                raise SystemExit(f"the small store's tasks did not all start ({log.llen('fair:small')} of 10)")
            time.sleep(0.05)
        small = sorted(float(at) for at in log.lrange("fair:small", 0, -1))
        big = log.llen("fair:big")
    finally:
        worker.terminate()
        worker.wait(120)
    seconds = small[-1] - began
    return {
        "seconds": seconds,
        "first_s": small[0] - began,
        "ms_per_ahead": seconds / ahead * 1000,
        "cpu_s": 0.0,  # not counted: the worker is other processes
        "big_started": big,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=("redis", "rabbitmq", "embedded"), default="redis")
    parser.add_argument("--ahead", type=int, default=2000, help="the big store's tasks queued first (default: 2000)")
    parser.add_argument("--threads", type=int, default=8, help="worker threads (default: 8)")
    parser.add_argument(
        "--processes", type=int, default=0, help="run `dramaturg worker -p N` (default: in this process)"
    )
    args = parser.parse_args()
    with servers(args.broker) as (url, state):
        if args.processes:
            result = run_processes(url, state, args.ahead, args.processes, args.threads)
        else:
            result = run_once(url, state, args.ahead, args.threads)
    cpu = f" {result['cpu_s']:.1f} s CPU;" if args.processes == 0 else ""
    print(
        f"{args.broker}: {args.ahead} ahead, {args.processes or 1} x {args.threads} threads: the small store's"
        f" first started after {result['first_s']:.2f} s, its ten after {result['seconds']:.2f} s"
        f" ({result['ms_per_ahead']:.2f} ms per task ahead;{cpu}"
        f" {result['big_started']:.0f} of the big store's started meanwhile)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
