"""An HTTP gateway to any crew task and to pubsub channels: ``python -m crew.gateway``.

::

    POST /call/<task>?priority=N&expiration=S   the JSON body in, the task's result as JSON out
    GET  /subscribe/<channel>                   long-poll: the next message, or 204 No Content
    GET  /events/<channel>                      the channel's messages as Server-Sent Events
    POST /publish/<channel>                     publish the JSON body on the channel
    GET  /health                                200 {"broker": "up", ...} or 503
    GET  /metrics                               Prometheus metrics (with crew[metrics])
    GET  /dashboard, POST /cancel/<id>          the dashboard (crew.dashboard; --no-dashboard)

Errors are JSON, ``{"error": "<name>", "message": "..."}``: 400 bad request or bad JSON,
404 unknown task, 413 body over ``max_body``, 502 the task raised (``type`` names it), its
result is not JSON or it killed its worker at every delivery, 503 expired (no worker took the
call) or broker down, 504 the job was interrupted at its deadline. A client that disconnects
cancels its call. Each request logs one line (status, method, path, time, error name), never a body.
docs/GATEWAY.md shows every endpoint with curl.

Not for untrusted networks as it is: whoever reaches it can call every task. It listens on
127.0.0.1 unless told otherwise; put an authenticating proxy in front of it. ``--read-only``
refuses every write (call, publish, cancel): 403, as for a write from another origin.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import sys
from typing import Any, Sequence

from tornado.iostream import StreamClosedError
from tornado.web import Application

from . import dashboard, protocol, validation
from .cli import broker_from_options, setup_logging
from .client import Client
from .exceptions import (ConnectionLostError, CrewError, DeliveryLimitError, EncodeError,
                         ExpirationError, RemoteError, TimeoutError, UnknownTaskError)
from .httpapi import (BodyHandler, JSONHandler, MetricsHandler, NotFound, Refused, bad_request,
                      build_http_parser, dumps, log_request, run_http)
from .watcher import Watcher

__all__ = ["DEFAULT_MAX_BODY", "DEFAULT_POLL_TIMEOUT", "Listening", "main", "make_app"]

log = logging.getLogger(__name__)

#: Largest request body accepted; a larger one gets 413.
DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_POLL_TIMEOUT = 30.0  # seconds /subscribe waits for a message before 204
#: Seconds between keep-alive comments on a quiet ``/events`` stream (proxies cut silent ones).
DEFAULT_KEEPALIVE = 15.0
#: Messages an ``/events`` stream holds for a slow reader; past it, the stream ends.
SSE_BACKLOG = 1000

#: HTTP status of each error a call or publish can end with; the first match counts.
_STATUS_OF: tuple[tuple[type[CrewError], int], ...] = (
    (UnknownTaskError, 404), (ExpirationError, 503), (TimeoutError, 504), (RemoteError, 502),
    (DeliveryLimitError, 502), (ConnectionLostError, 503), (EncodeError, 400), (CrewError, 502))
_GONE = object()  # what a waiting request gets when its HTTP client disconnects


class Listening:
    """How many requests listen on each channel; ``changed`` is set at every change."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.changed = asyncio.Event()

    def add(self, channel: str, delta: int) -> None:
        self.counts[channel] += delta
        if self.counts[channel] <= 0:
            del self.counts[channel]
        self.changed.set()


class CallHandler(BodyHandler):
    """``POST /call/<task>``: call the task with the JSON body, answer its result."""

    call: asyncio.Task[Any] | None = None

    async def post(self, task: str) -> None:
        if self.refused:
            return
        # Transient: the reply can only reach this process's reply queue, which a broker
        # restart deletes; a persisted call would run after the restart for no one (and
        # persisting costs the broker a disk write per call).
        options: dict[str, Any] = {"persistent": False}
        with bad_request():
            validation.validate_task_name(task)
            if (priority := self.get_query_argument("priority", None)) is not None:
                options["priority"] = validation.validate_priority(int(priority))
            if (expiration := self.get_query_argument("expiration", None)) is not None:
                options["expiration"] = validation.validate_expiration(float(expiration))
        self.call = asyncio.ensure_future(self.client.call(task, self.json_body(), **options))
        try:
            result = await self.call
        except asyncio.CancelledError:
            if not self.gone:
                raise
            self.set_status(499, "Client Closed Request")  # nginx's code, for the log line
            return
        except CrewError as exc:
            raise _crew_error(exc) from None
        self.finish_json(result)

    def wake(self) -> None:
        if self.call is not None:
            self.call.cancel()  # the client tells the worker, which interrupts the job


