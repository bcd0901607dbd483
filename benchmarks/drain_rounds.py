"""What the drain benchmarks share: a private Redis, interleaved rounds, a table of medians.

``batches.py``, ``cancelling.py`` and ``flow.py`` each drain the same no-op tasks in a
few modes (a plain drain and the feature's), one worker process in the benchmark's own
process, and compare the medians::

    with private_redis("bench-flow-") as url:
        medians = interleaved(("plain", "rate"), rounds, lambda mode: run_once(mode, url, ...))
    print_table(medians, "plain", count=..., threads=..., rounds=...)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["free_port", "interleaved", "medians", "print_table", "private_rabbitmq", "private_redis", "start_redis"]

#: What one drain measures: msgs/s, and CPU us per message.
KEYS = ("rate", "us_per_msg")


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
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", directory],
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


@contextmanager
def private_redis(prefix: str) -> Iterator[str]:
    """A private Redis (see :func:`start_redis`) for the ``with`` block; its URL."""
    directory = tempfile.mkdtemp(prefix=prefix)
    server, url = start_redis(directory)
    try:
        yield url
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def private_rabbitmq(prefix: str) -> Iterator[str]:
    """A private RabbitMQ node (a free port, its own directory, no plugins) for the ``with``
    block; its AMQP URL."""
    binary = "/usr/lib/rabbitmq/bin/rabbitmq-server"
    if not os.path.exists(binary):
        raise SystemExit(f"RabbitMQ is not installed ({binary})")
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    port, dist_port = free_port(), free_port()
    (directory / "plugins").write_text("[].\n")
    (directory / "rabbitmq.conf").write_text("loopback_users.guest = true\n")
    env = {
        **os.environ,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_NODENAME": f"bench-{port}@localhost",
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "plugins"),
        "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "HOME": os.environ.get("HOME") or str(directory),
    }
    server = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the private RabbitMQ node did not start") from None
                time.sleep(0.2)
        yield f"amqp://guest:guest@127.0.0.1:{port}/%2F"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the node's Erlang processes
        server.wait()
        shutil.rmtree(directory, ignore_errors=True)


def interleaved(
    modes: Sequence[str], rounds: int, run_once: Callable[[str], dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Run each mode once per round, the order reversed every other round; the medians."""
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for round_ in range(rounds):
        for mode in modes if round_ % 2 == 0 else tuple(reversed(modes)):
            result = run_once(mode)
            results[mode].append(result)
            print(f"round {round_ + 1} {mode}: {result['rate']:,.0f} msgs/s, {result['us_per_msg']:.1f} us/msg")
    return medians(results)


def medians(results: Mapping[str, Sequence[Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Each mode's median rate and CPU per message over its rounds."""
    return {mode: {k: statistics.median(r[k] for r in rs) for k in KEYS} for mode, rs in results.items()}


def print_table(
    medians: Mapping[str, Mapping[str, float]],
    base: str,
    *,
    count: int,
    threads: int,
    rounds: int,
    broker: str = "Redis",
    labels: Mapping[str, str] | None = None,
    processes: int = 1,
    tasks: str = "no-op tasks",
) -> None:
    """The medians as a Markdown table, each mode's ratio to ``base``'s."""
    labels = labels or {}
    plain = medians[base]
    print()
    worker = f"one worker process with {threads} threads"
    if processes > 1:
        worker = f"a worker of {processes} processes with {threads} threads each"
    print(f"{count:,} {tasks}, {broker}, {worker}, median of {rounds}")
    print(f"(machine: {os.cpu_count()} cores; python {sys.version.split()[0]})")
    print()
    print(f"| | drain (msgs/s) | CPU (us/msg) | drain / {base} | CPU / {base} |")
    print("|---|---:|---:|---:|---:|")
    for mode, m in medians.items():
        print(
            f"| {labels.get(mode, mode)} | {m['rate']:,.0f} | {m['us_per_msg']:.1f} | {m['rate'] / plain['rate']:.3f}"
            f" | {m['us_per_msg'] / plain['us_per_msg']:.3f} |"
        )
