"""A connection cut in the middle of a bulk send, from RabbitMQ's side, for the bulk tests.

:class:`CutAt` calls a function just before the N-th message is enqueued;
:func:`close_from_the_server` has RabbitMQ close a connection (DELETE /api/connections/NAME
on its management API), as an operator or a failing node would. Imported as an actor
module (``worker.modules``, beside the module of the actors) with ``CUT_AT`` and
``CUT_MANAGEMENT_URL`` set, it arms the cut for the command that imports it
(``dramaturg send --file``); with ``INTERRUPT_AT`` set, the command gets SIGINT instead
(Ctrl-C at the terminal) just before that message. It declares no actor.
"""

from __future__ import annotations

import base64
import os
import signal
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import dramatiq

import dramaturg


class CutAt(dramatiq.Middleware):
    """Calls ``cut(broker)`` just before the ``at``-th message of the run is enqueued."""

    def __init__(self, at: int, cut: Callable[[dramatiq.Broker], None]) -> None:
        self.at, self.cut, self.seen = at, cut, 0

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        self.seen += 1
        if self.seen == self.at:
            self.cut(broker)


def close_from_the_server(management_url: str, connection: Any) -> None:
    """Have RabbitMQ close ``connection`` (a pika BlockingConnection) and return once it did."""
    sock = connection._impl._transport._sock  # pika's socket: its two ends name the connection
    (host, port), (peer_host, peer_port) = sock.getsockname()[:2], sock.getpeername()[:2]
    name = urllib.parse.quote(f"{host}:{port} -> {peer_host}:{peer_port}", safe="")
    parts = urllib.parse.urlsplit(management_url)
    token = base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()
    request = urllib.request.Request(
        f"http://{parts.hostname}:{parts.port}/api/connections/{name}",
        method="DELETE",
        headers={"Authorization": f"Basic {token}"},
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except urllib.error.HTTPError as error:
            # 404: not in the management database yet (it learns of connections at each
            # statistics emission); no event to wait on in another process's database.
            if error.code != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def cut_the_confirm_window(management_url: str) -> Callable[[dramatiq.Broker], None]:
    """A ``cut`` for :class:`CutAt`: closes the sending thread's bulk connection."""
    return lambda broker: close_from_the_server(management_url, broker._windows.window.connection)  # type: ignore[attr-defined]


if os.environ.get("CUT_AT"):
    dramaturg.get_broker().add_middleware(
        CutAt(int(os.environ["CUT_AT"]), cut_the_confirm_window(os.environ["CUT_MANAGEMENT_URL"]))
    )


def interrupt(broker: dramatiq.Broker) -> None:
    """A ``cut`` for :class:`CutAt`: Ctrl-C, as a user at the terminal presses it."""
    os.kill(os.getpid(), signal.SIGINT)


if os.environ.get("INTERRUPT_AT"):
    dramaturg.get_broker().add_middleware(CutAt(int(os.environ["INTERRUPT_AT"]), interrupt))
