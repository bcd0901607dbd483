"""`dramaturg stats` and `dramaturg.queue_stats()`: the same numbers on every broker,
checked against queue states the tests build (ready, delayed, in flight, held, dead,
workers), run as a user runs it. RabbitMQ's numbers come from its management API, which
lags by a statistics interval (500 ms on the test node): those tests wait for the state."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg import app
from dramaturg.cli.stats import table

from .conftest import Process, bin_path, free_port, held_task, poll_until, run_cli, write_config

REPO = Path(__file__).resolve().parents[1]
READY = "Worker process is ready for action."
WAIT_S = 30.0
HOUR_MS = 3_600_000
PER_MINUTE = {
    "processed_per_min": None,
    "failed_per_min": None,
    "retried_per_min": None,
    "held_per_min": None,
    "waiting_for_limits": None,
}


def row(queue: str, **counts: int | None) -> dict[str, Any]:
    """A queue's expected JSON row: zeros unless given, no per-minute counts unless given."""
    columns = ("ready", "delayed", "in_flight", "held", "dead", "workers")
    return {
        "queue": queue,
        **{name: counts.get(name, 0) for name in columns},
        **{name: counts.get(name, default) for name, default in PER_MINUTE.items()},
    }


def per_minute(broker_kind: str, processed: int = 0) -> dict[str, int | None]:
    """The per-minute columns and the tasks waiting for limits: counted in the state store
    (the broker's own Redis), none on RabbitMQ here (no ``[state] url``); ``processed``
    tasks all succeeded."""
    if broker_kind == "rabbitmq":
        return dict(PER_MINUTE)
    return {**dict.fromkeys(PER_MINUTE, 0), "processed_per_min": processed}


def stats(tmp_path: Path, *argv: str, **env: str) -> tuple[int, str, str]:
    result = run_cli([bin_path("dramaturg"), "stats", *argv], cwd=tmp_path, PYTHONPATH=str(REPO), **env)
    return result.returncode, result.stdout, result.stderr


def stats_rows(tmp_path: Path, *queues: str, **env: str) -> list[dict[str, Any]]:
    code, out, err = stats(tmp_path, *queues, "--json", **env)
    assert code == 0, err
    rows: list[dict[str, Any]] = json.loads(out)["queues"]
    return rows


def expect(read: Callable[[], Any], expected: Any, *, settled: bool) -> None:
    """``read()`` gives ``expected`` now (``settled``), or within WAIT_S (another process
    is getting there, or RabbitMQ's statistics have not caught up yet)."""
    if settled:
        assert read() == expected
        return
    seen: list[Any] = []

    def check() -> bool:
        seen.append(read())
        return bool(seen[-1] == expected)

    try:
        poll_until(check, "the stats to reach the expected rows", timeout=WAIT_S)
    except pytest.fail.Exception:
        assert seen[-1] == expected  # shows the difference
        raise


@pytest.fixture
def project(settings: dramaturg.Settings, broker: dramatiq.Broker, tmp_path: Path) -> Path:
    """A project whose actors use the "reports" and "emails" queues, bound to the test's broker."""
    from tests.apps import stats_tasks

    app.register(stats_tasks.gated)  # declared at the first import; isolated_app forgets them after each test
    app.register(stats_tasks.mail)
    write_config(tmp_path, settings, modules=["tests.apps.stats_tasks"])
    return tmp_path


def dead_letter(broker: dramatiq.Broker, queue: str) -> None:
    """Take one message from ``queue`` and reject it into Dramatiq's dead-letter queue."""
    consumer = broker.consume(queue, prefetch=1, timeout=100)
    try:
        message = poll_until(lambda: next(consumer), f"a message from {queue}", timeout=WAIT_S)
        consumer.nack(message)
    finally:
        consumer.close()


def known_state(broker: dramatiq.Broker) -> None:
    """reports: 10 ready, 3 delayed, 2 held, 1 dead; emails: 1 ready."""
    from tests.apps import stats_tasks

    stats_tasks.gated.send(-1)
    dead_letter(broker, "reports")
    for number in range(10):
        stats_tasks.gated.send(number)
    for number in range(3):
        stats_tasks.gated.send_with_options(args=(100 + number,), delay=HOUR_MS)
    store = dramaturg.held_tasks()
    for number in range(2):
        store.hold(held_task("reports", number, actor="gated"))
    stats_tasks.mail.send("ada@example.com")


