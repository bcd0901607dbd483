"""Enqueue rate: dramaturg's send_many against bare Dramatiq's one-by-one send.

For each broker, in interleaved rounds: bare Dramatiq sends N messages with ``send()``
(on RabbitMQ with publisher confirms, as dramaturg always has them), then dramaturg
sends N with ``send_many`` (Redis: a MULTI/EXEC per chunk; RabbitMQ: a window of
publishes, then their confirms). Prints a table of medians and writes it with
``--write``. Uses Redis db 15 at 127.0.0.1:6379 and RabbitMQ at 127.0.0.1:5672 (what
``make bench`` uses), flushing/deleting only its own queues.

    python benchmarks/bulk_send.py --count 50000 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import dramatiq  # noqa: E402
import pika  # noqa: E402
import redis  # noqa: E402
from dramatiq.brokers.rabbitmq import RabbitmqBroker  # noqa: E402
from dramatiq.brokers.redis import RedisBroker  # noqa: E402

import dramaturg  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/15"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def bare_dramatiq(kind: str, count: int) -> float:
    if kind == "redis":
        broker: dramatiq.Broker = RedisBroker(url=REDIS_URL, namespace=f"bulk-{uuid.uuid4().hex[:6]}")
    else:
        broker = RabbitmqBroker(url=AMQP_URL, confirm_delivery=True)
    queue = f"bulk-dramatiq-{uuid.uuid4().hex[:6]}"

    @dramatiq.actor(broker=broker, queue_name=queue, actor_name=f"noop_{uuid.uuid4().hex[:6]}")
    def noop(n: int) -> None: ...

    started = time.perf_counter()
    for n in range(count):
        noop.send(n)
    rate = count / (time.perf_counter() - started)
    cleanup(kind, broker, queue)
    return rate


def dramaturg_bulk(kind: str, count: int, chunk: int) -> float:
    url = REDIS_URL if kind == "redis" else AMQP_URL
    broker = dramaturg.bootstrap(dramaturg.Settings(broker={"url": url, "namespace": f"bulk-{uuid.uuid4().hex[:6]}"}))
    queue = f"bulk-dramaturg-{uuid.uuid4().hex[:6]}"

    @dramaturg.actor(queue_name=queue, actor_name=f"noop_{uuid.uuid4().hex[:6]}")
    def noop(n: int) -> None: ...

    result = noop.send_many(range(count), chunk_size=chunk)
    cleanup(kind, broker, queue)
    dramaturg.shutdown()
    return result.rate


def cleanup(kind: str, broker: dramatiq.Broker, queue: str) -> None:
    if kind == "redis":
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"{broker.namespace}:*"):  # type: ignore[attr-defined]
            client.delete(key)
        client.close()
    else:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = connection.channel()
        for name in broker.get_declared_queues():
            for suffix in ("", ".DQ", ".XQ", ".HQ"):
                channel.queue_delete(name + suffix)
        connection.close()
    broker.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", nargs="+", default=["redis", "rabbitmq"], choices=["redis", "rabbitmq"])
    parser.add_argument("--count", type=int, default=50_000, help="messages per run (default: 50000)")
    parser.add_argument("--chunk", type=int, default=1_000, help="send_many chunk size (default: 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--write", metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args()

    rates: dict[tuple[str, str], list[float]] = {}
    for round_number in range(1, args.rounds + 1):
        for kind in args.brokers:
            for system, run in (
                ("Dramatiq send(), one by one", lambda k=kind: bare_dramatiq(k, args.count)),
                (f"dramaturg send_many(chunk {args.chunk})", lambda k=kind: dramaturg_bulk(k, args.count, args.chunk)),
            ):
                rate = run()
                rates.setdefault((kind, system), []).append(rate)
                print(f"round {round_number} {kind:8} {system:36} {rate:>10,.0f} msgs/s", flush=True)

    lines = [
        f"{args.count:,} messages per run, medians of {args.rounds} interleaved rounds;"
        " RabbitMQ with publisher confirms on both sides.",
        "",
        "| broker | system | enqueue msgs/s | vs Dramatiq |",
        "|---|---|---:|---:|",
    ]
    for kind in args.brokers:
        base = statistics.median(rates[(kind, "Dramatiq send(), one by one")])
        for (broker_kind, system), values in rates.items():
            if broker_kind == kind:
                rate = statistics.median(values)
                lines.append(f"| {kind} | {system} | {rate:,.0f} | {rate / base:.1f}x |")
    from throughput import publish

    return publish(lines, args.write)


if __name__ == "__main__":
    sys.exit(main())
