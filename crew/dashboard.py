"""The dashboard: one page that shows crew at work, live (``crew dashboard``, and the
gateway's ``/dashboard``).

::

    GET  /dashboard                    the page (one file: no build step, nothing fetched
                                       from elsewhere)
    GET  /dashboard/events             the views, as Server-Sent Events, one every 2 s
    POST /cancel/<correlation_id>      cancel a call a worker runs (refused when read-only)
    GET  /health                       200 {"broker": "up"} or 503 (``crew dashboard`` alone)

The views come from a :class:`~crew.watcher.Watcher`: every client of the page gets the
same text, made once per refresh; one that reads too slowly misses views, never gets a
backlog. Cancel is a write, refused as the gateway's other writes are
(:func:`crew.httpapi.write_refusal`: ``--read-only``, or a request from another origin).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from importlib import resources
from typing import Any, Sequence

from tornado.iostream import StreamClosedError
from tornado.web import Application, RedirectHandler, RequestHandler

from .cli import broker_from_options, setup_logging
from .exceptions import CrewError
from .httpapi import (BodyHandler, JSONHandler, NotFound, Refused, bad_request,
                      build_http_parser, log_request, run_http)
from .watcher import Watcher

__all__ = ["DEFAULT_PORT", "main", "make_app", "routes"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 8090
#: Seconds between keep-alive comments when no view comes (a proxy cuts a silent stream).
KEEPALIVE = 15.0


class PageHandler(RequestHandler):
    """``GET /dashboard``: the page, told whether it may offer Cancel."""

    def initialize(self, page: str) -> None:
        self.page = page

    def get(self) -> None:
        writable = "true" if self.settings.get("writable", True) else "false"
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Cache-Control", "no-cache")
        # The page runs nothing from elsewhere, and may not be framed by another site.
        self.set_header("Content-Security-Policy", "default-src 'self'; script-src "
                        "'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
                        "frame-ancestors 'none'")
        self.finish(self.page.replace("{{writable}}", writable))


class EventsHandler(JSONHandler):
    """``GET /dashboard/events``: a view at once, then each new one."""

    def initialize(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.pending: str | None = None
        self.woken = asyncio.Event()

    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # or nginx holds the events back
        self.watcher.listen(self.on_view)
        try:
            self.write(": dashboard\n\n")
            while not self.gone:
                view, self.pending = self.pending, None
                if view is not None:
                    self.write(f"data: {view}\n\n")
                await self.flush()
                try:
                    await asyncio.wait_for(self.woken.wait(), KEEPALIVE)
                except asyncio.TimeoutError:
                    self.write(": keep-alive\n\n")
                self.woken.clear()
        except StreamClosedError:
            return
        finally:
            self.watcher.unlisten(self.on_view)

    def on_view(self, view: str) -> None:
        self.pending = view  # a slow reader gets the newest view, not a backlog
        self.woken.set()

    def wake(self) -> None:
        self.woken.set()


class CancelHandler(BodyHandler):
    """``POST /cancel/<correlation_id>``: 202 once the notice is sent; 404 if no live
    worker reported the call; 503 while the dashboard has no broker connection."""

    def initialize(self, watcher: Watcher) -> None:
        self.watcher = watcher

    async def post(self, correlation_id: str) -> None:
        if self.refused:
            return
        with bad_request():
            if not 0 < len(correlation_id) <= 255:
                raise ValueError("a correlation id is 1 to 255 characters long")
        try:
            call = await self.watcher.cancel(correlation_id)
        except CrewError as exc:  # not connected, or the broker refused the notice
            raise Refused(503, type(exc).__name__, str(exc)) from None
        if call is None:
            raise Refused(404, "NotFound", f"no worker reported running call {correlation_id}")
        log.info("cancel notice sent for call %s (task %s)", correlation_id, call.get("task"))
        self.set_status(202)
        self.finish_json({"cancelled": correlation_id, "task": call.get("task")})


class HealthHandler(JSONHandler):
    """``GET /health`` of ``crew dashboard``: whether its broker connection is up."""

    def initialize(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def get(self) -> None:
        up = self.watcher.connected
        self.set_status(200 if up else 503)
        self.finish_json({"broker": "up" if up else "down"})


def routes(watcher: Watcher) -> list[Any]:
    """The dashboard's routes, for an application that serves it (the gateway's too)."""
    kwargs = {"watcher": watcher}
    page = resources.files("crew").joinpath("dashboard.html").read_text(encoding="utf-8")
    return [(r"/dashboard", PageHandler, {"page": page}),
            (r"/dashboard/events", EventsHandler, kwargs),
            (r"/cancel/([^/]+)", CancelHandler, kwargs)]


def make_app(watcher: Watcher, *, writable: bool = True, **settings: Any) -> Application:
    """``crew dashboard``'s application: the dashboard, ``/health``, and ``/`` to the page."""
    return Application([
        *routes(watcher), (r"/health", HealthHandler, {"watcher": watcher}),
        (r"/", RedirectHandler, {"url": "/dashboard"}),
    ], writable=writable, max_body=1024, log_function=functools.partial(log_request, log),
        default_handler_class=NotFound, **settings)


def main(argv: Sequence[str] | None = None, prog: str = "crew dashboard") -> None:
    """``crew dashboard``: serve the dashboard alone until SIGINT or SIGTERM; exits the
    process with its status."""
    parser = build_http_parser(prog, default_port=DEFAULT_PORT,
                               description="Serve crew's dashboard: tasks, workers, running "
                                           "calls and recent failures, live.",
                               read_only="refuse to cancel calls (the page shows no Cancel)")
    options = parser.parse_args(argv)
    setup_logging(options)
    try:
        watcher = Watcher(broker_from_options(options, "crew-dashboard"))
    except ValueError as exc:  # a bad URL: usage and status 2, not a traceback
        parser.error(str(exc))
    app = make_app(watcher, writable=not options.read_only)
    sys.exit(run_http(app, None, options, also=[watcher]))


if __name__ == "__main__":
    main()