def test_stats_count_ready_delayed_held_and_dead_exactly(
    broker_kind: str, broker: dramatiq.Broker, project: Path
) -> None:
    # Given 10 ready, 3 delayed, 2 held and 1 dead-lettered task on "reports", and no worker
    known_state(broker)
    pm = per_minute(broker_kind)
    expected = [row("reports", ready=10, delayed=3, held=2, dead=1, **pm), row("emails", ready=1, **pm)]

    # Then `dramaturg stats --json` says so, exactly (on RabbitMQ once its statistics caught up)
    settled = broker_kind != "rabbitmq"
    expect(lambda: stats_rows(project, "reports", "emails"), expected, settled=settled)

    # and the Python API returns the same rows
    assert [asdict(r) for r in dramaturg.queue_stats(["reports", "emails"])] == expected

    # and without names, every known queue, by name, never a delay, dead-letter or held queue
    rows = {r["queue"]: r for r in stats_rows(project)}
    assert rows["reports"] == expected[0] and rows["emails"] == expected[1]
    assert not [name for name in rows if name.endswith((".DQ", ".XQ", ".HQ", ".P1", ".P2"))]
    if broker_kind != "rabbitmq":  # a namespace of this test's own; a RabbitMQ node is shared
        assert list(rows) == ["emails", "reports"]


def test_the_table_has_fixed_columns_and_a_total_row(broker_kind: str, broker: dramatiq.Broker, project: Path) -> None:
    # Given the known state
    known_state(broker)
    pm = per_minute(broker_kind)
    expected = [row("reports", ready=10, delayed=3, held=2, dead=1, **pm), row("emails", ready=1, **pm)]
    expect(lambda: stats_rows(project, "reports", "emails"), expected, settled=broker_kind != "rabbitmq")

    # When the table is asked for
    code, out, err = stats(project, "reports", "emails")

    # Then a header, a row per queue in the order given, and their total; "-" where unknown
    assert code == 0, err
    header, *lines = out.splitlines()
    titles = [title.strip() for title in header.split("  ") if title.strip()]
    assert titles == [
        "queue",
        "ready",
        "delayed",
        "in flight",
        "held",
        "dead",
        "workers",
        "processed/min",
        "failed/min",
        "retried/min",
        "held/min",
        "waiting for limits",
    ]
    counted = ["-"] * 5 if broker_kind == "rabbitmq" else ["0"] * 5  # the state store's (none on RabbitMQ here)
    assert [line.split() for line in lines] == [
        ["reports", "10", "3", "0", "2", "1", "0", *counted],
        ["emails", "1", "0", "0", "0", "0", "0", *counted],
        ["total", "11", "3", "0", "2", "1", *counted],
    ]
    # numbers are right-aligned under their titles
    assert all(len(line) <= len(header) for line in lines)
    assert lines[0].index("10") + 2 == header.index("ready") + len("ready")


def test_an_unknown_queue_is_empty_with_a_note(broker_kind: str, project: Path) -> None:
    # When a queue nobody declared and the broker has nothing for is asked for
    code, out, err = stats(project, "reprots", "--json")

    # Then it is reported empty (Redis cannot tell an empty queue from a missing one),
    # and a note on stderr suggests the likely name
    assert code == 0, err
    assert json.loads(out)["queues"] == [row("reprots", **per_minute(broker_kind))]
    assert err.strip() == (
        "dramaturg: note: queue 'reprots' is not one of worker.modules' actors' and is empty; did you mean 'reports'?"
    )


