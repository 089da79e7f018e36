"""Tornado plumbing for crew's JSON-over-HTTP endpoints (internal; :mod:`crew.gateway` uses it).

- Errors, crew's and Tornado's own, answer ``{"error": "<name>", "message": "..."}``.
- A request body over the application's ``max_body`` setting gets 413 and is not read.
- Each request logs one line (status, method, path, time, error name); never a body.
- A handler learns that its HTTP client disconnected through :meth:`JSONHandler.wake`.
- :class:`MetricsHandler` serves the process's Prometheus metrics (``crew[metrics]``).
- The command lines of HTTP servers (``python -m crew.gateway``, ``python -m master_example``)
  share :func:`build_http_parser` and :func:`run_http`, which serves an application with its
  client until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from typing import TYPE_CHECKING, Any, Awaitable, Iterator, Protocol, Sequence
from urllib.parse import urlsplit

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, HTTPError, RequestHandler, stream_request_body

from . import codec, metrics, protocol
from .cli import add_broker_arguments, add_logging_arguments
from .exceptions import CodecError, CrewError

if TYPE_CHECKING:
    from .client import Client

__all__ = ["BodyHandler", "JSONHandler", "MetricsHandler", "NotFound", "Refused", "bad_request",
           "build_http_parser", "dumps", "log_request", "run_http", "write_refusal"]

# The command line's logger, as when these lines were logged from crew.cli.
log = logging.getLogger("crew")


class Refused(HTTPError):
    """Ends a request with a JSON error; ``extra`` adds fields to the body."""

    def __init__(self, status: int, error: str, message: str, **extra: Any) -> None:
        super().__init__(status)
        self.error, self.message, self.extra = error, message, extra


class JSONHandler(RequestHandler):
    """Answers JSON, errors included; ``settings["crew"]`` is the application's client."""

    error_name = ""  # for the request's log line
    gone = False  # the HTTP client disconnected

    @property
    def client(self) -> "Client":
        client: Client = self.settings["crew"]
        return client

    def finish_json(self, value: Any) -> None:
        try:
            body = dumps(value)
        except (TypeError, ValueError) as exc:
            raise Refused(502, "EncodeError", f"the result is not JSON: {exc}") from None
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(body)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, Refused):
            body = {"error": exc.error, "message": exc.message, **exc.extra}
        else:  # Tornado's own errors: 405, or 500 for a bug (logged with its traceback)
            body = {"error": self._reason.replace(" ", ""), "message": self._reason}
        self.error_name = body["error"]
        self.finish(body)

    def on_connection_close(self) -> None:
        self.gone = True
        super().on_connection_close()
        self.wake()

    def wake(self) -> None:
        """Called when the client disconnects: end whatever the request waits for."""


class NotFound(JSONHandler):
    """The application's ``default_handler_class``: 404 in JSON."""

    def prepare(self) -> None:
        raise Refused(404, "NotFound", f"no endpoint {self.request.path}")


class MetricsHandler(JSONHandler):
    """``GET /metrics``: every metric of the process (prometheus_client's default registry:
    crew's and the application's) in Prometheus' text format; 404 without ``crew[metrics]``."""

    def get(self) -> None:
        if not metrics.AVAILABLE:
            raise Refused(404, "NotFound", "metrics need the crew[metrics] extra "
                                           "(prometheus_client)")
        body, content_type = metrics.exposition()
        self.set_header("Content-Type", content_type)
        self.finish(body)


@stream_request_body
class BodyHandler(JSONHandler):
    """Reads the body itself, so that one over ``settings["max_body"]`` gets 413 unread."""

    refused = False

    def prepare(self) -> None:
        self.body = bytearray()
        refusal = write_refusal(self)
        if refusal is not None:
            self.refused = True
            self.send_error(refusal.status_code, exc_info=(None, refusal, None))
            return
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.settings["max_body"]:
            # Tornado answers a body over its own limit with a bare 400: lift that limit for
            # this request. Finishing before the body is read closes the connection.
            self.request.connection.set_max_body_size(  # type: ignore[union-attr]
                int(length))
            self.refuse_body()

    def data_received(self, chunk: bytes) -> None:
        if not self.refused:
            self.body += chunk
            if len(self.body) > self.settings["max_body"]:  # chunked: no Content-Length
                self.refuse_body()

    def refuse_body(self) -> None:
        self.refused = True
        self.send_error(413, exc_info=(None, Refused(
            413, "BodyTooLarge", f"the body is over {self.settings['max_body']} bytes"), None))

    def json_body(self) -> Any:
        """The body as JSON (an empty body is ``null``), or 400 BadJSON. Read by crew's
        codec, within its decode budget: a body of tiny containers is refused like bad JSON."""
        if not self.body.strip():
            return None
        try:
            return codec.decode(self.body, protocol.JSON)
        except CodecError as exc:
            raise Refused(400, "BadJSON", f"the body is not JSON: {exc}") from None


