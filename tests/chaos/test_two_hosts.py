"""Workers on two hosts, one broker; one host is cut off from the network (every packet
dropped, as by a dead switch port) and comes back. Nothing is lost, and only tasks that
were running on the cut-off host run again.

The hosts are network namespaces joined to this one by veth pairs (``two_hosts``); the
broker is a server of this test's own listening on loopback and on the two veth
addresses; the cut is an iptables DROP inside the cut-off host's namespace.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

import dramaturg

from ..conftest import Process, require
from .conftest import CHAOS_BROKER, RABBITMQ_SERVER, Host, RabbitmqNode, RedisServer, Scale
from .harness import READY, Chaos
from .test_processes import task_length

pytestmark = pytest.mark.chaos


@pytest.mark.parametrize("broker_kind", ["rabbitmq", "redis"])
def test_a_worker_host_cut_off_and_restored(
    broker_kind: str,
    two_hosts: tuple[Host, Host],
    scale: Scale,
    run: int,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    spawn: Callable[..., Process],
) -> None:
    require(RABBITMQ_SERVER if broker_kind == "rabbitmq" else "redis-server", broker_kind)
    cut, kept = two_hosts
    addresses = (cut.gateway, kept.gateway)
    directory = tmp_path_factory.mktemp(f"two-hosts-{broker_kind}")
    server = RabbitmqNode(directory, addresses) if broker_kind == "rabbitmq" else RedisServer(directory, addresses)
    server.start()
    scenario = None
    try:
        settings = dramaturg.Settings(
            broker={"url": server.url(), "namespace": f"chaos-{uuid.uuid4().hex[:8]}", **CHAOS_BROKER},
            worker={"threads": 4},
        )
        # Given a worker group on each host, and a burst of tasks
        scenario = Chaos("worker host cut off (network namespaces)", broker_kind, settings, tmp_path, spawn)
        on_cut = scenario.start_worker(url=server.url(cut.gateway), prefix=cut.prefix(), wait=False)
        scenario.start_worker(url=server.url(kept.gateway), prefix=kept.prefix(), wait=False)
        for worker in scenario.workers:
            worker.wait_for_line(READY, timeout=60)
        group = [on_cut.popen.pid, *scenario.worker_pids(on_cut)]
        scenario.send(scale.tasks, task_length)
        scenario.wait_for_ends(scale.tasks // 5, timeout=scale.settle_s)

        # When one host is cut off for a while, then restored
        began = time.time()
        cut.cut_off()
        try:
            time.sleep(scale.cut_off_s)  # the cut lasts this long
        finally:
            cut.restore()
        scenario.fault(began, time.time(), scope=group, silent=True)
        scenario.notes.append(f"cut off {scale.cut_off_s:.0f} s")

        # Then every task succeeds; only those running on the cut-off host ran twice, each logged
        scenario.settle(scale.settle_s)
        scenario.finish(scenario.count())
    finally:
        if scenario is not None:
            scenario.close()  # its workers, before their namespaces go
        server.stop()
        server.kill()
