"""The queues page's chart of the last hour, read as the page renders it: a bar a minute
per queue (``data-*`` attributes and the bars' heights), on Redis, embedded and on RabbitMQ
with a state store (without one, the page says what to set: tests/test_dashboard.py).

The app is served in this process (``serve``); the chart is server-made SVG, read from
the HTML as a browser gets it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dramatiq
import httpx
import pytest

import dramaturg
import dramaturg.dashboard
from dramaturg.dashboard.chart import BARS_H
from dramaturg.status import state_store
from dramaturg.status.store import HISTORY_TTL_MS

from .conftest import WAIT_S, LiveServer, poll_until, settings_with_state


@pytest.fixture(params=["redis", "rabbitmq", "embedded"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dramaturg.Settings:
    """A namespace of this test's own; RabbitMQ gets the private Redis as its state store
    (without one: ``test_the_queues_page_has_no_chart_without_a_state_store`` in test_dashboard.py)."""
    return settings_with_state(broker_kind, request, tmp_path)


def chart_of(html: str, queue: str) -> dict[str, Any]:
    """The chart the page drew for ``queue``: its attributes, and its bars by minute."""
    found = re.search(rf'<svg class="chart" ([^>]*data-queue="{re.escape(queue)}"[^>]*)>(.*?)</svg>', html, re.S)
    assert found, f"no chart for {queue}"
    attributes = dict(re.findall(r'([\w-]+)="([^"]*)"', found.group(1)))
    bars = {}
    for bar in re.finditer(r'<g class="bar" ([^>]*)><title>([^<]*)</title>(.*?)</g>', found.group(2), re.S):
        data = {name: int(value) for name, value in re.findall(r'data-(\w+)="(\d+)"', bar.group(1))}
        heights = {kind: float(h) for kind, h in re.findall(r'<rect class="(\w+)"[^>]*height="([\d.]+)"', bar.group(3))}
        bars[data.pop("minute")] = {**data, "title": bar.group(2), "heights": heights}
    return {"attributes": attributes, "bars": bars}


def test_the_chart_counts_the_minutes_tasks_and_shows_no_minute_older_than_an_hour(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker], serve: Callable[[Any], LiveServer]
) -> None:
    # Given tasks of "charted" that succeed (6), fail (2, held when their retries run out)
    # or get held by their error (3)
    @dramaturg.actor(queue_name="charted", max_retries=0, hold_on=(LookupError,))
    def charted(n: int) -> None:
        if n % 4 == 1 and n < 8:
            raise ValueError(f"task {n} failed")
        if n >= 8:
            raise LookupError(f"task {n}: no email address")

    # and a queue that has run nothing
    @dramaturg.actor(queue_name="quiet")
    def quiet() -> None: ...

    first_minute = int(time.time() // 60) * 60
    for n in range(11):
        charted.send(n)
    start_worker(queues={"charted"})
    # and counts written 58 minutes ago (shown) and 60 minutes ago (older than the hour)
    store = state_store(broker)
    now = time.time()
    store.count("charted", "processed", at=now - 58 * 60)
    store.count("charted", "processed", "failed", at=now - 60 * 60)
    store.flush()

    # When the queues page is read (as its htmx refresh does) until the worker's counts are in
    server = serve(dramaturg.dashboard.app(broker=broker, token=None))
    client = httpx.Client(base_url=server.url, timeout=WAIT_S)

    def counted() -> dict[str, Any] | None:
        chart = chart_of(client.get("/queues/table").text, "charted")
        recent = [bar for minute, bar in chart["bars"].items() if minute >= first_minute]
        return chart if sum(bar["processed"] for bar in recent) == 11 else None

    chart = poll_until(counted, "the chart to count the 11 tasks")
    last_minute = int(time.time() // 60) * 60

    # Then the minutes the tasks ran in (one, or two across a minute's turn) add up to what happened
    recent = {minute: bar for minute, bar in chart["bars"].items() if minute >= first_minute}
    assert set(recent) <= {first_minute, first_minute + 60} and max(recent) <= last_minute
    totals = {name: sum(bar[name] for bar in recent.values()) for name in ("processed", "failed", "retried", "held")}
    assert totals == {"processed": 11, "failed": 5, "retried": 0, "held": 5}
    # and the busiest minute fills the chart's height, its failed foot in proportion, a held mark above
    busiest = max(recent.values(), key=lambda bar: bar["processed"])
    assert busiest["heights"]["processed"] == BARS_H
    assert busiest["heights"]["failed"] == pytest.approx(BARS_H * busiest["failed"] / busiest["processed"], abs=0.1)
    assert "held" in busiest["heights"]
    assert re.fullmatch(r"\d\d:\d\d UTC: \d+ processed, \d+ failed, 0 retried, \d+ held", busiest["title"])
    # and the count of 58 minutes ago is a small bar; the one of 60 minutes ago is not drawn
    older = {minute: bar for minute, bar in chart["bars"].items() if minute < first_minute}
    assert list(older) == [int((now - 58 * 60) // 60) * 60], older
    assert older[int((now - 58 * 60) // 60) * 60]["processed"] == 1
    assert chart["attributes"]["aria-label"] == (
        "charted, last 60 minutes: 12 processed, 5 failed, 0 retried, 5 held;"
        f" at most {busiest['processed']} in a minute"
    )
    # and the history is kept a little over the hour, in the state store
    key = f"{store.namespace}:__minutes__:charted:{first_minute // 60}"
    assert 60 * 60 * 1000 < store.client.pttl(key) <= HISTORY_TTL_MS

    # and the queue that ran nothing has an empty chart that says so
    empty = chart_of(client.get("/queues").text, "quiet")
    assert empty["bars"] == {} and empty["attributes"]["data-bars"] == "0"
    assert empty["attributes"]["aria-label"] == "quiet: nothing processed or held in the last 60 minutes"


def test_the_chart_escapes_what_it_draws() -> None:
    # Given a chart of a queue whose name has markup in it (Dramatiq's names never do: the
    # template must not rely on it) — pure rendering, no broker
    from dramaturg.dashboard.chart import HEIGHT, WIDTH, minute_chart
    from dramaturg.dashboard.views import _templates

    chart = minute_chart(
        'q"><script>x</script>', [(1764580800, {"processed": 2, "failed": 1, "retried": 0, "held": 0})]
    )

    # When it is drawn
    macro = _templates.get_template("_chart.html").module.minute_chart  # type: ignore[attr-defined]
    svg = str(macro(chart, WIDTH, HEIGHT))

    # Then the name is text in its attributes and title, never markup
    assert "<script>" not in svg
    assert 'data-queue="q&#34;&gt;&lt;script&gt;x&lt;/script&gt;"' in svg
    assert "<title>q&#34;&gt;&lt;script&gt;x&lt;/script&gt;, last 60 minutes: 2 processed, 1 failed" in svg
