"""Recovery after ``kill -9``: dramaturg vs bare Dramatiq on Redis, same run.

In interleaved rounds, for each system:

1. start two idle workers, each its own process group with one process and one thread
   (Dramatiq's main process stops its other worker processes when one dies, so the
   survivor must be separate): ``dramaturg worker`` with its defaults, or ``dramatiq``
   on a plain ``dramatiq.brokers.redis.RedisBroker``; both with the same heartbeat
   timeout (5 s) on a private redis-server;
2. send one task whose first run blocks; kill the worker process running it with SIGKILL;
3. time from the kill to the task starting again on the other worker, capped (120 s).

The private redis-server listens on 127.0.0.1 on a free port, with no persistence; it is
started and stopped by pid. This file is also the workers' actor module (``recovery``).

    python benchmarks/recovery.py                    # 3 rounds, heartbeat timeout 5 s, cap 120 s
    python benchmarks/recovery.py --rounds 5 --write /tmp/recovery.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
QUEUE = "recovery"
READY = "Worker process is ready for action."
SYSTEMS = ("dramaturg", "dramatiq")


# -- the workers' side: imported as `recovery` by dramatiq / dramaturg worker ----------


def _record(event: str) -> None:
    fd = os.open(os.environ["RECOVERY_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{event} {os.getpid()} {time.time():.3f}\n".encode())
    finally:
        os.close(fd)


def stall(first_run_s: float) -> None:
    """Block ``first_run_s`` on the first run (as the log shows), return at once after."""
    log = Path(os.environ["RECOVERY_LOG"])
    again = log.is_file() and "start" in log.read_text()
    _record("start")
    if not again:
        time.sleep(first_run_s)


if __name__ != "__main__" and os.environ.get("RECOVERY_SYSTEM") == "dramaturg":
    import dramaturg

    dramaturg.actor(actor_name="stall", queue_name=QUEUE)(stall)
elif __name__ != "__main__" and os.environ.get("RECOVERY_SYSTEM") == "dramatiq":
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(
        url=os.environ["RECOVERY_URL"],
        namespace=os.environ["RECOVERY_NAMESPACE"],
        heartbeat_timeout=int(os.environ["RECOVERY_HEARTBEAT_TIMEOUT_MS"]),
    )
    dramatiq.set_broker(broker)
    dramatiq.actor(actor_name="stall", queue_name=QUEUE, broker=broker)(stall)


# -- the runner ---------------------------------------------------------------------------


class Worker:
    """A worker process group whose merged output is collected line by line."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.popen = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait_for_line(self, needle: str, timeout: float = 60.0) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: any(needle in line for line in self.lines), timeout):
                raise TimeoutError(f"{needle!r} never appeared:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        """SIGTERM to the main process (it stops its worker process), SIGKILL to the group if stuck."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on 127.0.0.1 and a free port, without persistence."""
    import redis

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        binary = shutil.which("redis-server") or "redis-server"
        server = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                directory,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            client = redis.Redis.from_url(url)
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        break
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the private redis-server did not start")
                time.sleep(0.02)  # a starting server: no event to wait on
            client.close()
            yield url
        finally:
            server.terminate()
            server.wait(timeout=30)


def starts(log: Path) -> list[tuple[int, float]]:
    if not log.is_file():
        return []
    return [(int(pid), float(at)) for event, pid, at in (line.split() for line in log.read_text().splitlines())]


def wait_for_start(log: Path, count: int, timeout: float) -> tuple[int, float] | None:
    """The ``count``-th start line, polled (written by other processes), or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        found = starts(log)
        if len(found) >= count:
            return found[count - 1]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)  # the time measured is the one the task wrote, not when this loop saw it


def run_once(system: str, url: str, namespace: str, args: argparse.Namespace) -> float | None:
    """Seconds from the kill to the re-run's start, or None if it did not start within the cap."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        log = workdir / "starts.log"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DRAMATURG_", "dramatiq_"))},
            "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)]),  # this checkout's dramaturg first
            "RECOVERY_SYSTEM": system,
            "RECOVERY_LOG": str(log),
        }
        if system == "dramaturg":
            env |= {
                "DRAMATURG_BROKER_URL": url,
                "DRAMATURG_BROKER_NAMESPACE": namespace,
                "DRAMATURG_BROKER_HEARTBEAT_TIMEOUT": str(args.heartbeat_timeout),
                "DRAMATURG_WORKER_MODULES": "recovery",
            }
            argv = [str(Path(sys.executable).with_name("dramaturg")), "worker", "-p", "1", "-t", "1"]
        else:
            env |= {
                "RECOVERY_URL": url,
                "RECOVERY_NAMESPACE": namespace,
                "RECOVERY_HEARTBEAT_TIMEOUT_MS": str(args.heartbeat_timeout),
            }
            argv = [str(Path(sys.executable).with_name("dramatiq")), "recovery", "-p", "1", "-t", "1"]
        workers = [Worker(argv, env, workdir) for _ in range(2)]
        sender = RedisBroker(url=url, namespace=namespace)
        try:
            for worker in workers:
                worker.wait_for_line(READY)
            sender.enqueue(
                dramatiq.Message(queue_name=QUEUE, actor_name="stall", args=(3600.0,), kwargs={}, options={})
            )
            first = wait_for_start(log, 1, 60)
            if first is None:
                raise TimeoutError(f"the task never started ({system})")
            killed_at = time.time()
            os.kill(first[0], signal.SIGKILL)
            again = wait_for_start(log, 2, args.cap)
            return None if again is None else again[1] - killed_at
        finally:
            for worker in workers:
                worker.stop()
            keys = list(sender.client.scan_iter(f"{namespace}:*"))
            if keys:
                sender.client.delete(*keys)
            sender.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--heartbeat-timeout", type=int, default=5_000, help="ms, both systems (default: 5000)")
    parser.add_argument("--cap", type=float, default=120.0, help="seconds to wait for a re-run (default: 120)")
    parser.add_argument("--write", metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args()

    results: dict[str, list[float | None]] = {system: [] for system in SYSTEMS}
    with redis_server() as url:
        for round_number in range(args.rounds):
            order = SYSTEMS if round_number % 2 == 0 else SYSTEMS[::-1]
            for system in order:
                seconds = run_once(system, url, f"recovery-{system}-{round_number}", args)
                results[system].append(seconds)
                shown = f"{seconds:6.2f} s" if seconds is not None else f"not recovered within {args.cap:.0f} s"
                print(f"round {round_number + 1} {system:9} {shown}", file=sys.stderr, flush=True)
        import redis

        client = redis.Redis.from_url(url)
        redis_version = client.info()["redis_version"]
        client.close()

    def cell(seconds: float | None) -> str:
        return f"{seconds:.2f} s" if seconds is not None else f"not recovered within {args.cap:.0f} s"

    def median(values: list[float | None]) -> str:
        # Unrecovered runs count as longer than any recovered one.
        ordered = sorted(values, key=lambda v: float("inf") if v is None else v)
        middle = ordered[len(ordered) // 2] if len(ordered) % 2 else None
        if len(ordered) % 2 == 0:
            low, high = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
            middle = None if low is None or high is None else statistics.median([low, high])
        return cell(middle)

    from throughput import machine

    lines = [
        f"Kill -9 of the worker process running a task, an idle second worker alive; time from the kill to the"
        f" task starting again on that worker. Heartbeat timeout {args.heartbeat_timeout / 1000:g} s on both,"
        f" {args.rounds} interleaved rounds, capped at {args.cap:.0f} s.",
        "",
        "| system | " + " | ".join(f"round {n + 1}" for n in range(args.rounds)) + " | median |",
        "|---|" + "---:|" * (args.rounds + 1),
    ]
    labels = {"dramaturg": "dramaturg worker (RedisRecovery)", "dramatiq": "dramatiq worker, plain RedisBroker"}
    for system in SYSTEMS:
        cells = [cell(value) for value in results[system]]
        lines.append(f"| {labels[system]} | " + " | ".join(cells) + f" | {median(results[system])} |")
    lines += ["", *machine(), f"- Redis {redis_version}, private server on 127.0.0.1"]
    from throughput import publish

    return publish(lines, args.write)


if __name__ == "__main__":
    sys.exit(main())
