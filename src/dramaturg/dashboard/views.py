"""The dashboard's pages and actions (Starlette routes), built by :func:`build`.

Handlers are plain functions, so Starlette runs them in its thread pool: the held store,
the statistics readers and the state store are blocking clients. Links are made from
the request's ``root_path``, so the app works mounted under any prefix.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import dramatiq
import jinja2
import markupsafe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..batches import batches
from ..errors import (
    BrokerUnreachable,
    ConfigError,
    DramaturgError,
    KickError,
    QueueNotFound,
    SendError,
    StateUnavailable,
)
from ..held import HeldStore, held_tasks
from ..masking import mask_text
from ..queue_admin import MAX_PEEK, peek_queue, purge_queue
from ..state_redis import no_store_reason
from ..stats import QueueStats, queue_stats, totals
from ..status import state_store, task_status
from ..workers import registry as worker_registry
from ..workers import registry_of, workers
from .auth import CSRF_COOKIE, CSRF_FIELD, SESSION_COOKIE, SESSION_S, Guard
from .chart import HEIGHT as CHART_H
from .chart import WIDTH as CHART_W
from .chart import MinuteChart, minute_chart

logger = logging.getLogger("dramaturg.dashboard")

HERE = Path(__file__).parent
#: Held tasks per page (the store's ``limit``); ``?limit=`` may ask for up to :data:`MAX_PAGE`.
PAGE = 50
MAX_PAGE = 500
#: How often the live parts refresh (htmx polling), seconds.
REFRESH_S = 2

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def _when(ms: int | None) -> str:
    if not ms or ms <= 0:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(value: int | float | None) -> str:
    return "-" if value is None else f"{value:,}"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=repr)


_templates.filters.update(when=_when, number=_number, pretty=_pretty)


class Dashboard:
    """The state of one dashboard app: where its broker comes from, who may act."""

    def __init__(self, broker: Callable[[], dramatiq.Broker], guard: Guard) -> None:
        self.broker = broker
        self.guard = guard

    # -- rendering ---------------------------------------------------------------------

    def render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
        """The page ``template`` with the shared context; masked as a whole (the last line
        of defence: fields are masked when stored, and this catches what was not)."""
        cookie, new_cookie = self.guard.csrf_cookie(request)
        admin = self.guard.admin(request)
        html = _templates.get_template(template).render(
            base=request.scope.get("root_path", ""),
            admin=admin,
            read_only=self.guard.read_only,
            can_sign_in=self.guard.can_sign_in,
            csrf_field=CSRF_FIELD,
            csrf_token=self.guard.csrf_token(cookie),
            notice=request.query_params.get("notice"),
            refresh_s=REFRESH_S,
            path=request.url.path,
            **context,
        )
        response = HTMLResponse(mask_text(html), status_code=status_code)
        if new_cookie:
            response.set_cookie(CSRF_COOKIE, cookie, httponly=True, samesite="strict", path=_cookie_path(request))
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        return response

    def error(self, request: Request, message: str, status_code: int) -> Response:
        return self.render(request, "error.html", status_code=status_code, message=message, title="Error")

    def store(self) -> HeldStore:
        return held_tasks(self.broker())

    # -- pages -------------------------------------------------------------------------

    def queues(self, request: Request) -> Response:
        return self._queues(request, "queues.html")

    def queues_table(self, request: Request) -> Response:
        return self._queues(request, "_queues_table.html")

    def _queues(self, request: Request, template: str) -> Response:
        rows: list[QueueStats] = []
        problem = None
        started = time.perf_counter()
        charts: dict[str, MinuteChart] | None = None
        history_problem = None
        try:
            rows = queue_stats(broker=self.broker())
        except Exception as error:  # the broker's client error too: one line on the page
            problem = _unreachable(error)
        if rows:
            try:
                names = [row.queue for row in rows]
                history = state_store(self.broker()).minute_history(names)
                charts = {queue: minute_chart(queue, history[queue]) for queue in names}
            except StateUnavailable:
                history_problem = no_store_reason(self.broker(), needs="the chart of the last hour needs")
            except Exception as error:  # the state store's client error: one line, the table stays
                history_problem = _unreachable(error)
        return self.render(
            request,
            template,
            title="Queues",
            rows=rows,
            totals=totals(rows) if rows else None,
            problem=problem,
            read_ms=round((time.perf_counter() - started) * 1000, 1),
            now=_when(int(time.time() * 1000)),
            charts=charts,
            history_problem=history_problem,
            chart_w=CHART_W,
            chart_h=CHART_H,
        )

    def waiting(self, request: Request) -> Response:
        """The next waiting tasks of a queue (:func:`dramaturg.peek_queue`), and (admin) its purge form."""
        queue = request.path_params["queue"]
        limit = _int_param(request, "limit", PAGE, 1, MAX_PEEK)
        try:
            tasks = peek_queue(queue, limit, self.broker())
            row = queue_stats([queue], self.broker())[0]
        except (QueueNotFound, SendError) as error:
            return self.error(request, str(error), 404)
        except Exception as error:
            return self.error(request, _unreachable(error), 503)
        return self.render(
            request, "queue_waiting.html", title=f"Waiting: {queue}", queue=queue, tasks=tasks, row=row, limit=limit
        )

    def held_index(self, request: Request) -> Response:
        store = self.store()
        try:
            counts = [(queue, store.count(queue)) for queue in sorted(store.queues())]
        except Exception as error:
            return self.error(request, _unreachable(error), 503)
        return self.render(request, "held_index.html", title="Held tasks", counts=counts)

    def held_list(self, request: Request) -> Response:
        queue = request.path_params["queue"]
        store = self.store()
        try:
            store.check_queue(queue)
        except DramaturgError as error:
            return self.error(request, str(error), 404)
        offset = _int_param(request, "offset", 0, 0, 10**12)
        limit = _int_param(request, "limit", PAGE, 1, MAX_PAGE)
        # Filters: the reason contains this text (ignoring case); the actor is this one.
        reason = " ".join(request.query_params.get("reason", "").split())[:200]
        actor = request.query_params.get("actor", "").strip()[:200]
        matches = None
        try:
            total = store.count(queue)
            if reason or actor:
                matches = store.find(queue, reason=reason, actor=actor, offset=offset, limit=limit)
                tasks, shown_of = matches.tasks, matches.matched
            else:
                tasks, shown_of = store.list(queue, offset=offset, limit=limit), total
        except Exception as error:
            return self.error(request, _unreachable(error), 503)
        filters = {name: value for name, value in (("reason", reason), ("actor", actor)) if value}

        def page(at: int) -> str:
            return "?" + urlencode({"offset": at, "limit": limit, **filters})

        return self.render(
            request,
            "held_list.html",
            title=f"Held: {queue}",
            queue=queue,
            tasks=tasks,
            total=total,
            offset=offset,
            limit=limit,
            reason=reason,
            actor=actor,
            matches=matches,
            actors=sorted(self.broker().get_declared_actors()),
            previous=page(max(offset - limit, 0)) if offset > 0 else None,
            next=page(offset + limit) if offset + len(tasks) < shown_of else None,
        )

    def held_task(self, request: Request) -> Response:
        queue = request.path_params["queue"]
        message_id = request.query_params.get("id", "")
        store = self.store()
        try:
            store.check_queue(queue)
        except DramaturgError as error:
            return self.error(request, str(error), 404)
        try:
            task = store.get(message_id, queue) if message_id else None
        except Exception as error:
            return self.error(request, _unreachable(error), 503)
        if task is None:
            return self.error(request, f"no held task {message_id!r} in {queue}: it was kicked or purged", 404)
        return self.render(
            request,
            "held_task.html",
            title=f"Held task {message_id}",
            queue=queue,
            task=task,
            fields=asdict(task),
        )

    def confirm(self, request: Request) -> Response:
        """The page that asks before an action on every held task of a queue."""
        queue = request.path_params["queue"]
        action = request.query_params.get("action")
        if action not in {"kick", "purge"}:
            return self.error(request, "confirm what? (action=kick or action=purge)", 400)
        try:
            self.store().check_queue(queue)
        except DramaturgError as error:
            return self.error(request, str(error), 404)
        try:
            count = self.store().count(queue)
        except Exception as error:
            return self.error(request, _unreachable(error), 503)
        return self.render(
            request, "confirm.html", title=f"{action.title()} all of {queue}", queue=queue, action=action, count=count
        )

    def lookup(self, request: Request) -> Response:
        message_id = request.query_params.get("id", "").strip()
        status = None
        problem = None
        if message_id:
            try:
                status = task_status(message_id, self.broker())
            except StateUnavailable as error:
                problem = str(error)
            except Exception as error:
                problem = _unreachable(error)
        return self.render(
            request,
            "lookup.html",
            title="Task lookup",
            message_id=message_id,
            status=status.to_dict() if status else None,
            state=status.state if status else None,
            held_queue=status.queue if status and status.state == "held" else None,
            problem=problem,
        )

    def batch_list(self, request: Request) -> Response:
        rows = []
        problem = None
        try:
            rows = list(batches(limit=50, broker=self.broker()))
        except StateUnavailable as error:
            problem = str(error)
        except Exception as error:
            problem = _unreachable(error)
        return self.render(request, "batches.html", title="Batches", batches=rows, problem=problem)

    def schedules(self, request: Request) -> Response:
        rows = []
        problem = None
        try:
            from ..schedules import load_schedules, schedule_infos

            broker = self.broker()
            rows = schedule_infos(load_schedules(self._settings(), broker), broker)
        except (StateUnavailable, ConfigError) as error:
            problem = str(error)
        except Exception as error:
            problem = _unreachable(error)
        return self.render(request, "schedules.html", title="Schedules", schedules=rows, problem=problem)

    def worker_list(self, request: Request) -> Response:
        return self._workers(request, "workers.html")

    def workers_table(self, request: Request) -> Response:
        return self._workers(request, "_workers_table.html")

    def _workers(self, request: Request, template: str) -> Response:
        """The live worker processes (:func:`dramaturg.workers`); without a state store, one line saying so."""
        rows = []
        problem = None
        interval_ms, ttl_ms = worker_registry.INTERVAL_MS, worker_registry.TTL_MS
        try:
            broker = self.broker()
            registry = registry_of(broker)
            interval_ms, ttl_ms = registry.interval_ms, registry.ttl_ms
            rows = workers(broker)
        except StateUnavailable as error:
            problem = str(error)
        except Exception as error:
            problem = _unreachable(error)
        return self.render(
            request,
            template,
            title="Workers",
            workers=rows,
            problem=problem,
            now_ms=int(time.time() * 1000),
            interval_s=f"{interval_ms / 1000:g}",
            ttl_s=f"{ttl_ms / 1000:g}",
        )

    def _settings(self) -> Any:
        """The settings the dashboard's broker was made from (for the config file's schedules)."""
        from .. import app as framework

        settings = getattr(self.broker, "settings", None) or framework.current_settings_or_none()
        if settings is None:
            from ..config import load_settings

            settings = load_settings()
        return settings

    # -- signing in ----------------------------------------------------------------------

    def login_form(self, request: Request) -> Response:
        return self.render(request, "login.html", title="Sign in", problem=None)

    async def login(self, request: Request) -> Response:
        form = await request.form()
        if not self.guard.csrf_ok(request, _text(form.get(CSRF_FIELD))):
            return _forbidden("the form's CSRF token is missing or wrong: reload the page and try again")
        if not self.guard.can_sign_in:
            return _forbidden("no admin token is configured ([dashboard] token): the dashboard is read-only")
        name = " ".join((_text(form.get("name")) or "").replace("|", " ").split())[:64] or "admin"
        if not self.guard.token_matches(_text(form.get("token")) or ""):
            logger.warning("dashboard: a sign-in as %r from %s failed: wrong token", name, _client(request))
            return self.render(request, "login.html", status_code=403, title="Sign in", problem="wrong token")
        logger.info("dashboard: %s signed in from %s", name, _client(request))
        response = RedirectResponse(_base(request) + "/queues", status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            self.guard.session_cookie(name),
            max_age=SESSION_S,
            httponly=True,
            samesite="strict",
            path=_cookie_path(request),
        )
        return response

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        if not self.guard.csrf_ok(request, _text(form.get(CSRF_FIELD))):
            return _forbidden("the form's CSRF token is missing or wrong: reload the page and try again")
        response = RedirectResponse(_base(request) + "/queues", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=_cookie_path(request))
        return response

    # -- actions ---------------------------------------------------------------------------

    async def act(self, request: Request) -> Response:
        """``POST /held/<queue>/kick`` and ``/purge``: the ids given (``id``, repeated), or
        every held task of the queue (``all=1`` with ``confirm=<queue>``)."""
        from starlette.concurrency import run_in_threadpool

        queue = request.path_params["queue"]
        action = request.path_params["action"]
        if action not in {"kick", "purge"}:
            return self.error(request, f"no action {action!r}: kick or purge", 404)
        form = await request.form()
        if not self.guard.csrf_ok(request, _text(form.get(CSRF_FIELD))):
            return _forbidden("the form's CSRF token is missing or wrong: reload the page and try again")
        who = self.guard.admin(request)
        if who is None:
            logger.warning("dashboard: %s on %s refused from %s: not signed in", action, queue, _client(request))
            return _forbidden("read-only: sign in with the admin token to kick or purge")
        ids = [value for value in form.getlist("id") if isinstance(value, str) and value]
        every = form.get("all") == "1"
        if every and _text(form.get("confirm")) != queue:
            return self.error(request, f"to {action} every held task of {queue}, type its name to confirm", 400)
        if not every and not ids:
            return self.error(request, f"nothing to {action}: select held tasks, or use {action} all", 400)
        return await run_in_threadpool(self._act, request, who, queue, action, None if every else ids)

    async def purge_waiting(self, request: Request) -> Response:
        """``POST /queues/<queue>/purge``: drop the waiting tasks of the queue (``delayed=1``:
        the delayed ones too), with ``confirm=<queue>``; as ``dramaturg queue purge``."""
        from starlette.concurrency import run_in_threadpool

        queue = request.path_params["queue"]
        form = await request.form()
        if not self.guard.csrf_ok(request, _text(form.get(CSRF_FIELD))):
            return _forbidden("the form's CSRF token is missing or wrong: reload the page and try again")
        who = self.guard.admin(request)
        if who is None:
            logger.warning("dashboard: purge of queue %s refused from %s: not signed in", queue, _client(request))
            return _forbidden("read-only: sign in with the admin token to purge a queue")
        if _text(form.get("confirm")) != queue:
            return self.error(request, f"to purge every waiting task of {queue}, type its name to confirm", 400)
        delayed = form.get("delayed") == "1"
        return await run_in_threadpool(self._purge_waiting, request, who, queue, delayed)

    def _purge_waiting(self, request: Request, who: str, queue: str, delayed: bool) -> Response:
        what = "waiting and delayed" if delayed else "waiting"
        try:
            done = purge_queue(queue, delayed=delayed, broker=self.broker())
        except (QueueNotFound, SendError) as error:
            return self.error(request, str(error), 404)
        except Exception as error:
            line = _unreachable(error)
            logger.error("dashboard: %s's purge of queue %s failed: %s", who, queue, line)
            return self.error(request, line, 503)
        notice = f"purged {done} {what} task{'' if done == 1 else 's'} of {queue}"
        logger.info(
            "dashboard: %s %s from %s",
            who,
            notice,
            _client(request),
            extra={"dramaturg": {"actor": who, "action": "queue purge", "queue": queue, "count": done}},
        )
        return RedirectResponse(f"{_base(request)}/queues/{queue}?{urlencode({'notice': notice})}", status_code=303)

    def _act(self, request: Request, who: str, queue: str, action: str, ids: list[str] | None) -> Response:
        store = self.store()
        try:
            store.check_queue(queue)
        except DramaturgError as error:
            return self.error(request, str(error), 404)
        what = "every held task" if ids is None else ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
        problem = None
        try:
            if action == "kick":
                try:
                    done = store.kick(queue, ids)
                except KickError as error:
                    done, problem = error.kicked, str(error)
                verb = "requeued"
            else:
                done = store.purge(queue, ids)
                verb = "purged"
        except Exception as error:  # nothing was done, or (purge) it cannot be told how much
            line = _unreachable(error)
            logger.error("dashboard: %s's %s on %s (%s) failed: %s", who, action, queue, what, line)
            return self.error(request, line, 503)
        logger.info(
            "dashboard: %s %s %d held task%s of %s (%s) from %s",
            who,
            verb,
            done,
            "" if done == 1 else "s",
            queue,
            what,
            _client(request),
            extra={"dramaturg": {"actor": who, "action": action, "queue": queue, "count": done}},
        )
        notice = f"{verb} {done} held task{'' if done == 1 else 's'} of {queue}"
        if problem:
            notice += f"; {problem}"
        elif ids is not None and done < len(ids):
            notice += f" ({len(ids) - done} of the selected were no longer held)"
        return RedirectResponse(
            f"{_base(request)}/held/{queue}?{urlencode({'notice': notice})}",
            status_code=303,
        )


def _unreachable(error: Exception) -> str:
    """One line for an error of the broker or the state store (masked when rendered)."""
    if isinstance(error, BrokerUnreachable):
        return str(error)
    # A client library's own error (redis-py, pika): the traceback goes to the log (masked
    # there too), in case it is a bug rather than a broker that is down.
    logger.warning("dashboard: %s: %s", type(error).__name__, error, exc_info=error)
    return f"the broker did not answer: {type(error).__name__}: {error}"


def _forbidden(message: str) -> Response:
    return HTMLResponse(f"<!doctype html><title>403</title><p>{_escape(message)}</p>", status_code=403)


def _escape(text: str) -> str:
    return str(markupsafe.escape(text))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _base(request: Request) -> str:
    return str(request.scope.get("root_path", ""))


def _cookie_path(request: Request) -> str:
    return _base(request) or "/"


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(request.query_params.get(name, default))
    except ValueError:
        return default
    return min(max(value, low), high)


def build(broker: Callable[[], dramatiq.Broker], guard: Guard) -> Starlette:
    """The Starlette app of a dashboard showing ``broker()``, with ``guard`` deciding who acts."""
    board = Dashboard(broker, guard)

    def home(request: Request) -> Response:
        return RedirectResponse(_base(request) + "/queues", status_code=303)

    routes = [
        Route("/", home),
        Route("/queues", board.queues),
        Route("/queues/table", board.queues_table),
        Route("/queues/{queue}", board.waiting),
        Route("/queues/{queue}/purge", board.purge_waiting, methods=["POST"]),
        Route("/held", board.held_index),
        Route("/held/{queue}", board.held_list),
        Route("/held/{queue}/task", board.held_task),
        Route("/held/{queue}/confirm", board.confirm),
        Route("/held/{queue}/{action:str}", board.act, methods=["POST"]),
        Route("/tasks", board.lookup),
        Route("/batches", board.batch_list),
        Route("/schedules", board.schedules),
        Route("/workers", board.worker_list),
        Route("/workers/table", board.workers_table),
        Route("/login", board.login_form, methods=["GET"]),
        Route("/login", board.login, methods=["POST"]),
        Route("/logout", board.logout, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    application = Starlette(routes=routes)
    application.state.dashboard = board
    return application
