"""The handlers of the article's master, and :func:`make_app` that puts them together.

Each handler is the article's (``article/master.py``): its class name, route, calls and
texts. They are written with ``async def`` instead of ``@gen.coroutine``, which crew's
client also serves (``article/master.py`` uses it), and get the client from the
application's settings instead of an attribute set on the application, so that
:func:`make_app` can build the application around any client. Where else they differ, a
comment says why.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tornado.web import Application, RequestHandler

import crew
from crew.master.tornado import Client

__all__ = ["Listeners", "make_app"]

log = logging.getLogger(__name__)

#: The channel ``/subscribe`` listens on and ``/publish2`` publishes on.
CHANNEL = "test"
#: Seconds ``/subscribe`` waits for a message before it answers 204 No Content.
POLL_TIMEOUT = 30.0


class Listeners:
    """The requests waiting in ``/subscribe`` (the article's ``LongPoolingHandler.LISTENERS``).

    The application subscribes once, with :meth:`deliver`; each request joins, gets the
    next message and leaves. ``changed`` is set whenever one joins or leaves.
    """

    def __init__(self) -> None:
        self.waiting: set[asyncio.Future[Any]] = set()
        self.changed = asyncio.Event()

    def join(self) -> asyncio.Future[Any]:
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.add(waiter)
        self.changed.set()
        return waiter

    def leave(self, waiter: asyncio.Future[Any]) -> None:
        self.waiting.discard(waiter)
        self.changed.set()

    def deliver(self, data: Any) -> None:
        """The subscription callback: hand ``data`` to every waiting request."""
        for waiter in self.waiting:
            if not waiter.done():
                waiter.set_result(data)


class Handler(RequestHandler):
    @property
    def crew(self) -> Client:
        return self.settings["crew"]


class MainHandler(Handler):
    async def get(self) -> None:
        # Call task test with priority 100 and a megabyte of data, which crew gzips.
        resp = await self.crew.call("test", "*" * 1000000, priority=100)
        self.write(f"{type(resp).__name__}: {resp}")


class StatHandler(Handler):
    async def get(self) -> None:
        resp = await self.crew.call("stat", persistent=False, priority=0)
        self.write(f"{type(resp).__name__}: {resp}")


class FastHandler(Handler):
    async def get(self) -> None:
        try:
            # The call and its job must be over within 3 seconds.
            resp = await self.crew.call("dead", persistent=False, priority=255,
                                        expiration=3)
        except crew.TimeoutError:
            self.write("Timeout")  # a worker ran it and interrupted it at the deadline
        except crew.ExpirationError:
            self.write("All workers are gone")  # no worker took it in time
        else:
            self.write(f"{type(resp).__name__}: {resp}")


class LongPoolingHandler(Handler):
    """Answers with the next message on channel ``test``, or 204 after the poll timeout.

    The article's kept a class-wide list of waiting requests, none of which ever gave up:
    a request whose client had left waited for the next message, and a client could wait
    forever. Here each request waits with a timeout and stops when its client leaves.
    """

    waiter: asyncio.Future[Any] | None = None

    async def get(self) -> None:
        listeners: Listeners = self.settings["listeners"]
        self.waiter = listeners.join()
        log.debug("%d request(s) wait for channel %s", len(listeners.waiting), CHANNEL)
        try:
            data = await asyncio.wait_for(self.waiter, self.settings["poll_timeout"])
        except asyncio.TimeoutError:
            self.set_status(204)
            return
        finally:
            listeners.leave(self.waiter)
        if data is not _GONE:
            self.write(str(data))

    def on_connection_close(self) -> None:
        super().on_connection_close()
        # The client went away: stop waiting now rather than at the next message.
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(_GONE)


class PublishHandler(Handler):
    async def post(self) -> None:
        # The worker's task publishes the body on channel test, and returns None.
        resp = await self.crew.call("publish", _text(self.request.body))
        self.finish(str(resp))


class PublishHandler2(Handler):
    def post(self) -> None:
        # Published from here, without awaiting: the client sends it at once either way.
        self.crew.publish(CHANNEL, _text(self.request.body))


class Multitaskhandler(Handler):
    async def get(self) -> None:
        with self.crew.parallel() as mc:
            mc.call("test")
            mc.call("stat")
            # A call that failed has its exception in its place, which prints its message.
            test_result, stat_result = await mc.result()
        self.set_header("Content-Type", "text/plain")
        self.write(f"Test result: {test_result}\nStat result: {stat_result}")


_GONE = object()


def _text(body: bytes) -> str:
    """A request body as text, so that subscribers print ``hello``, not ``b'hello'``.

    The article passes the body on as it is; crew carries bytes as bytes, which ``str()``
    shows as ``b'hello'``.
    """
    return body.decode("utf-8", errors="replace")


def make_app(client: Client, *, poll_timeout: float = POLL_TIMEOUT,
             **settings: Any) -> Application:
    """The article's application around ``client``, connected or not yet.

    Subscribes ``client`` to channel ``test`` at once; as in the article, this works before
    ``client.connect()``. ``settings`` go to Tornado's :class:`~tornado.web.Application`.
    """
    listeners = Listeners()
    client.subscribe(CHANNEL, listeners.deliver)
    return Application([
        (r"/", MainHandler),
        (r"/stat", StatHandler),
        (r"/stat2", StatHandler),
        (r"/fast", FastHandler),
        (r"/subscribe", LongPoolingHandler),
        (r"/publish", PublishHandler),
        (r"/publish2", PublishHandler2),
        (r"/parallel", Multitaskhandler),
    ], crew=client, listeners=listeners, poll_timeout=poll_timeout, **settings)