class PublishHandler(BodyHandler):
    """``POST /publish/<channel>``: publish the JSON body to the channel's subscribers."""

    async def post(self, channel: str) -> None:
        if self.refused:
            return
        with bad_request():
            validation.validate_channel(channel)
        try:
            await self.client.publish(channel, self.json_body())
        except CrewError as exc:
            raise _crew_error(exc) from None
        self.finish_json({"published": channel})


class _ListenHandler(JSONHandler):
    """Subscribes the request to a channel for as long as it lasts."""

    channel = ""

    async def listen(self, channel: str) -> None:
        with bad_request():
            validation.validate_channel(channel, pattern=True)
        if not self.client.connected:
            raise Refused(503, "ConnectionLostError", "the gateway is not connected")
        try:
            await self.client.subscribe(channel, self.on_message)
        except CrewError as exc:
            self.client.unsubscribe(channel, self.on_message)
            raise _crew_error(exc) from None
        self.channel = channel
        self.settings["listening"].add(channel, 1)

    def stop_listening(self) -> None:
        if self.channel:
            self.client.unsubscribe(self.channel, self.on_message)
            self.settings["listening"].add(self.channel, -1)
            self.channel = ""

    def on_message(self, data: Any) -> None:
        raise NotImplementedError


class SubscribeHandler(_ListenHandler):
    """``GET /subscribe/<channel>``: the channel's next message, or 204 after the timeout."""

    async def get(self, channel: str) -> None:
        self.waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            await self.listen(channel)
            data = await asyncio.wait_for(self.waiter, self.settings["poll_timeout"])
        except asyncio.TimeoutError:
            self.set_status(204)
            return
        finally:
            self.stop_listening()
        if data is _GONE:
            self.set_status(499, "Client Closed Request")
        else:
            self.finish_json(data)

    def on_message(self, data: Any) -> None:
        if not self.waiter.done():
            self.waiter.set_result(data)

    def wake(self) -> None:
        if hasattr(self, "waiter"):
            self.on_message(_GONE)


class EventsHandler(_ListenHandler):
    """``GET /events/<channel>``: the channel's messages as Server-Sent Events, each one
    ``data: <json>``. A ``: subscribed`` comment comes first, once the subscription is in
    place, then ``: keep-alive`` comments whenever the channel is quiet."""

    async def get(self, channel: str) -> None:
        self.backlog: collections.deque[Any] = collections.deque()
        self.woken = asyncio.Event()
        self.overflow = False
        try:
            await self.listen(channel)
            self.set_header("Content-Type", "text/event-stream")
            self.set_header("Cache-Control", "no-cache")
            self.set_header("X-Accel-Buffering", "no")  # or nginx holds the events back
            self.write(": subscribed\n\n")
            while not self.gone and not self.overflow:
                await self.flush()
                try:
                    await asyncio.wait_for(self.woken.wait(), self.settings["keepalive"])
                except asyncio.TimeoutError:
                    self.write(": keep-alive\n\n")
                self.woken.clear()
                while self.backlog:
                    self.write(_event(self.backlog.popleft()))
        except StreamClosedError:
            return
        finally:
            self.stop_listening()
        if self.overflow:
            log.warning("events of %s: the client reads too slowly; stream ended", channel)

    def on_message(self, data: Any) -> None:
        if len(self.backlog) < SSE_BACKLOG:
            self.backlog.append(data)
        else:
            self.overflow = True
        self.woken.set()

    def wake(self) -> None:
        if hasattr(self, "woken"):
            self.woken.set()


