"""A fault-injecting proxy for the tests: cut connections, refuse new ones, lose replies,
fall silent.

It sits between a client (a worker, a sender) and a broker, on loopback TCP or a Unix
socket, and forwards bytes both ways until told to fail. Threads only (two per
connection), no dependency, so any test can use it:

>>> proxy = FaultProxy()
>>> port = proxy.start(("127.0.0.1", redis_port))  # the client connects to 127.0.0.1:port
>>> proxy.cut()                    # every open connection drops at once (the client sees a reset)
>>> proxy.refuse(True)             # new connections are closed as soon as they are accepted
>>> proxy.refuse(False)
>>> with proxy.down():             # an outage: cut, and refuse until the block ends
...     time.sleep(5)
>>> proxy.drop_replies(every=0.3)  # every 0.3 s the next reply is lost and its connection closed
>>> proxy.drop_replies(None)       # off again
>>> proxy.drop_next_reply()        # exactly one reply lost
>>> proxy.drop_next_reply(containing=b'"actor_name"')  # the next reply that carries a message
>>> with proxy.silent():           # a network black hole: nothing passes, nothing is closed
...     time.sleep(5)
>>> proxy.stop()

A lost reply is the hard fault: the request reached the server and ran, only its answer
never comes back (the connection is closed instead), so the client cannot tell whether it
ran. Silence is the other hard one: the client waits for an answer that does not come
(a host cut off by a firewall that drops packets, a paused server), until its own
timeout. ``upstream`` is ``(host, port)`` or the path of a Unix socket;
:meth:`FaultProxy.start_unix` listens on a Unix socket instead of a TCP port (the embedded
broker's server has no TCP port).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

__all__ = ["FaultProxy", "Upstream"]

#: ``(host, port)`` of a TCP server, or the path of a Unix socket.
Upstream = tuple[str, int] | str

#: How often the accept loop looks whether it was stopped.
_ACCEPT_POLL_S = 0.1


class FaultProxy:
    """Forwards connections to one upstream server, and fails them on request.

    Counters for assertions: ``accepted`` (connections made through it), ``refused`` and
    ``replies_dropped``. Thread-safe: faults may be switched from any thread.
    """

    def __init__(self) -> None:
        self.upstream: Upstream | None = None
        self.accepted = 0
        self.refused = 0
        self.replies_dropped = 0
        self._listener: socket.socket | None = None
        self._refusing = False
        self._drops_armed: list[bytes] = []  # one pattern per reply to lose (b"": any reply)
        self._drop_timer = threading.Event()  # set to stop the periodic dropper
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._flowing = threading.Event()  # cleared while silent
        self._flowing.set()

    # -- life -------------------------------------------------------------------------

    def start(self, upstream: Upstream) -> int:
        """Listen on 127.0.0.1 and a free port, forwarding to ``upstream``; return the port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        self._listen(listener, upstream)
        return int(listener.getsockname()[1])

    def start_unix(self, upstream: Upstream, path: str) -> str:
        """Listen on the Unix socket ``path`` (created, owner-only), forwarding to ``upstream``."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        self._listen(listener, upstream)
        return path

    def stop(self) -> None:
        """Stop listening and close every connection."""
        self._stopped.set()
        self._drop_timer.set()
        self.cut()
        for thread in self._threads:
            thread.join(5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults -----------------------------------------------------------------------

    def cut(self) -> int:
        """Drop every open connection now (a reset on both sides); return how many."""
        with self._lock:
            pairs, self._pairs = self._pairs, set()
        for pair in pairs:
            pair.close()
        return len(pairs)

    def refuse(self, on: bool = True) -> None:
        """While on, close each new connection as soon as it is accepted (the client sees a
        reset at its first read or write). Open connections are left alone: see :meth:`cut`."""
        self._refusing = on

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """The server unreachable for the duration of the block: cut, then refuse; restored after."""
        self.refuse(True)
        self.cut()
        try:
            yield
        finally:
            self.refuse(False)

    @contextlib.contextmanager
    def silent(self) -> Iterator[None]:
        """A network black hole for the duration of the block: no byte passes either way,
        no connection is closed, new ones are left waiting in the listen queue. Afterwards
        what was held flows on, late, as TCP delivers it once a cut-off host is back."""
        self._flowing.clear()
        try:
            yield
        finally:
            self._flowing.set()

    def drop_replies(self, every: float | None, *, containing: bytes = b"") -> None:
        """Every ``every`` seconds, lose the next reply (one holding ``containing``, if
        given): its bytes are discarded and its connection closed. ``None`` stops it."""
        self._drop_timer.set()  # stops the previous dropper, if any
        if every is None:
            return
        self._drop_timer = stop = threading.Event()
        thread = threading.Thread(
            target=self._arm_every, args=(every, containing, stop), name="proxy-dropper", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def drop_next_reply(self, *, containing: bytes = b"") -> None:
        """Lose the next reply that comes back through the proxy (the next one holding
        ``containing``, if given), once. The bytes are looked for in each chunk read."""
        with self._lock:
            self._drops_armed.append(containing)

    # -- internals --------------------------------------------------------------------

    def _listen(self, listener: socket.socket, upstream: Upstream) -> None:
        listener.listen(128)
        listener.settimeout(_ACCEPT_POLL_S)
        self._listener, self.upstream = listener, upstream
        thread = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _arm_every(self, every: float, containing: bytes, stop: threading.Event) -> None:
        while not stop.wait(every):
            with self._lock:
                if containing not in self._drops_armed:  # one per period, not a backlog of them
                    self._drops_armed.append(containing)

    def _take_drop(self, data: bytes) -> bool:
        with self._lock:
            for n, pattern in enumerate(self._drops_armed):
                if pattern in data:
                    del self._drops_armed[n]
                    self.replies_dropped += 1
                    return True
            return False

    def _accept_loop(self) -> None:
        assert self._listener is not None and self.upstream is not None
        while not self._stopped.is_set():
            if not self._flowing.wait(_ACCEPT_POLL_S):
                continue  # silent: a new connection waits in the listen queue
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.setblocking(True)
            if self._refusing:
                self.refused += 1
                _reset(client)
                continue
            try:
                server = _connect(self.upstream)
            except OSError:
                _reset(client)  # the upstream is down: so is the proxy, to its clients
                continue
            pair = _Pair(client, server)
            with self._lock:
                # Refused while it was being set up: down()'s cut, which takes this lock
                # after the flag is set, would not have seen it.
                refused = self._refusing
                if refused:
                    self.refused += 1
                else:
                    self._pairs.add(pair)
                    self.accepted += 1
            if refused:
                pair.close()
                continue
            for source, target, replies in ((client, server, False), (server, client, True)):
                threading.Thread(
                    target=self._pump, args=(pair, source, target, replies), name="proxy-pump", daemon=True
                ).start()

    def _pump(self, pair: _Pair, source: socket.socket, target: socket.socket, replies: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                while not self._flowing.wait(_ACCEPT_POLL_S):  # silent: held until it is over
                    if self._stopped.is_set():
                        return
                if not data:
                    break
                if replies and self._drops_armed and self._take_drop(data):
                    break  # the request ran upstream; its answer is lost with the connection
                target.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._pairs.discard(pair)
            pair.close()


class _Pair:
    """A client connection and its upstream connection, closed together, once."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client, self.server = client, server
        self._closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _reset(self.client)
        _reset(self.server)


def _connect(upstream: Upstream) -> socket.socket:
    if isinstance(upstream, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(upstream)
        except OSError:
            sock.close()
            raise
        return sock
    sock = socket.create_connection(upstream, timeout=5)
    sock.setblocking(True)  # the timeout was for connecting only: a connection may idle for long
    return sock


def _reset(sock: socket.socket) -> None:
    """Close with a reset where the transport has one; shutdown first wakes a thread blocked in recv."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    if sock.family != socket.AF_UNIX:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
