"""The endpoints of the article's master (``article/master.py``, ``master_example``) as
Flask views that block: each calls a task with :class:`crew.SyncClient` and waits.

One client serves the whole process: every thread of a gunicorn worker (``--threads``)
calls through it at once, over one connection. With ``--preload`` the application, and so
the client, is made in gunicorn's master; each worker process connects on its first call
(the client is fork-safe), and the master's connection, if it made one, is left alone.
"""

from __future__ import annotations

from flask import Flask, Response, request

import crew

__all__ = ["CHANNEL", "create_app"]

#: The channel the ``publish`` task publishes on, and ``/publish2`` too.
CHANNEL = "test"


def create_app(client: crew.SyncClient | None = None) -> Flask:
    """The application, around ``client`` (default: a :class:`crew.SyncClient` for
    ``$CREW_URL``, which connects on first use). Views reach it as
    ``app.extensions["crew"]``; it is closed at interpreter exit."""
    crew_client = client if client is not None else crew.SyncClient()
    app = Flask(__name__)
    app.extensions["crew"] = crew_client

    @app.get("/")
    def main() -> str:
        # Call task test with priority 100 and a megabyte of data, which crew gzips.
        resp = crew_client.call("test", "*" * 1000000, priority=100)
        return f"{type(resp).__name__}: {resp}"

    @app.get("/stat")
    @app.get("/stat2", endpoint="stat2")
    def stat() -> str:
        resp = crew_client.call("stat", persistent=False, priority=0)
        return f"{type(resp).__name__}: {resp}"

    @app.get("/fast")
    def fast() -> str:
        try:
            # The call and its job must be over within 3 seconds.
            resp = crew_client.call("dead", persistent=False, priority=255, expiration=3)
        except crew.TimeoutError:
            return "Timeout"  # a worker ran it and interrupted it at the deadline
        except crew.ExpirationError:
            return "All workers are gone"  # no worker took it in time
        return f"{type(resp).__name__}: {resp}"

    @app.post("/publish")
    def publish() -> str:
        # The worker's task publishes the body on channel test, and returns None.
        return str(crew_client.call("publish", _text()))

    @app.post("/publish2")
    def publish2() -> str:
        crew_client.publish(CHANNEL, _text())  # published by this application itself
        return ""

    @app.get("/parallel")
    def parallel() -> Response:
        with crew_client.parallel() as mc:
            mc.call("test")
            mc.call("stat")
        # A call that failed has its exception in its place, which prints its message.
        test_result, stat_result = mc.result()
        return Response(f"Test result: {test_result}\nStat result: {stat_result}",
                        mimetype="text/plain")

    return app


def _text() -> str:
    """The request body as text (crew carries bytes as bytes, which print as b'...')."""
    return request.get_data().decode("utf-8", errors="replace")