class HealthHandler(JSONHandler):
    """``GET /health``: whether the broker connection is up, and how many listen."""

    def get(self) -> None:
        up = self.client.connected
        self.set_status(200 if up else 503)
        self.finish_json({"broker": "up" if up else "down",
                          "listeners": sum(self.settings["listening"].counts.values())})


def _crew_error(exc: CrewError) -> Refused:
    status = next(code for kind, code in _STATUS_OF if isinstance(exc, kind))
    if isinstance(exc, RemoteError):
        return Refused(status, "RemoteError", exc.message, type=exc.type)
    return Refused(status, type(exc).__name__, str(exc))


def _event(data: Any) -> str:
    try:
        return f"data: {dumps(data)}\n\n"
    except (TypeError, ValueError):
        return ": a message JSON cannot carry was skipped\n\n"


def make_app(client: Client, *, max_body: int = DEFAULT_MAX_BODY,
             poll_timeout: float = DEFAULT_POLL_TIMEOUT, keepalive: float = DEFAULT_KEEPALIVE,
             watcher: Watcher | None = None, writable: bool = True,
             **settings: Any) -> Application:
    """The gateway's Tornado application around ``client`` (connected by the caller).

    ``max_body``: bytes, at most the broker limit (16 MiB). ``poll_timeout`` and
    ``keepalive``: seconds. ``watcher``: serve the dashboard from it (started by the caller).
    ``writable`` False refuses every write (403). ``settings``: Tornado's.
    """
    if not isinstance(max_body, int) or not 0 < max_body <= protocol.MAX_BODY_BYTES:
        raise ValueError(f"max_body must be 1..{protocol.MAX_BODY_BYTES} bytes, got {max_body!r}")
    if not poll_timeout > 0 or not keepalive > 0:
        raise ValueError("poll_timeout and keepalive must be more than 0 seconds")
    return Application([
        (r"/call/([^/]+)", CallHandler), (r"/subscribe/([^/]+)", SubscribeHandler),
        (r"/events/([^/]+)", EventsHandler), (r"/publish/([^/]+)", PublishHandler),
        (r"/health", HealthHandler), (r"/metrics", MetricsHandler),
        *(dashboard.routes(watcher) if watcher is not None else ()),
    ], crew=client, listening=Listening(), max_body=max_body, poll_timeout=poll_timeout,
        keepalive=keepalive, writable=writable, log_function=functools.partial(log_request, log),
        default_handler_class=NotFound, **settings)


def main(argv: Sequence[str] | None = None, prog: str = "python -m crew.gateway") -> None:
    """``python -m crew.gateway`` (and ``crew gateway``): serve the gateway until SIGINT or
    SIGTERM; exits the process with its status."""
    parser = build_http_parser(prog, default_port=8080,
                               description="Serve every crew task and pubsub channel over HTTP.",
                               read_only="refuse calls, publishes and cancels (403)")
    parser.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY,
                        help="largest request body in bytes (default %(default)s)")
    parser.add_argument("--poll-timeout", type=float, default=DEFAULT_POLL_TIMEOUT,
                        help="seconds /subscribe waits before 204 (default %(default)s)")
    parser.add_argument("--no-dashboard", action="store_true", help="serve no /dashboard "
                        "(and hear no worker's figures: a large crew sends many)")
    options = parser.parse_args(argv)
    setup_logging(options)
    try:
        broker = broker_from_options(options, "crew-gateway")
        client, watcher = Client(broker=broker), None if options.no_dashboard else Watcher(broker)
        app = make_app(client, max_body=options.max_body, poll_timeout=options.poll_timeout,
                       watcher=watcher, writable=not options.read_only)
    except ValueError as exc:  # a bad URL or option: usage and status 2, not a traceback
        parser.error(str(exc))
    sys.exit(run_http(app, client, options, also=[watcher] if watcher else []))


if __name__ == "__main__":
    main()
