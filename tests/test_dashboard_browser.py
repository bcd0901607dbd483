"""The dashboard driven in headless Chromium, as an operator uses it, on RabbitMQ, Redis
and embedded: the queues page shows what a test put there, a held task is kicked with
its button and runs, a queue's held tasks are purged after the confirmation, and a
browser without the admin token or without the CSRF field is refused.

The browser is Debian's ``chromium`` (``.ci/run`` installs it), driven by Playwright's
Python API with ``executable_path``: Playwright's own browser download is never used.
One browser for the session; a context (cookies of its own) per test.

``make screenshots`` runs the last test here with ``DRAMATURG_SCREENSHOTS`` set: it fills
a Redis with queues, held tasks and batches and saves a picture of each page for the docs.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import dramaturg
import dramaturg.dashboard
from dramaturg.workers import registry_of
from dramaturg.workers.registry import INTERVAL_MS

from .conftest import IN_CI, WAIT_S, LiveServer, Runs, held_task, poll_until

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
TOKEN = "browser-admin-token"
#: How long a page assertion waits (RabbitMQ's management API lags its queues by ~0.5 s,
#: and the queues table refreshes every 2 s).
EXPECT_MS = WAIT_S * 1000


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium for the whole session (skipped locally, failed in CI, when missing)."""
    if not os.path.exists(CHROMIUM):
        message = f"Chromium is not installed ({CHROMIUM}); run: apt-get install -y chromium"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def open_dashboard(
    broker: dramatiq.Broker, serve: Callable[[Any], LiveServer], browser: Any
) -> Iterator[Callable[..., Any]]:
    """Serve a dashboard for ``broker`` (admin ``token``) and open a fresh browser context on it."""
    from playwright.sync_api import expect

    expect.set_options(timeout=EXPECT_MS)
    contexts: list[Any] = []
    # Declared, so that the broker fixture deletes it and its held companion afterwards on
    # RabbitMQ (the tests hold tasks of "imports"; left behind, the next test would list them).
    broker.declare_queue("imports")

    def open_context(token: str | None = TOKEN, **options: Any) -> Any:
        server = serve(dramaturg.dashboard.app(broker=broker, token=token))
        context = browser.new_context(base_url=server.url, **options)
        contexts.append(context)
        return context

    yield open_context
    for context in contexts:
        context.close()


def sign_in(page: Any, name: str) -> None:
    from playwright.sync_api import expect

    page.goto("/queues")
    page.get_by_role("link", name="sign in").click()
    page.get_by_label("Your name").fill(name)
    page.get_by_label("Admin token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signed-in")).to_contain_text(name)


