"""Send one scenario's messages with a system's ordinary API; print the seconds it took.

    python peer_apps/enqueue.py SYSTEM SCENARIO COUNT [--bulk]

SYSTEM is ``dramaturg`` or ``dramatiq`` (``bench_app``'s ``peer_*`` actors), ``celery``,
``rq`` or ``huey``; the broker URL comes from ``BENCH_URL``. Messages go one by one
(``send``, ``delay``, ``enqueue``, a call), or with ``--bulk`` through dramaturg's
``send_many``. The arguments are built before the clock starts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peer_apps import work


def arguments(scenario: str, count: int) -> list[Any]:
    return work.user_rows(count) if scenario == "import" else list(range(count))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=["dramaturg", "dramatiq", "celery", "rq", "huey"])
    parser.add_argument("scenario", choices=sorted(work.TASKS))
    parser.add_argument("count", type=int)
    parser.add_argument("--bulk", action="store_true", help="dramaturg's send_many (default: one by one)")
    args = parser.parse_args()
    items = arguments(args.scenario, args.count)

    if args.system in {"dramaturg", "dramatiq"}:
        os.environ["BENCH_SYSTEM"] = args.system
        app = importlib.import_module("bench_app")
        actor = {"noop": app.peer_noop, "sleep": app.peer_sleep, "import": app.peer_import_user}[args.scenario]
        send, close = actor.send, app.broker.close
    else:
        app = importlib.import_module(f"peer_apps.{args.system}_app")
        send, close = app.sender(args.scenario), app.close

    started = time.perf_counter()
    if args.bulk:
        actor.send_many(items)
    else:
        for item in items:
            send(item)
    seconds = time.perf_counter() - started
    close()
    print(json.dumps({"seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
