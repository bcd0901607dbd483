"""Stops an embedded Redis server once no process uses it any more.

Run as a script (``python -I _embedded_watchdog.py DB_PATH``), started beside each
embedded server; it imports only the standard library so it stays small. Processes
that use the server hold a shared lock on ``<db>.users``; a process that exits without
detaching (``os._exit`` in multiprocessing children, ``kill -9``) loses its lock with
its life, and this watchdog, blocked on an exclusive lock, wakes up. Under the start
lock ``<db>.lock`` it checks again that nobody attached meanwhile, then shuts the
server down and exits. The same protocol as ``EmbeddedServer.detach``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
import time


def _shutdown(socket_path: str, pid_path: str) -> None:
    try:
        with open(pid_path) as handle:
            pid = int(handle.read().strip())
    except (OSError, ValueError):
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            if b"unixsocket:" + os.fsencode(socket_path) not in handle.read():
                return  # the pid file is stale and the pid belongs to somebody else
    except OSError:
        return
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            client.connect(socket_path)
            client.sendall(b"*2\r\n$8\r\nSHUTDOWN\r\n$4\r\nSAVE\r\n")
            client.recv(64)  # the server closes the connection as it exits
    except OSError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while os.path.exists(pid_path) and time.monotonic() < deadline:
        time.sleep(0.01)


def main(db_path: str, socket_path: str) -> int:
    lock_path, users_path = db_path + ".lock", db_path + ".users"
    while True:
        with open(users_path, "ab") as users:
            fcntl.flock(users, fcntl.LOCK_EX)  # blocks until no process uses the server
        with open(lock_path, "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with open(users_path, "ab") as users:
                try:
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # somebody attached in between; wait for them to leave
                _shutdown(socket_path, db_path + ".pid")
                return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