def test_an_operator_kicks_a_held_task_and_purges_the_rest(
    broker: dramatiq.Broker,
    import_user: dramaturg.Actor[..., None],
    start_worker: Callable[..., dramatiq.Worker],
    open_dashboard: Callable[..., Any],
) -> None:
    from playwright.sync_api import expect

    # Given three held tasks and two ready ones on the imports queue
    store = dramaturg.held_tasks()
    tasks = [held_task("imports", number) for number in (1, 2, 3)]
    for task in tasks:
        store.hold(task)
    import_user.send({"id": 100})
    import_user.send({"id": 101})
    page = open_dashboard().new_page()

    # When the operator opens the queues page
    page.goto("/queues")

    # Then the imports row shows them (refreshed live until the broker's numbers arrive)
    row = page.locator('tr[data-queue="imports"]')
    expect(row.locator('[data-column="held"]')).to_have_text("3")
    expect(row.locator('[data-column="ready"]')).to_have_text("2")

    # When they sign in, open the first held task from the list, and kick it with its button
    sign_in(page, "olga")
    page.goto("/held/imports")
    page.get_by_role("link", name=tasks[0].message_id).click()
    expect(page.locator("#reason")).to_have_text(tasks[0].reason)
    expect(page.locator("#kicks")).to_have_text("0")
    start_worker()
    page.locator("#kick").click()

    # Then the page says so, the task runs (with the two that were ready), and the held count drops
    expect(page.locator(".notice")).to_have_text("requeued 1 held task of imports")
    assert sorted(import_user.ran.wait(3)) == [1, 100, 101]  # type: ignore[attr-defined]
    page.goto("/queues")
    expect(row.locator('[data-column="held"]')).to_have_text("2")

    # When they tick a held task and purge it, answering "no" to the browser's question first
    page.goto("/held/imports")
    page.get_by_label(f"select {tasks[1].message_id}").check()
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.get_by_role("button", name="Purge selected").click()
    assert store.count("imports") == 2
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Purge selected").click()

    # Then that one is gone
    expect(page.locator(".notice")).to_have_text("purged 1 held task of imports")
    assert store.get(tasks[1].message_id, "imports") is None

    # When they ask to purge all, and confirm with the wrong name first
    page.get_by_role("link", name="Purge all…").click()
    page.get_by_label("Type the queue's name to confirm").fill("import")
    page.get_by_role("button", name="Purge all 1").click()

    # Then nothing is purged
    expect(page.locator(".problem")).to_contain_text("type its name to confirm")
    assert store.count("imports") == 1

    # When they confirm with the queue's name
    page.go_back()
    page.get_by_label("Type the queue's name to confirm").fill("imports")
    page.get_by_role("button", name="Purge all 1").click()

    # Then the last is gone, on the page and in the store
    expect(page.locator(".notice")).to_have_text("purged 1 held task of imports")
    expect(page.locator("#held-total")).to_contain_text("0 held")
    assert store.count("imports") == 0
    assert store.get(tasks[2].message_id, "imports") is None


def test_a_browser_without_the_token_or_the_csrf_field_is_refused(
    broker: dramatiq.Broker, open_dashboard: Callable[..., Any]
) -> None:
    from playwright.sync_api import expect

    # Given a held task and a browser that has not signed in
    store = dramaturg.held_tasks()
    task = held_task("imports", 7)
    store.hold(task)
    context = open_dashboard()
    page = context.new_page()

    # When it opens the task's page
    page.goto(f"/held/imports/task?id={task.message_id}")

    # Then it sees the task, read-only: no kick or purge button
    expect(page.locator("#reason")).to_have_text(task.reason)
    expect(page.locator("#kick")).to_have_count(0)
    expect(page.locator("header")).to_contain_text("read-only")

    # When it watches the queues page while another task is held
    page.goto("/queues")
    held = page.locator('tr[data-queue="imports"] [data-column="held"]')
    expect(held).to_have_text("1")
    store.hold(held_task("imports", 8))

    # Then the count follows without a reload
    expect(held).to_have_text("2")

    # When it posts a kick anyway, with a valid CSRF field taken from the sign-in form
    page.goto("/login")
    csrf = page.locator('input[name="csrf_token"]').get_attribute("value")
    refused = context.request.post("/held/imports/kick", form={"id": task.message_id, "csrf_token": csrf})

    # Then it is refused
    assert refused.status == 403
    assert "read-only" in refused.text()

    # When it signs in but posts without the CSRF field
    sign_in(page, "mallory")
    without = context.request.post("/held/imports/purge", form={"id": task.message_id})

    # Then that is refused too, and the tasks are still held
    assert without.status == 403
    assert store.get(task.message_id, "imports") is not None
    assert store.count("imports") == 2


