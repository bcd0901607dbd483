"""The web dashboard: queues, held tasks, task lookup and batches in a browser.

``dramaturg dashboard`` serves it (loopback only unless ``--allow-remote``); a site mounts
it as an ASGI app::

    from starlette.routing import Mount
    import dramaturg, dramaturg.dashboard

    settings = dramaturg.load_settings()
    routes = [Mount("/jobs", app=dramaturg.dashboard.app(settings, admin=current_staff_name))]

Pages: queues (ready, delayed, in flight, held, dead, workers and the last minute's
counts, refreshed every few seconds), held tasks per queue (paged through the held
store's ``offset``/``limit``, so a queue of 100,000 held tasks is never loaded whole;
filtered by reason and actor through :meth:`dramaturg.HeldStore.find`), a held task's
page (arguments, context, reason, traceback, attempts, kicks), task lookup by message
id, batches with progress bars, schedules, and the live worker processes. Everything
they show comes from the public functions the CLI uses (:func:`dramaturg.queue_stats`,
:func:`dramaturg.held_tasks`, :func:`dramaturg.task_status`, :func:`dramaturg.batches`,
:func:`dramaturg.workers`); every page is masked
(:func:`dramaturg.masking.mask_text`) as a whole before it is sent, so a URL password in
an exception message never reaches a browser.

Safe by default: read-only unless an admin token (``[dashboard] token``,
``DRAMATURG_DASHBOARD_TOKEN``) or the mounting site's ``admin`` hook says who is an
admin (:mod:`dramaturg.dashboard.auth`); kick and purge are POSTs with a CSRF token, and
acting on all of a queue's held tasks asks for the queue's name first; each action is
logged (logger ``dramaturg.dashboard``) with who did it and from where.

The stack: Starlette (a small, typed, well-kept ASGI toolkit that any ASGI server or
site can mount), Jinja2 templates rendered on the server, and htmx (shipped in
``static/``, no CDN, no build step) for the live parts; uvicorn serves it from the CLI.
"""

from __future__ import annotations

import threading
from typing import Any

import dramatiq

from ..config import Settings
from .auth import AdminHook, Guard

__all__ = ["AdminHook", "app"]


def app(
    settings: Settings | None = None,
    *,
    broker: dramatiq.Broker | None = None,
    admin: AdminHook | None = None,
    token: str | None = None,
) -> Any:
    """The dashboard as an ASGI app (a :class:`starlette.applications.Starlette`).

    ``broker``: the broker to show; default: the one :func:`dramaturg.bootstrap` built,
    else one bootstrapped from ``settings`` (default: :func:`dramaturg.load_settings`) at
    the first request. ``token``: the admin token; default ``settings.dashboard.token``.
    ``admin``: the mounting site's hook, ``admin(request) -> name or None``, for sites
    whose own login decides who may kick and purge.
    """
    from .views import build

    if settings is None and broker is None:
        from ..config import load_settings

        settings = load_settings()
    if token is None and settings is not None and settings.dashboard.token is not None:
        token = settings.dashboard.token.get_secret_value()
    return build(_BrokerSource(settings, broker), Guard(token, admin))


class _BrokerSource:
    """The broker the dashboard shows, found at the first request (a site may mount the
    dashboard before it bootstraps)."""

    def __init__(self, settings: Settings | None, broker: dramatiq.Broker | None) -> None:
        self.settings = settings
        self._broker = broker
        self._lock = threading.Lock()

    def __call__(self) -> dramatiq.Broker:
        if self._broker is not None:
            return self._broker
        from .. import app as framework

        with self._lock:
            if self._broker is None:
                current = framework._broker
                self._broker = current if current is not None else framework.bootstrap(self.settings)
            return self._broker
