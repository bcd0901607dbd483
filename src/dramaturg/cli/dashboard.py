"""``dramaturg dashboard``: serve the web dashboard (see :mod:`dramaturg.dashboard`).

It loads the application as the other commands do (``worker.modules``, so the queues of
its actors are known) and serves the dashboard with uvicorn. Loopback only unless
``--allow-remote``: a bind address that is not loopback is refused with one line and
exit code 2, before anything listens. Read-only unless an admin token is configured
(``[dashboard] token`` or ``DRAMATURG_DASHBOARD_TOKEN``). A port already taken is one
line and exit code 1.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
from typing import Any

from ..errors import UsageError
from ..exit_codes import EXIT_FAILURE, EXIT_OK
from ..masking import mask_text
from .common import boot, complain

EPILOG = """\
examples:
  $ dramaturg dashboard                                # http://127.0.0.1:8700, read-only
  $ DRAMATURG_DASHBOARD_TOKEN=$(openssl rand -hex 24) dramaturg dashboard   # kick and purge after sign-in
  $ dramaturg dashboard --bind 127.0.0.1:9000
  $ dramaturg dashboard --bind 0.0.0.0:8700 --allow-remote   # behind your own TLS proxy only
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dashboard",
        help="serve the web dashboard: queues, held tasks (kick, purge), task lookup, batches",
        description="Serve the web dashboard. Read-only unless [dashboard] token (DRAMATURG_DASHBOARD_TOKEN) is set.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument(
        "--bind", metavar="HOST:PORT", help="where to listen (default: [dashboard] bind, else 127.0.0.1:8700)"
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="listen on an address other than loopback (default: refused; put TLS in front)",
    )
    parser.set_defaults(run=run)


def parse_bind(text: str, *, allow_remote: bool) -> tuple[str, int]:
    """``host:port`` (``[::1]:8700`` for IPv6) as ``(host, port)``; a
    :class:`~dramaturg.UsageError` for a malformed one, and for one that is not loopback
    unless ``allow_remote``."""
    host, colon, port_text = text.rpartition(":")
    # isascii: "²" is a digit to isdigit(), not to int()
    if not colon or not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise UsageError(f"--bind {text!r} is not HOST:PORT, e.g. 127.0.0.1:8700")
    host = host.removeprefix("[").removesuffix("]")
    if not host:
        raise UsageError(f"--bind {text!r} names no host, e.g. 127.0.0.1:8700")
    if not allow_remote and not is_loopback(host):
        raise UsageError(
            f"--bind {text!r} is not a loopback address: the dashboard listens on loopback only unless"
            " --allow-remote is given (then put TLS and the admin token in front of it)"
        )
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: what it resolves to may change, so it is not trusted as loopback
        return False


def run(args: argparse.Namespace) -> int:
    from ..config import load_settings

    bind = args.bind or load_settings(args.config).dashboard.bind
    host, port = parse_bind(bind, allow_remote=args.allow_remote)
    try:
        import uvicorn

        from ..dashboard import app
    except ImportError as error:
        raise UsageError(
            f"the dashboard needs its extra ({error.name} is not installed): pip install 'dramaturg[dashboard]'"
        ) from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(128)  # connections wait in the backlog until uvicorn accepts them
    except OSError as error:
        listener.close()
        complain(f"cannot listen on {host}:{port}: {error.strerror or error}", exit_code=EXIT_FAILURE)
        return EXIT_FAILURE
    settings, broker = boot(args)
    logging.getLogger("dramaturg.dashboard").setLevel(logging.INFO)
    mode = "admin token set: kick and purge after sign-in" if settings.dashboard.token else "read-only (no admin token)"
    url_host = f"[{host}]" if ":" in host else host
    print(mask_text(f"dramaturg dashboard on http://{url_host}:{port}/ ({mode})"), flush=True)
    config = uvicorn.Config(app(settings, broker=broker), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[listener])
    return EXIT_OK