@pytest.mark.parametrize("broker_kind", ["redis"])  # the server side on each broker: test_dashboard.py
def test_an_operator_filters_held_tasks_as_they_type_and_ticks_a_checkbox_beside_its_label(
    broker: dramatiq.Broker, open_dashboard: Callable[..., Any]
) -> None:
    from playwright.sync_api import expect

    # Given 12 held tasks of imports, every fourth of sync_orders
    store = dramaturg.held_tasks()
    for number in range(12):
        store.hold(held_task("imports", number, actor="sync_orders" if number % 4 == 0 else "import_user"))
    page = open_dashboard().new_page()
    sign_in(page, "olga")
    page.goto("/held/imports")
    rows = page.locator("tr[data-id]")
    expect(rows).to_have_count(12)

    # When they type words of a reason, without submitting
    page.get_by_label("reason contains").press_sequentially("ROW 1")

    # Then the list follows: rows 1, 10 and 11, and the address keeps the filter
    expect(page.locator("#held-total")).to_contain_text("3 of 12 held match")
    expect(rows).to_have_count(3)
    assert "reason=ROW%201" in page.url

    # When they add an actor and submit
    page.get_by_label("actor").fill("sync_orders")
    page.get_by_role("button", name="Filter").click()

    # Then only the tasks matching both are left, and kick all is not offered
    expect(page.locator("#held-total")).to_contain_text("0 of 12 held match")
    page.get_by_label("reason contains").fill("")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#held-total")).to_contain_text("3 of 12 held match")
    expect(page.get_by_role("link", name="Kick all…")).to_have_count(0)

    # When they open a queue's purge form
    page.goto("/queues/imports")
    checkbox = page.get_by_label("the delayed ones too")
    label = page.locator("label", has=checkbox)

    # Then the checkbox sits before its text on one line, and ticking it works
    box, around = checkbox.bounding_box(), label.bounding_box()
    assert box and around
    assert abs((box["y"] + box["height"] / 2) - (around["y"] + around["height"] / 2)) < 2, (box, around)
    assert around["height"] < 2 * box["height"] + 8, (box, around)  # one line, not two
    label.get_by_text("the delayed ones too").click()
    expect(checkbox).to_be_checked()


# -- screenshots for the docs (make screenshots) -------------------------------------------

SCREENSHOTS = os.environ.get("DRAMATURG_SCREENSHOTS")


