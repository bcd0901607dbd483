"""A fault-injecting TCP proxy for the tests: put it between a client and a broker, then
cut its connections, refuse new ones, or lose replies.

No packaged one exists here (toxiproxy is a Go server), and the faults the tests need
are few. Every connection is a thread that relays both ways; the proxy never looks
inside the bytes, so it serves AMQP and Redis alike.

>>> proxy = FaultProxy(("127.0.0.1", redis_port))
>>> port = proxy.start()          # point the client at 127.0.0.1:port
>>> proxy.cut()                   # every open connection reset (RST), as a dropped link
>>> proxy.refuse(True)            # new connections reset at once: the broker is "down"
>>> proxy.refuse(False)
>>> proxy.drop_replies(0.3)       # every 0.3 s a reply is swallowed and its connection reset
>>> proxy.drop_replies(None)
>>> proxy.close()

A lost reply is the nasty case for a client: the broker ran the command (a fetch moved
messages, an acknowledgement removed one), but the client only sees its connection
drop, and cannot tell whether it ran. :attr:`FaultProxy.faults` keeps the time of each
fault the proxy caused (``time.time()``), so a test can tell what was in flight then.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time

__all__ = ["FaultProxy"]

#: Seconds to wait for the upstream to accept a connection.
CONNECT_TIMEOUT_S = 5.0


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a RST (SO_LINGER 0), as a dropped link or a killed peer does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    """One client connection and its upstream twin, relayed by a thread of its own."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self._wake_r, self._wake_w = socket.socketpair()
        self.thread = threading.Thread(target=self._relay, name="fault-proxy-link", daemon=True)

    def cut(self) -> None:
        """Ask the relay thread to reset both sides (it owns the sockets)."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _relay(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            selector.register(self.client, selectors.EVENT_READ)
            selector.register(self.upstream, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    source = key.fileobj
                    assert isinstance(source, socket.socket)
                    try:
                        data = source.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    if source is self.upstream and self.proxy._reply_lost():
                        return  # the reply is swallowed; both sides are reset below
                    target = self.upstream if source is self.client else self.client
                    try:
                        target.sendall(data)
                    except OSError:
                        return
        finally:
            selector.close()
            _reset(self.client)
            _reset(self.upstream)
            self._wake_r.close()
            self._wake_w.close()
            self.proxy._forget(self)


class FaultProxy:
    """A TCP proxy in front of ``upstream`` (host, port), listening on ``host``.

    ``host`` is loopback by default; a test with network namespaces gives the address
    of its own veth end instead.
    """

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.host = host
        self.port = 0
        #: ``time.time()`` of every fault the proxy caused: a cut, a lost reply.
        self.faults: list[float] = []
        #: Connections reset at once while refusing.
        self.refused = 0
        self._refusing = False
        self._drop_every_s: float | None = None
        self._next_drop = 0.0
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="fault-proxy-accept", daemon=True)

    def start(self) -> int:
        """Listen on a free port of ``host``; returns it."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(128)
        listener.settimeout(0.1)  # so close() is noticed
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._acceptor.start()
        return self.port

    # -- faults ----------------------------------------------------------------------

    def cut(self) -> int:
        """Reset every open connection at once (both sides); returns how many."""
        with self._lock:
            links = list(self._links)
            if links:
                self.faults.append(time.time())
        for link in links:
            link.cut()
        for link in links:
            link.thread.join(5)
        return len(links)

    def refuse(self, on: bool = True) -> None:
        """While on, every new connection is reset as soon as it is accepted."""
        self._refusing = on

    def drop_replies(self, every_s: float | None) -> None:
        """Every ``every_s`` seconds, swallow the next bytes coming back from the upstream
        and reset that connection (None: stop). The request reached the upstream, which
        acted on it; the client never hears so."""
        with self._lock:
            self._drop_every_s = every_s
            self._next_drop = time.monotonic() + every_s if every_s else 0.0

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._links)

    def close(self) -> None:
        """Stop listening and reset every connection."""
        self._closed.set()
        self.cut()
        if self._acceptor.is_alive():
            self._acceptor.join(5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _reply_lost(self) -> bool:
        with self._lock:
            if self._drop_every_s is None or time.monotonic() < self._next_drop:
                return False
            self._next_drop = time.monotonic() + self._drop_every_s
            self.faults.append(time.time())
            return True

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self._refusing or self._closed.is_set():
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=CONNECT_TIMEOUT_S)
            except OSError:
                _reset(client)  # the upstream is down: the client sees its connection reset
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(self, client, upstream)
            with self._lock:
                self._links.add(link)
            link.thread.start()