def test_in_flight_and_workers_follow_a_running_worker(
    broker_kind: str, broker: dramatiq.Broker, project: Path, spawn: Callable[..., Process]
) -> None:
    from tests.apps import stats_tasks

    # Given 3 delayed, 2 held and 1 dead-lettered task, and a worker process with 2 threads
    # and a prefetch of 2, whose tasks run until the test opens a gate
    stats_tasks.gated.send(-1)
    dead_letter(broker, "reports")
    for number in range(3):
        stats_tasks.gated.send_with_options(args=(100 + number,), delay=HOUR_MS)
    store = dramaturg.held_tasks()
    for number in range(2):
        store.hold(held_task("reports", number, actor="gated"))
    log, gate = project / "stats.log", project / "gate"
    worker = spawn(
        [bin_path("dramaturg"), "worker", "-p", "1", "-t", "2"],
        PYTHONPATH=str(REPO),
        DRAMATURG_BROKER_PREFETCH="2",
        STATS_LOG=str(log),
        STATS_GATE=str(gate),
    )
    worker.wait_for_line(READY)

    # When 12 tasks are sent, and two of them are running
    for number in range(12):
        stats_tasks.gated.send(number)
    poll_until(lambda: log.exists() and len(log.read_text().splitlines()) == 2, "two tasks running")

    # Then 10 are ready and 2 in flight; the delayed ones count as delayed while the
    # worker holds them until they are due; one worker consumes each queue
    pm = per_minute(broker_kind)
    running = row("reports", ready=10, delayed=3, in_flight=2, held=2, dead=1, workers=1, **pm)
    expect(lambda: stats_rows(project, "reports", "emails"), [running, row("emails", workers=1, **pm)], settled=False)

    # When the gate opens, every task runs
    gate.touch()
    pm = per_minute(broker_kind, processed=12)
    done = row("reports", delayed=3, held=2, dead=1, workers=1, **pm)
    expect(lambda: stats_rows(project, "reports"), [done], settled=False)
    assert len(log.read_text().splitlines()) == 12

    # When the worker stops, it no longer counts, and the delayed tasks it held are still delayed
    assert worker.stop(signal.SIGTERM) == 0
    expect(lambda: stats_rows(project, "reports"), [row("reports", delayed=3, held=2, dead=1, **pm)], settled=False)


@pytest.mark.parametrize("broker_kind", ["rabbitmq"])
def test_rabbitmq_without_its_management_api_shows_what_amqp_can_tell(
    broker: dramatiq.Broker, project: Path, spawn: Callable[..., Process]
) -> None:
    from tests.apps import stats_tasks

    # Given the known state, and a management URL where nothing answers
    known_state(broker)
    nowhere = {"DRAMATURG_BROKER_MANAGEMENT_URL": f"http://guest:s3cret@127.0.0.1:{free_port()}"}

    # Then the AMQP numbers: exact while no consumer can hold messages unacknowledged,
    # and one line on stderr says how to get the rest (the password masked)
    code, out, err = stats(project, "reports", "--json", **nowhere)
    assert code == 0, err
    assert json.loads(out)["queues"] == [row("reports", ready=10, delayed=3, held=2, dead=1)]
    (note,) = err.splitlines()
    assert note.startswith("WARNING dramaturg.stats: in flight unknown (-): RabbitMQ's management API at")
    assert "rabbitmq-plugins enable rabbitmq_management" in note
    assert "guest:***@127.0.0.1" in note and "s3cret" not in note

    # When a worker consumes the queue, what it holds is unknown: "-", not a wrong 0
    worker = spawn(
        [bin_path("dramaturg"), "worker", "-p", "1", "-t", "1"],
        PYTHONPATH=str(REPO),
        DRAMATURG_BROKER_PREFETCH="1",
        STATS_LOG=str(project / "stats.log"),
        STATS_GATE=str(project / "gate"),
    )
    worker.wait_for_line(READY)
    stats_tasks.gated.send(99)
    unknown = {**row("reports", ready=10, held=2, dead=1, workers=1), "in_flight": None, "delayed": None}
    expect(lambda: stats_rows(project, "reports", **nowhere), [unknown], settled=False)
    (project / "gate").touch()
    assert worker.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize("broker_kind", ["rabbitmq", "redis"])  # the embedded broker starts its own server
def test_an_unreachable_broker_is_one_line_and_exit_3(broker_kind: str, tmp_path: Path) -> None:
    # Given a config whose broker does not answer (RabbitMQ's management API neither)
    port = free_port()
    url = {
        "rabbitmq": f"amqp://shop:s3cret@127.0.0.1:{port}/%2F",
        "redis": f"redis://:s3cret@127.0.0.1:{port}/0",
    }[broker_kind]
    lines = ["[broker]", f'url = "{url}"', 'connect_timeout = "2s"']
    if broker_kind == "rabbitmq":
        lines.append(f'management_url = "http://shop:s3cret@127.0.0.1:{free_port()}"')
    (tmp_path / "dramaturg.toml").write_text("\n".join(lines) + "\n")

    # Then one line names the masked URL, and the exit code is 3
    code, out, err = stats(tmp_path)
    assert (code, out) == (3, "")
    message = err.splitlines()[-1]
    assert message.startswith("dramaturg: cannot reach ") and ":***@127.0.0.1" in message
    assert "s3cret" not in err


