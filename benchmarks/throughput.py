"""Throughput, latency and memory: dramaturg vs bare Dramatiq, same broker, same run.

For each broker and each configuration below, in interleaved rounds:

1. enqueue N no-op messages one by one from a fresh process (msgs/s);
2. start ``dramatiq bench_app -p 2 -t 8`` and time the drain from the first processed
   message to the last (msgs/s; worker start-up is excluded), and the CPU time the
   worker processes spent meanwhile (us/msg: steadier than the rate on a machine whose
   brokers share the cores);
3. with the worker idle, send latency probes (one every 10 ms) and take the end-to-end
   latency from send to processed (p50, p95, ms);
4. read the peak RSS of the worker processes (MB), then stop the worker with SIGTERM.

Medians over the rounds are printed as a Markdown table, with the ratio of dramaturg to
bare Dramatiq configured like it (same prefetch, same publisher confirms) and to bare
Dramatiq with its defaults. ``--write FILE`` also writes the table with the machine and
versions. Brokers default to the machine's own (127.0.0.1:6379, 127.0.0.1:5672).

    python benchmarks/throughput.py                         # both brokers, 20,000 msgs, 3 rounds
    python benchmarks/throughput.py --brokers redis --count 5000 --rounds 1
    python benchmarks/throughput.py --brokers redis --metrics   # also dramaturg with metrics on
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from dramaturg.middleware.worker_config import DEFAULT_PREFETCH  # noqa: E402


@dataclass(frozen=True)
class Config:
    label: str
    system: str
    env: dict[str, str] = field(default_factory=dict)
    role: str = ""  # "baseline" (configured like dramaturg), "default", "subject", "variant"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


#: Where the metrics variant serves its metrics (nothing scrapes them: counting is what costs).
METRICS = {"DRAMATURG_WORKER_METRICS_PORT": str(free_port())}


def configs(broker: str, redis_url: str, metrics: bool = False) -> list[Config]:
    prefetch = str(DEFAULT_PREFETCH[broker])
    no_priorities = {"BENCH_SETTINGS": json.dumps({"broker": {"priorities": False}})}
    with_metrics = [Config("dramaturg, metrics on", "dramaturg", METRICS, "variant")] if metrics else []
    if broker == "redis":
        return [
            Config("Dramatiq, defaults", "dramatiq", {}, "default"),
            Config(f"Dramatiq, prefetch {prefetch}", "dramatiq", {"dramatiq_queue_prefetch": prefetch}, "baseline"),
            Config("dramaturg, defaults (3 lanes, task states)", "dramaturg", {}, "subject"),
            Config("dramaturg, priorities = false", "dramaturg", no_priorities, "variant"),
            Config(
                "dramaturg, [state] enabled = false",
                "dramaturg",
                {"BENCH_SETTINGS": json.dumps({"state": {"enabled": False}})},
                "variant",
            ),
            *with_metrics,
        ]
    return [
        Config("Dramatiq, defaults (no confirms)", "dramatiq", {}, "default"),
        Config(
            f"Dramatiq, confirms, prefetch {prefetch}, x-max-priority 2",
            "dramatiq",
            {"BENCH_CONFIRM": "1", "dramatiq_queue_prefetch": prefetch, "BENCH_MAX_PRIORITY": "2"},
            "baseline",
        ),
        Config("dramaturg, defaults (confirms, 3 bands)", "dramaturg", {}, "subject"),
        Config("dramaturg, priorities = false", "dramaturg", no_priorities, "variant"),
        Config(
            "dramaturg, task states in Redis ([state] url)",
            "dramaturg",
            {"BENCH_SETTINGS": json.dumps({"state": {"url": redis_url}})},
            "variant",
        ),
        *with_metrics,
    ]


@dataclass
class Result:
    enqueue: float
    drain: float
    cpu_us: float
    p50_ms: float
    p95_ms: float
    rss_mb: float


def reset(url: str) -> None:
    """Remove the benchmark's queues and keys from the broker."""
    if url.startswith("amqp"):
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        for name in ("bench", "bench.DQ", "bench.XQ"):
            channel.queue_delete(name)
        connection.close()
    else:
        import redis

        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter("bench-*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def counts(directory: Path) -> tuple[int, list[float]]:
    processed, latencies = 0, []
    for path in directory.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        processed += data["processed"]
        latencies += data["latencies_ms"]
    return processed, latencies


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_for(predicate: Any, timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.005)


def stop(worker: subprocess.Popen[bytes]) -> None:
    """Stop a ``dramatiq`` worker as a user would (SIGTERM), killed after a minute."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def run_once(config: Config, url: str, args: argparse.Namespace) -> Result:
    reset(url)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DRAMATURG_", "dramatiq_"))},
        **config.env,
        "BENCH_SYSTEM": config.system,
        "BENCH_URL": url,
        "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src")]),  # this checkout, not the installed one
    }
    enqueued = subprocess.run(
        [sys.executable, str(HERE / "bench_app.py"), "enqueue", str(args.count)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    enqueue_rate = args.count / json.loads(enqueued.stdout.strip().splitlines()[-1])["seconds"]

    with tempfile.TemporaryDirectory() as directory:
        count_dir = Path(directory)
        worker = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("dramatiq")),
                "bench_app",
                "--path",
                str(HERE),
                "--processes",
                str(args.processes),
                "--threads",
                str(args.threads),
            ],
            env={**env, "BENCH_COUNT_DIR": str(count_dir)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            first = wait_for(lambda: counts(count_dir)[0] > 0, 60, "the worker never started")
            processes = children(worker.pid)
            cpu_before, processed_before = cpu_seconds(processes), counts(count_dir)[0]
            last = wait_for(lambda: counts(count_dir)[0] >= args.count, 600, "the drain never finished")
            cpu_us = (cpu_seconds(processes) - cpu_before) / max(args.count - processed_before, 1) * 1e6
            drain_rate = args.count / (last - first)

            subprocess.run(
                [sys.executable, str(HERE / "bench_app.py"), "probe", str(args.probes), "0.01"],
                env=env,
                check=True,
            )
            wait_for(lambda: counts(count_dir)[0] >= args.count + args.probes, 60, "probes never arrived")
            latencies = sorted(counts(count_dir)[1])
            rss = max((peak_rss_mb(pid) for pid in children(worker.pid)), default=0.0)
        finally:
            stop(worker)
    return Result(
        enqueue=enqueue_rate,
        drain=drain_rate,
        cpu_us=cpu_us,
        p50_ms=statistics.median(latencies),
        p95_ms=latencies[int(len(latencies) * 0.95) - 1],
        rss_mb=rss,
    )


def median_result(results: list[Result]) -> Result:
    names = ("enqueue", "drain", "cpu_us", "p50_ms", "p95_ms", "rss_mb")
    return Result(*(statistics.median(getattr(r, name) for r in results) for name in names))


def publish(lines: list[str], write: str | None) -> int:
    """Print the table, and write it to ``write`` when given (the benchmarks' last step)."""
    table = "\n".join(lines)
    print(table)
    if write:
        Path(write).write_text(table + "\n")
    return 0


def machine() -> list[str]:
    import dramatiq

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return [
        f"- machine: {os.cpu_count()} cores, {cpu}, {platform.platform()}",
        f"- Python {platform.python_version()}, Dramatiq {dramatiq.__version__}",
    ]


def server_versions(urls: dict[str, str]) -> list[str]:
    lines = []
    if "redis" in urls:
        import redis

        client = redis.Redis.from_url(urls["redis"])
        lines.append(f"- Redis {client.info()['redis_version']} at {urls['redis']}")
        client.close()
    if "rabbitmq" in urls:
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(urls["rabbitmq"]))
        version = connection._impl.server_properties.get("version", b"?")
        lines.append(f"- RabbitMQ {version.decode() if isinstance(version, bytes) else version}")
        connection.close()
    return lines


def selected(broker: str, args: argparse.Namespace) -> list[Config]:
    """The configurations to run: all, or those ``--only`` names (baselines always)."""
    return [
        config
        for config in configs(broker, args.redis_url, args.metrics)
        if not args.only or config.role in {"baseline", "default"} or any(text in config.label for text in args.only)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", nargs="+", default=["redis", "rabbitmq"], choices=["redis", "rabbitmq"])
    parser.add_argument("--count", type=int, default=20_000, help="messages per run (default: 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker process (default: 8)")
    parser.add_argument("--probes", type=int, default=200, help="latency probes per run (default: 200)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15", help="(default: %(default)s)")
    parser.add_argument(
        "--rabbitmq-url", default="amqp://guest:guest@127.0.0.1:5672/%2F", help="(default: %(default)s)"
    )
    parser.add_argument("--only", metavar="TEXT", nargs="+", help="only the configurations whose label has TEXT")
    parser.add_argument("--metrics", action="store_true", help="also run dramaturg with its Prometheus metrics on")
    parser.add_argument("--write", metavar="FILE", help="also write the table to FILE (e.g. benchmarks/RESULTS.md)")
    args = parser.parse_args()
    urls = {"redis": args.redis_url, "rabbitmq": args.rabbitmq_url}
    urls = {broker: urls[broker] for broker in args.brokers}

    results: dict[tuple[str, str], list[Result]] = {}
    for round_number in range(args.rounds):
        for broker, url in urls.items():
            order = selected(broker, args)
            order = order[round_number % len(order) :] + order[: round_number % len(order)]
            for config in order:
                result = run_once(config, url, args)
                results.setdefault((broker, config.label), []).append(result)
                print(
                    f"round {round_number + 1} {broker:8} {config.label:52} enqueue {result.enqueue:8,.0f}/s"
                    f"  drain {result.drain:8,.0f}/s  cpu {result.cpu_us:5.0f} us/msg  p50 {result.p50_ms:5.1f} ms"
                    f"  rss {result.rss_mb:5.1f} MB",
                    file=sys.stderr,
                    flush=True,
                )

    lines = [
        f"{args.count:,} no-op messages per run, worker {args.processes} processes x {args.threads} threads,"
        f" medians of {args.rounds} interleaved rounds; latency from {args.probes} probes sent 10 ms apart"
        " to an idle worker.",
        "",
        "| broker | system | enqueue msgs/s | drain msgs/s | worker CPU us/msg | latency p50 / p95 ms |"
        " worker peak RSS MB | enqueue vs like-configured Dramatiq | drain vs like-configured Dramatiq |"
        " CPU/msg vs like-configured Dramatiq | drain vs Dramatiq defaults |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for broker in urls:
        by_role = {c.role: median_result(results[(broker, c.label)]) for c in selected(broker, args)}
        for config in selected(broker, args):
            r = median_result(results[(broker, config.label)])
            ratios = ["", "", "", ""]
            if config.role in {"subject", "variant"} and {"baseline", "default"} <= by_role.keys():
                ratios = [
                    f"{r.enqueue / by_role['baseline'].enqueue:.2f}x",
                    f"{r.drain / by_role['baseline'].drain:.2f}x",
                    f"{r.cpu_us / by_role['baseline'].cpu_us:.2f}x",
                    f"{r.drain / by_role['default'].drain:.2f}x",
                ]
            lines.append(
                f"| {broker} | {config.label} | {r.enqueue:,.0f} | {r.drain:,.0f} | {r.cpu_us:.0f}"
                f" | {r.p50_ms:.1f} / {r.p95_ms:.1f} | {r.rss_mb:.0f} | {' | '.join(ratios)} |"
            )
    lines += ["", *machine(), *server_versions(urls)]
    return publish(lines, args.write)


if __name__ == "__main__":
    sys.exit(main())
