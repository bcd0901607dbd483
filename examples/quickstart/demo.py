"""Send a few thousand tasks, run `dramaturg worker` on them, print what happened.

Run it from this folder (``make demo`` does): python demo.py [--count N]
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tasks import DATABASE, make_thumbnail

import dramaturg


def processed() -> tuple[int, int]:
    """(thumbnails recorded, distinct worker processes that made them)."""
    if not Path(DATABASE).exists():
        return 0, 0
    with sqlite3.connect(DATABASE, timeout=30) as conn:
        try:
            row = conn.execute("SELECT COUNT(*), COUNT(DISTINCT pid) FROM thumbnails").fetchone()
        except sqlite3.OperationalError:  # the workers have not created the table yet
            return 0, 0
    return int(row[0]), int(row[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=5000, help="tasks to send (default: 5000)")
    parser.add_argument("--timeout", type=float, default=300, help="give up after this many seconds (default: 300)")
    args = parser.parse_args()

    for leftover in (DATABASE, DATABASE + "-wal", DATABASE + "-shm"):
        Path(leftover).unlink(missing_ok=True)

    settings = dramaturg.load_settings()
    broker = dramaturg.bootstrap(settings)
    broker.flush_all()  # a fresh start for the demo
    print(f"broker: {settings.broker.type} ({broker!r}), config: {settings.config_file}")

    started = time.perf_counter()
    for image_id in range(args.count):
        make_thumbnail.send(image_id)
    send_s = time.perf_counter() - started
    print(f"sent {args.count} tasks in {send_s:.2f} s ({args.count / send_s:,.0f} msgs/s)")

    worker_bin = str(Path(sys.executable).with_name("dramaturg"))
    worker = subprocess.Popen([worker_bin, "worker"], stderr=subprocess.PIPE, text=True)
    started = time.perf_counter()
    done = 0
    while done < args.count:
        if worker.poll() is not None:
            print(worker.stderr.read() if worker.stderr else "", file=sys.stderr)
            print(f"the worker exited early with code {worker.returncode}", file=sys.stderr)
            return 1
        if time.perf_counter() - started > args.timeout:
            worker.kill()
            print(f"gave up after {args.timeout:.0f} s with {done} of {args.count} done", file=sys.stderr)
            return 1
        time.sleep(0.25)
        done, _ = processed()
        print(f"\r  processed {done:>6} / {args.count}", end="", flush=True)
    drain_s = time.perf_counter() - started
    print()

    worker.send_signal(signal.SIGTERM)
    _, stderr = worker.communicate(timeout=120)
    done, pids = processed()
    print(f"processed {done} tasks in {drain_s:.2f} s ({done / drain_s:,.0f} tasks/s, including worker start-up)")
    print(f"worker processes that did the work: {pids}; worker exit code on SIGTERM: {worker.returncode}")
    dramaturg.shutdown()
    ok = done == args.count and worker.returncode == 0
    print("OK: every task ran, the worker stopped cleanly." if ok else "FAILED", flush=True)
    if not ok:
        print(stderr, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parent)
    sys.exit(main())