def test_watch_prints_a_json_line_per_refresh_until_ctrl_c(
    broker_kind: str, project: Path, spawn: Callable[..., Process]
) -> None:
    # When stats are watched every 200 ms
    watcher = spawn([bin_path("dramaturg"), "stats", "emails", "--watch", "200ms", "--json"], PYTHONPATH=str(REPO))
    watcher.wait_for_line('"queue": "emails"')
    poll_until(lambda: watcher.output.count('"queue": "emails"') >= 2, "a second refresh")

    # Then Ctrl-C ends it with exit 0, each line one JSON document
    assert watcher.stop(signal.SIGINT) == 0
    documents = [json.loads(line) for line in watcher.lines if line.startswith("{")]
    assert len(documents) >= 2
    assert all(doc["queues"] == [row("emails", **per_minute(broker_kind))] for doc in documents)


def test_counters_fill_the_per_minute_columns() -> None:
    # Given a stub broker with two tasks ready on "reports", and a counter store's query
    from tests.apps import stats_tasks

    broker = dramaturg.bootstrap(dramaturg.Settings(broker={"url": "stub://"}))
    app.register(stats_tasks.gated)
    stats_tasks.gated.send(1)
    stats_tasks.gated.send(2)
    asked: list[list[str]] = []

    def counters(queues: Any) -> dict[str, dict[str, int]]:
        asked.append(list(queues))
        return {"reports": {"processed": 120, "failed": 3, "retried": 2, "held": 1}}

    # Then the counts fill the per-minute columns; a queue the store does not know has none
    rows = dramaturg.queue_stats(["reports", "emails"], broker, counters=counters)
    assert asked == [["reports", "emails"]]
    assert [asdict(r) for r in rows] == [
        {
            **row("reports", ready=2),
            "workers": None,
            "processed_per_min": 120,
            "failed_per_min": 3,
            "retried_per_min": 2,
            "held_per_min": 1,
            "waiting_for_limits": 0,  # flow control's store is in memory: none waits
        },
        {**row("emails"), "workers": None, "waiting_for_limits": 0},
    ]
    # and the table shows them, "-" where unknown
    assert table(rows).splitlines()[1].split() == ["reports", "2", "0", "0", "0", "0", "-", "120", "3", "2", "1", "0"]


@pytest.mark.parametrize(
    ("url", "management"),
    [
        ("amqp://shop:pw@mq.internal:5672/prod", "http://shop:pw@mq.internal:15672"),
        ("amqp://mq", "http://guest:guest@mq:15672"),
        # TLS to the broker: the credentials never go over plain HTTP, but to the TLS port
        ("amqps://shop:pw@mq.internal:5671/prod", "https://shop:pw@mq.internal:15671"),
        ("amqps://shop:pw@[::1]:5671/%2F;amqp://shop:pw@mq2/%2F", "https://shop:pw@[::1]:15671"),
    ],
)
def test_the_management_url_defaults_to_the_amqp_host_and_credentials(url: str, management: str) -> None:
    from dramaturg.brokers.rabbitmq.stats import management_url

    assert management_url(dramaturg.BrokerSettings(url=url)) == management
    explicit = dramaturg.BrokerSettings(url=url, management_url="https://mq-admin:443")
    assert management_url(explicit) == "https://mq-admin:443"


@pytest.mark.parametrize("broker_kind", ["rabbitmq"])
def test_a_management_api_that_redirects_gets_the_credentials_no_further(
    broker: dramatiq.Broker, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a "management API" that redirects elsewhere, and a server there noting what it is sent
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from dramaturg.brokers.rabbitmq.stats import RabbitmqStatsReader

    received: list[str | None] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            received.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args: Any) -> None: ...

    elsewhere = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)

    class Redirecting(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{elsewhere.server_port}/api/queues/%2F")
            self.end_headers()

        def log_message(self, *args: Any) -> None: ...

    redirecting = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    for server in (elsewhere, redirecting):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = broker.settings.model_copy(  # type: ignore[attr-defined]
        update={"management_url": f"http://guest:s3cret@127.0.0.1:{redirecting.server_port}"}
    )

    # When statistics are read
    try:
        RabbitmqStatsReader(broker, settings).read(["reports"])  # type: ignore[arg-type]
    finally:
        redirecting.shutdown()
        elsewhere.shutdown()

    # Then the redirect is not followed (the AMQP numbers are used), and says so
    assert received == []
    assert "it answers with a redirect (HTTP 302), not followed" in caplog.text
    assert "s3cret" not in caplog.text
