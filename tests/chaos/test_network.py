"""The network between workers and broker fails: connections cut, replies lost, the broker
unreachable for seconds. Nothing is lost; only tasks running when it happened run again.

The faults come from a proxy of the tests' own (tests/faults/proxy.py) between the
worker processes (and, for the outage, the sender) and the broker. The embedded broker
has no network: its outage is its server paused (SIGSTOP) for as long.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dramaturg.config import embedded_path

from ..conftest import poll_until
from .conftest import Scale
from .harness import Chaos
from .test_processes import task_length

pytestmark = pytest.mark.chaos

TCP_BROKERS = ["rabbitmq", "redis"]


@pytest.mark.parametrize("broker_kind", TCP_BROKERS)
def test_connections_cut_between_workers_and_broker(
    chaos: Callable[[str], Chaos], scale: Scale, run: int, broker_kind: str
) -> None:
    # Given two worker groups that reach the broker through a proxy, and a burst of tasks
    scenario = chaos("connection cut")
    proxy, url = scenario.proxy()
    scenario.start_workers(2, url=url)
    scenario.send(scale.tasks, task_length)

    # When every connection between them and the broker is cut, three times in the run
    connected = 0
    for k in range(3):
        scenario.wait_for_ends(scale.tasks * (k + 1) // 5, timeout=scale.settle_s)
        poll_until(lambda seen=connected: proxy.accepted > seen, "workers (re)connected", scale.settle_s)
        connected = proxy.accepted
        at = time.time()
        proxy.cut()
        scenario.fault(at)

    # Then the workers reconnect by themselves and every task succeeds; only those
    # running at a cut ran again, each logged
    scenario.settle(scale.settle_s)
    scenario.finish(scenario.count())


@pytest.mark.parametrize("broker_kind", TCP_BROKERS)
def test_replies_lost(chaos: Callable[[str], Chaos], scale: Scale, run: int, broker_kind: str) -> None:
    # Given two worker groups behind a proxy, running a burst of tasks
    scenario = chaos("replies lost every 0.3 s")
    proxy, url = scenario.proxy()
    scenario.start_workers(2, url=url)
    scenario.send(scale.tasks, lambda n: 0.02 + (n % 3) / 100)
    scenario.wait_for_ends(scale.tasks // 10, timeout=scale.settle_s)

    # When, for a few seconds, every 0.3 s a reply of the broker is lost (the broker did
    # what it was asked, the worker only sees its connection reset)
    proxy.drop_replies(every=0.3)
    deadline, dropped = time.monotonic() + scale.lossy_s, 0
    while time.monotonic() < deadline:  # the fault lasts this long; note when each reply is lost
        if proxy.replies_dropped > dropped:
            dropped = proxy.replies_dropped
            scenario.fault(time.time())
        time.sleep(0.005)
    proxy.drop_replies(None)

    # Then every task succeeds, none stays claimed by a worker that lost a reply
    scenario.settle(scale.settle_s)
    scenario.finish(scenario.count())


@pytest.mark.parametrize("broker_kind", [*TCP_BROKERS, "embedded"])
def test_broker_outage_with_delayed_tasks_and_retries_waiting(
    chaos: Callable[[str], Chaos], scale: Scale, run: int, broker_kind: str
) -> None:
    # Given two worker groups and a sender, all reaching the broker through a proxy (on
    # embedded: its server), and tasks waiting: retries of failed first attempts (1-2 s
    # backoff) and tasks sent with a delay
    scenario = chaos("broker outage, delayed tasks and retries waiting")
    url = None
    if broker_kind != "embedded":
        proxy, url = scenario.proxy()
        scenario.bootstrap_sender(url)
    scenario.start_workers(2, url=url) if url else scenario.start_workers(2)
    scenario.send(scale.tasks // 2, 0.02, delay=1_500)
    scenario.send_flaky(scale.tasks // 4, 0.02)
    scenario.send(scale.tasks // 4, 0.02)
    sender = scenario.keep_sending(every_s=0.05)
    fails = lambda: sum(e.event == "fail" for e in scenario.events())  # noqa: E731
    deadline = time.monotonic() + scale.settle_s
    while fails() < scale.tasks // 8 and time.monotonic() < deadline:
        time.sleep(0.05)  # the workers write the log: nothing to wait on

    # When the broker cannot be reached for a while (new connections refused, open ones
    # reset; on embedded the server stops answering)
    began = time.time()
    if broker_kind == "embedded":
        server_pid = int(Path(f"{embedded_path(scenario.settings.broker.url or '')}.pid").read_text())
        os.kill(server_pid, signal.SIGSTOP)
        try:
            time.sleep(scale.outage_s)  # the outage lasts this long
        finally:
            os.kill(server_pid, signal.SIGCONT)
    else:
        with proxy.down():
            time.sleep(scale.outage_s)  # the outage lasts this long
    # The paused server is silent: its clients wait rather than see an error.
    scenario.fault(began, time.time(), silent=broker_kind == "embedded")
    scenario.notes.append(f"outage of {scale.outage_s:.0f} s")

    # Then senders and workers reconnect by themselves; every task whose send returned
    # succeeds, delayed ones and retries included
    time.sleep(1.0)  # sending goes on a little after the outage
    sender.stop()
    scenario.settle(scale.settle_s)
    scenario.finish(scenario.count())