def write_refusal(handler: RequestHandler) -> Refused | None:
    """Why a write request (a call, a publish, a cancel) is refused, or None.

    With the ``writable`` setting False (``--read-only``) every write is refused. A
    request that a browser sent from another origin is refused too: a page on another site
    could otherwise make a visitor's browser call tasks or cancel calls here (the gateway
    answers no CORS preflight, so only such "simple" requests could get through).
    """
    if not handler.settings.get("writable", True):
        return Refused(403, "ReadOnly", "this server is read-only (--read-only)")
    origin = handler.request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != handler.request.host:
        return Refused(403, "CrossOrigin", f"a request from another origin ({origin:.200}) "
                                           "may not write here")
    return None


@contextlib.contextmanager
def bad_request() -> Iterator[None]:
    """Turn the ``ValueError``/``TypeError`` of a validation into 400 BadRequest."""
    try:
        yield
    except (TypeError, ValueError) as exc:
        raise Refused(400, "BadRequest", str(exc)) from None


def dumps(value: Any) -> str:
    """JSON on one line; bytes (msgpack's bin type) become text. ValueError (or TypeError)
    for what JSON cannot carry, nesting deeper than the stack allows included."""
    def text(obj: Any) -> str:
        if isinstance(obj, (bytes, bytearray)):
            return obj.decode("utf-8", errors="replace")
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, default=text)
    except RecursionError:  # msgpack bodies nest up to 1000 deep
        raise ValueError("nested too deep to write as JSON") from None


def log_request(log: logging.Logger, handler: RequestHandler) -> None:
    """One line on ``log`` per request; ``functools.partial`` it into ``log_function``."""
    status = handler.get_status()
    level = logging.ERROR if status == 500 else logging.WARNING if status >= 400 else logging.INFO
    error = getattr(handler, "error_name", "")
    log.log(level, "%d %s %s %.1f ms%s", status, handler.request.method, handler.request.path,
            1000 * handler.request.request_time(), f" {error}" if error else "")


# --- the command lines of HTTP servers (the gateway, the master example) -----------------


def build_http_parser(prog: str, description: str, default_port: int,
                      read_only: str | None = None) -> argparse.ArgumentParser:
    """A parser with the broker, HTTP and logging options of an HTTP server; with
    ``read_only``, the help of its ``--read-only`` option."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog="The password comes from the URL, $CREW_URL, $CREW_PASSWORD or "
               "$CREW_PASSWORD_FILE; never pass it on the command line.")
    add_broker_arguments(parser, port_flags=("--broker-port",))
    parser.add_argument("--port", type=int, default=default_port,
                        help="HTTP port; 0 picks a free one, which is logged "
                             "(default %(default)s)")
    parser.add_argument("--address", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 for every interface "
                             "(default %(default)s)")
    if read_only is not None:
        parser.add_argument("--read-only", action="store_true", help=read_only)
    add_logging_arguments(parser)
    return parser


class Service(Protocol):
    """What an HTTP server runs beside its application: a client, a dashboard's watcher."""

    def connect(self) -> Awaitable[None]: ...

    def close(self) -> Awaitable[None]: ...


def run_http(app: Application, client: "Client | None", options: argparse.Namespace,
             also: Sequence[Service] = ()) -> int:
    """Serve ``app`` with ``client`` and the services ``also`` until SIGINT or SIGTERM;
    return the exit status."""
    services: list[Service] = [] if client is None else [client]
    services.extend(also)
    try:
        asyncio.run(_serve_http(app, services, options.address, options.port))
    except (CrewError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return 0


async def _serve_http(app: Application, services: list[Service], address: str,
                      port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    sockets = bind_sockets(port, address)  # first: a port in use fails before connecting
    # A signal must stop the server while the client still waits for the broker, too.
    stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    connecting: asyncio.Future[Any] = asyncio.ensure_future(
        asyncio.gather(*(s.connect() for s in services)))
    try:
        await asyncio.wait({stopping, connecting}, return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            connecting.cancel()
            return
        stopping.cancel()
        connecting.result()  # raises why the client could not connect
        server = HTTPServer(app)
        server.add_sockets(sockets)
        host, bound_port = sockets[0].getsockname()[:2]
        log.info("listening on http://%s:%d/", host, bound_port)
        await stop.wait()
        log.info("stopping: open connections are closed, calls under way cancelled")
        server.stop()
        await server.close_all_connections()
    finally:
        for service in services:
            await service.close()
