"""What a batch member's end costs Redis in the acknowledgement call, by Redis's own clock.

On Redis a member's end is written by the script that acknowledges it (``settle.lua``,
with ``batch.lua``'s end step), so a member's whole extra cost in Redis is in that call.
This times the call where it runs: on a private Redis, messages are claimed as a worker
claims them (in its acknowledgement set, their bodies in the queue's hash), then settled
with ``settle.lua`` as the worker's group commit sends them, ``--per-call`` messages a
call, in chunks of 1,000 alternating plain messages and members of one sealed batch of
``--count``. Redis's ``INFO commandstats`` gives the microseconds it spent in the calls
(``EVALSHA``, what the scripts' own commands took included; not the network, not the
client), read around each chunk. No worker runs: the figure is the script's alone, steady
enough to compare two versions of ``batch.lua`` in minutes (a drain in
``benchmarks/batches.py`` scatters more than a member's whole cost; the counts of
``benchmarks/batch_instructions.py`` leave out what an instruction costs in time).

A real drain's calls carry about 4.6 messages each on the 2-core machine (2 worker
processes of 8 threads, 2026-12-03, counted with ``INFO commandstats`` during
``benchmarks/batches.py``).

    python benchmarks/settle_cost.py                    # 1, 5 and 8 messages a call, 3 rounds
    python benchmarks/settle_cost.py --per-call 5 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import redis  # noqa: E402
from drain_rounds import private_redis  # noqa: E402

from dramaturg.batches.state import RedisBatchState  # noqa: E402
from dramaturg.brokers.redis import settling  # noqa: E402

CHUNK = 1000
BODY = (
    b'{"queue_name":"q","actor_name":"noop","args":[1],"kwargs":{},"options":{},"message_id":"x","message_timestamp":1}'
)


def run(url: str, count: int, per_call: int) -> dict[str, float]:
    """Microseconds of Redis per message settled, plain and as batch members, at ``per_call``."""
    client = redis.Redis.from_url(url)
    client.flushall()
    state = RedisBatchState(client, namespace="bench", ttl_ms=3_600_000)
    state.create("b", {"name": "bench", "created_at": "1"})
    members = [f"m{i:08d}" for i in range(count)]
    for start in range(0, count, CHUNK):
        state.add("b", members[start : start + CHUNK])
    state.seal("b")
    plain = [f"p{i:08d}" for i in range(count)]
    # The broker's own settler: the calls' arguments laid out as a worker's group commit lays them out.
    settler = settling.Settler(client, "bench", "w")
    spent = {"plain": [0, 0], "batch": [0, 0]}
    try:
        for start in range(0, count, CHUNK):
            modes = ("plain", "batch") if (start // CHUNK) % 2 else ("batch", "plain")
            for mode in modes:
                ids = (plain if mode == "plain" else members)[start : start + CHUNK]
                with client.pipeline(transaction=False) as pipe:
                    pipe.sadd("bench:__acks__.w.q", *ids)
                    pipe.hset("bench:q.msgs", mapping=dict.fromkeys(ids, BODY))
                    pipe.execute()
                before = _usec(client)
                for i in range(0, len(ids), per_call):
                    group: list[tuple[Any, ...]] = [
                        ("A", "q", redis_id, state.prefix, state.ttl_ms, "b", redis_id, "s")
                        if mode == "batch"
                        else ("a", "q", redis_id)
                        for redis_id in ids[i : i + per_call]
                    ]
                    answers = settler._send_group(group)
                    if not all(answer == 1 for answer in answers if not isinstance(answer, list)):
                        raise SystemExit(f"settle.lua answered {answers}")
                spent[mode][0] += _usec(client) - before
                spent[mode][1] += len(ids)
        status = state.read("b")
        assert status is not None and status[0]["succeeded"] == str(count), status
    finally:
        settler.close()
    return {mode: usec / done for mode, (usec, done) in spent.items()}


def _usec(client: redis.Redis) -> int:
    return int(client.info("commandstats")["cmdstat_evalsha"]["usec"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=30_000, help="messages a mode (default: 30000)")
    parser.add_argument(
        "--per-call", type=int, nargs="+", default=[1, 5, 8], help="messages an acknowledgement call (default: 1 5 8)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the median shown (default: 3)")
    args = parser.parse_args()
    print("| messages a call | plain (us/msg) | batch member (us/msg) | a member adds (us) | per round |")
    print("|---:|---:|---:|---:|---|")
    with private_redis("bench-settle-") as url:
        for per_call in args.per_call:
            rounds = [run(url, args.count, per_call) for _ in range(args.rounds)]
            adds = [r["batch"] - r["plain"] for r in rounds]
            print(
                f"| {per_call} | {statistics.median(r['plain'] for r in rounds):.2f} "
                f"| {statistics.median(r['batch'] for r in rounds):.2f} | **{statistics.median(adds):.2f}** "
                f"| {', '.join(f'{a:.2f}' for a in adds)} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
