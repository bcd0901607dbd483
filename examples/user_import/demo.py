"""Import a CSV of users through the queue: send a task per row, run `dramaturg worker`, check the result.

Run it from this folder (``make demo`` does): python demo.py [--users N] [--emails eager]

It starts afresh (empties the database, the outbox, the queues and their held tasks),
generates the CSV (or takes ``--csv``), starts ``dramaturg worker`` as a subprocess,
sends one ``import_user`` task per row with ``send_many`` as one batch, shows the batch's
progress while the workers run, stops them with SIGTERM once every row is imported or
held, every welcome delivered and the batch's report mailed to the administrator, and
ends with a summary. It exits 1 unless the database, the outbox and the held tasks add
up to the input exactly, and the report says so too.

A batch needs a state store: on RabbitMQ set ``[state] url`` (or
``DRAMATURG_STATE_URL``); without one the demo says so and runs the import without a
batch (progress from the queue statistics, no report).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import users as users_file
from db import open_users
from mail import ADMIN, read_outbox, read_reports
from tasks import DATABASE, EMAILS, OUTBOX, import_user, report_import

import dramaturg
from dramaturg.bulk import Call

QUEUES = ("users", "emails", "reports")
WORKER_LOG = Path("data/worker.log")


def start_afresh(held: dramaturg.HeldStore) -> None:
    """Empty what an earlier run left: the queues, their held tasks, the table, the outbox."""
    dramaturg.get_broker().flush_all()
    for queue in QUEUES:
        held.purge(queue)
    database = open_users(DATABASE)
    database.reset()
    database.close()
    OUTBOX.unlink(missing_ok=True)


def start_worker(processes: int | None, threads: int | None) -> subprocess.Popen[bytes]:
    """``dramaturg worker`` as a user runs it, its log in data/worker.log (a pipe nobody
    read would fill up and stop it)."""
    argv = [str(Path(sys.executable).with_name("dramaturg")), "worker"]
    if processes:
        argv += ["--processes", str(processes)]
    if threads:
        argv += ["--threads", str(threads)]
    WORKER_LOG.parent.mkdir(parents=True, exist_ok=True)
    with WORKER_LOG.open("wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def rows(path: Path) -> Iterator[Call]:
    for line, row in users_file.read(path):
        yield Call(line, row)


class OutboxCounter:
    """Counts the messages in the outbox with a header (by default the welcomes) as they
    are appended, reading only what is new."""

    def __init__(self, path: Path, header: bytes = b"X-User-Id") -> None:
        self.path = path
        self.TOKEN = b"\n" + header + b": "
        self.count = 0
        self._offset = 0
        self._carry = b""  # a token may be split between two reads

    def __call__(self) -> int:
        if not self.path.exists():
            return 0
        with self.path.open("rb") as stream:
            stream.seek(self._offset)
            data = stream.read()
        self._offset += len(data)
        data = self._carry + data
        self.count += data.count(self.TOKEN)
        self._carry = data[-(len(self.TOKEN) - 1) :]
        return self.count


def wait_until_done(
    total: int,
    worker: subprocess.Popen[bytes],
    held: dramaturg.HeldStore,
    timeout_s: float,
    started: float,
    batch_id: str | None,
) -> float | None:
    """Show progress until every row is imported or held, every welcome delivered and,
    with a batch, its report mailed.

    The bar is the batch's status (members ended of members so far: the imports, and the
    welcomes they send); without a batch, the database and the queue statistics. What
    ends the wait is counted exactly. Returns when the last row was settled (seconds since
    ``started``), or None when the worker exited or the timeout passed.
    """
    from tqdm import tqdm  # type: ignore[import-untyped]

    database = open_users(DATABASE)
    delivered = OutboxCounter(OUTBOX)
    reported = OutboxCounter(OUTBOX, b"X-Import-Batch")
    rows_done_at: float | None = None
    unit = " tasks" if batch_id else " users"
    bar = tqdm(total=total, unit=unit, desc="importing", dynamic_ncols=True, disable=None)
    try:
        while True:
            if worker.poll() is not None:
                bar.close()
                print(f"the worker exited early with code {worker.returncode}; see {WORKER_LOG}", file=sys.stderr)
                return None
            if time.perf_counter() - started > timeout_s:
                bar.close()
                print(f"gave up after {timeout_s:.0f} s; see {WORKER_LOG}", file=sys.stderr)
                return None
            imported = database.count()
            if batch_id is not None:
                status = dramaturg.batch_status(batch_id)
                bar.total = max(status.total, total)
                bar.update(status.ended - bar.n)
                bar.set_postfix_str(
                    f"held {status.held:,}, running {status.running}, {status.percent:.0f}%", refresh=False
                )
                finished = status.state == "complete" and reported() >= 1
            else:
                stats = {row.queue: row for row in dramaturg.queue_stats(list(QUEUES))}
                waiting = {
                    name: (row.ready or 0) + (row.delayed or 0) + (row.in_flight or 0) for name, row in stats.items()
                }
                bar.update(imported + (stats["users"].held or 0) - bar.n)
                bar.set_postfix_str(
                    f"e-mails queued {waiting['emails']:,}, held {stats['users'].held or 0:,}", refresh=False
                )
                finished = rows_done_at is not None and delivered() >= imported
            if rows_done_at is None and imported + held.count("users") == total:
                rows_done_at = time.perf_counter() - started
            if rows_done_at is not None and finished:
                bar.update(bar.total - bar.n)
                bar.close()
                return rows_done_at
            time.sleep(0.25)
    finally:
        database.close()


def summary(
    total: int,
    expected: users_file.Counts | None,
    held: dramaturg.HeldStore,
    elapsed_s: float,
    emails: str,
    batch_id: str | None,
) -> bool:
    """Print what happened; True when the database, outbox and held tasks add up to the input."""
    database = open_users(DATABASE)
    imported = {user.id: user.email for user in database.all()}
    database.close()
    messages = list(read_outbox(OUTBOX))
    delivered = dict(messages)
    reasons = [task.reason for task in held.list("users", limit=total)]
    kinds = Counter(next((kind for kind in users_file.BAD_KINDS if kind in reason), "other") for reason in reasons)
    rate = total / elapsed_s if elapsed_s else 0.0

    print(f"imported   {len(imported):>9,} users into {DATABASE}")
    print(f"e-mails    {len(messages):>9,} welcomes in {OUTBOX} ({emails})")
    print(f"held       {len(reasons):>9,} rows: " + ", ".join(f"{n:,} {kind}" for kind, n in sorted(kinds.items())))
    print(f"elapsed    {elapsed_s:>9.1f} s: {rate:,.0f} users/s ({total:,} rows, first send to last welcome)")

    problems = []
    if batch_id is not None:
        reports = [(subject, body) for batch, subject, body in read_reports(OUTBOX) if batch == batch_id]
        said = f"{len(imported):,} users imported, {len(reasons):,} rows held"
        for subject, _ in reports[:1]:
            print(f"report     mailed to {ADMIN}: {subject!r} (the batch's on_complete)")
        if len(reports) != 1:
            problems.append(f"{len(reports)} reports of batch {batch_id} in the outbox, not 1")
        elif said not in reports[0][0]:
            problems.append(f"the report says {reports[0][0]!r}; the import has {said}")
    if len(imported) + len(reasons) != total:
        problems.append(f"imported + held = {len(imported) + len(reasons):,}, the input has {total:,} rows")
    if len(messages) != len(delivered):
        problems.append(f"{len(messages) - len(delivered):,} welcomes delivered twice")
    if delivered != imported:
        wrong = sum(1 for user_id, email in imported.items() if delivered.get(user_id) != email)
        problems.append(f"{wrong:,} users without their welcome, {len(set(delivered) - set(imported)):,} strays")
    if expected is not None:
        wanted = Counter(
            dict(
                zip(
                    users_file.BAD_KINDS,
                    (expected.missing_email, expected.malformed_email, expected.duplicate_id),
                    strict=True,
                )
            )
        )
        if +wanted != +kinds:
            problems.append(f"held {dict(kinds)}, the file has {dict(wanted)} bad rows")
    for problem in problems:
        print(f"FAILED: {problem}")
    if not problems:
        print("OK: every row is imported or held, and every imported user has one welcome.")
    if reasons:
        print("next: dramaturg held list users     # which rows, and why")
        print("      dramaturg held show ID        # one of them, everything about it")
        print("      dramaturg held kick users ID  # import it again once it is fixed (or purge)")
    if batch_id is not None:
        print(f"      dramaturg batch show {batch_id}  # the batch: counts, rate, when it ended")
    return not problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20_000, help="users to generate (default: 20000)")
    parser.add_argument("--seed", type=int, default=7, help="of the generated file (default: 7)")
    parser.add_argument("--csv", type=Path, help="import this file instead (columns id,email,name)")
    parser.add_argument(
        "--emails",
        choices=("queued", "eager"),
        help="queued: a task per welcome; eager: sent inside import_user (default: USER_IMPORT_EMAILS, else queued)",
    )
    parser.add_argument("--processes", type=int, help="worker processes (default: worker.processes)")
    parser.add_argument("--threads", type=int, help="threads per worker process (default: worker.threads)")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds (default: 600)")
    parser.add_argument(
        "--no-batch", action="store_true", help="no batch and no report (to measure what the batch costs)"
    )
    args = parser.parse_args()
    emails = args.emails or EMAILS
    os.environ["USER_IMPORT_EMAILS"] = emails  # for the workers, which read it at import

    settings = dramaturg.load_settings()
    broker = dramaturg.bootstrap(settings)
    print(f"broker: {settings.broker.type} ({broker!r}), config: {settings.config_file}")
    held = dramaturg.held_tasks()
    start_afresh(held)

    if args.csv:
        path, expected = args.csv, None
        total = sum(1 for _ in users_file.read(path))
        print(f"{path}: {total:,} rows")
    else:
        path = Path("data/users.csv")
        expected = users_file.generate(path, args.users, seed=args.seed)
        total = expected.rows
        print(
            f"{path}: {total:,} users generated, {expected.bad:,} of them bad ({expected.missing_email:,} missing"
            f" e-mail, {expected.malformed_email:,} malformed e-mail, {expected.duplicate_id:,} duplicate id)"
        )

    worker = start_worker(args.processes, args.threads)
    try:
        started = time.perf_counter()
        batch: dramaturg.Batch | contextlib.nullcontext[None] = contextlib.nullcontext()
        try:
            # One batch: the imports and the welcomes they send; when all have ended, the report.
            if not args.no_batch:
                batch = dramaturg.batch(
                    # message_with_options: the summary, the handler's last argument, comes from the
                    # batch (.message() would have the type checker ask for it here).
                    f"import {path.name}",
                    on_complete=report_import.message_with_options(args=(path.name,)),
                )
        except dramaturg.StateUnavailable as error:
            print(f"no batch ({error}): progress from the queue statistics, and no report")
        with batch, dramaturg.context(source=path.name):
            sent = import_user.send_many(rows(path))
        batch_id = batch.id if isinstance(batch, dramaturg.Batch) else None
        print(
            f"sent {sent.sent:,} import_user tasks in {sent.seconds:.1f} s ({sent.rate:,.0f}/s)"
            + (f" as batch {batch_id}" if batch_id else "")
            + "; workers running"
        )
        rows_done_s = wait_until_done(total, worker, held, args.timeout, started, batch_id)
        if rows_done_s is None:
            return 1
        elapsed_s = time.perf_counter() - started
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=120)

    print(f"every row imported or held after {rows_done_s:.1f} s ({total / rows_done_s:,.0f} rows/s)")
    ok = summary(total, expected, held, elapsed_s, emails, batch_id)
    if code != 0:
        print(f"FAILED: the worker exited with code {code} on SIGTERM; see {WORKER_LOG}")
    dramaturg.shutdown()
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parent)
    sys.exit(main())