@pytest.mark.skipif(not SCREENSHOTS, reason="make screenshots sets DRAMATURG_SCREENSHOTS to the folder to write")
@pytest.mark.parametrize("broker_kind", ["redis"])
def test_screenshots_of_each_page(
    broker: dramatiq.Broker, start_worker: Callable[..., dramatiq.Worker], open_dashboard: Callable[..., Any]
) -> None:
    from playwright.sync_api import expect

    assert SCREENSHOTS
    folder = Path(SCREENSHOTS)
    folder.mkdir(parents=True, exist_ok=True)
    ran = Runs()

    # Given a shop's queues: imports that hold rows without an email, mails, one failing sync
    @dramaturg.actor(queue_name="imports", hold_on=(LookupError,))
    def import_user(row: dict[str, Any]) -> None:
        ran.add(row["id"])
        if not row.get("email"):
            raise LookupError(f"row {row['id']}: no email address")

    @dramaturg.actor(queue_name="mail")
    def send_welcome(address: str) -> None:
        ran.add(address)

    @dramaturg.actor(queue_name="sync", max_retries=0)
    def sync_orders(shop: str) -> None:
        ran.add(shop)
        raise ConnectionError(f"could not connect to postgres://shop:hunter2@db.internal:5432/{shop}")

    # (declared before any worker starts: a stopped worker would still add a consumer for a later one)
    started, release = threading.Semaphore(0), threading.Event()

    @dramaturg.actor(queue_name="reports")
    def monthly_report(month: str) -> None:
        started.release()
        release.wait(WAIT_S)

    rows = [{"id": n, "email": f"user{n}@example.com" if n % 7 else ""} for n in range(1, 141)]
    with dramaturg.batch("import users.csv"):
        import_user.send_many(rows)
    for n in range(1, 41):
        send_welcome.send(f"user{n}@example.com")
    failed = sync_orders.send("berlin")
    welcome = send_welcome.send("ada@example.com")
    worker = start_worker(threads=8)
    ran.wait(len(rows) + 42, timeout=60)
    store = dramaturg.held_tasks()
    poll_until(lambda: store.count("imports") == 20 and store.count("sync") == 1, "the tasks to be held")
    poll_until(lambda: dramaturg.task_status(welcome.message_id).state == "succeeded", "the mail to be recorded")
    worker.stop()
    # and work waiting: a batch under way, mails ready, a delayed one
    with dramaturg.batch("nightly price update"):
        import_user.send_many({"id": n, "email": f"p{n}@example.com"} for n in range(1000, 1060))
    for n in range(41, 53):
        send_welcome.send(f"user{n}@example.com")
    send_welcome.send_with_options(args=("later@example.com",), delay=3_600_000)
    # and two schedules, one fired by hand and run
    from dramaturg import schedules

    dramaturg.periodic("0 3 * * *", id="nightly-sync", timezone="Europe/Paris", args=["berlin"])(sync_orders)
    dramaturg.periodic(every="15m", id="mail-digest", overlap="skip", args=["digest@example.com"])(send_welcome)
    try:
        declared = schedules.load_schedules(dramaturg.app.current_settings(), broker)
        digest = next(schedule for schedule in declared if schedule.id == "mail-digest")
        fired = schedules.run_now(digest, broker)
        worker = start_worker(threads=2, queues={"mail"})
        poll_until(lambda: dramaturg.task_status(fired).state == "succeeded", "the digest to be recorded")
        worker.stop()
        for n in range(53, 60):
            send_welcome.send(f"user{n}@example.com")
        # and an hour behind the queues for their charts: counted as a worker's flushes count
        # (mail steady, imports in bursts with some held, sync failing now and then)
        from dramaturg.status import state_store

        history, now = state_store(broker), time.time()
        for ago in range(1, 60):
            at = now - ago * 60
            for _ in range(20 + (ago * 7) % 13):
                history.count("mail", "processed", at=at)
            if ago % 15 in (3, 4):
                for n in range(110 + ago % 40):
                    history.count("imports", "processed", at=at)
                    if n % 7 == 0:
                        history.count("imports", "failed", "held", at=at)
            if ago % 10 == 6:
                history.count("sync", "processed", "failed", "retried", at=at)
        history.flush()

        context = open_dashboard(viewport={"width": 1280, "height": 720})
        page = context.new_page()
        sign_in(page, "olga")

        def shoot(path: str, name: str, ready: str) -> None:
            page.goto(path)
            expect(page.locator(ready).first).to_be_visible()
            page.screenshot(path=str(folder / f"{name}.png"), full_page=True)

        shoot("/queues", "queues", 'svg.chart[data-queue="mail"] g.bar')
        shoot("/held/imports", "held-list", "tr[data-id]")
        shoot("/held/imports?reason=row+1", "held-filtered", "tr[data-id]")
        first_held = store.list("imports", limit=1)[0]
        shoot(f"/held/imports/task?id={first_held.message_id}", "held-task", "#reason")
        shoot(f"/held/sync/task?id={failed.message_id}", "held-task-error", "#traceback")
        shoot("/held/imports/confirm?action=purge", "purge-all", "form.confirm")
        shoot(f"/tasks?id={welcome.message_id}", "task-lookup", "#state")
        shoot("/batches", "batches", "tr[data-batch]")
        shoot("/queues/mail", "queue-waiting", "tr[data-id]")
        shoot("/schedules", "schedules", 'tr[data-schedule="mail-digest"]')
        assert "hunter2" not in page.content()

        # and a worker running two reports (its record written every 200 ms, not 5 s)
        registry_of(broker).interval_ms = 200
        start_worker(threads=4, queues={"reports", "sync"})
        for month in ("2026-10", "2026-11"):
            monthly_report.send(month)
        try:
            for _ in range(2):
                assert started.acquire(timeout=WAIT_S)
            poll_until(lambda: [w.running for w in dramaturg.workers()] == [2], "the running reports to be counted")
            # the page says the usual period: the next record is written with it (and its TTL)
            registry = registry_of(broker)
            registry.interval_ms = INTERVAL_MS
            (writer,) = registry._threads.values()
            poll_until(lambda: registry.client(broker).pttl(writer.key) > 1000, "a record with the usual TTL")
            shoot("/workers", "workers", "tr[data-worker]")
        finally:
            release.set()
    finally:
        schedules._forget_declared()
