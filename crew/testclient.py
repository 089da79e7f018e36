"""The client of :mod:`crew.testing`'s ``crew_client``: a :class:`~crew.Client` that
connects on first use, on the event loop that uses it.

A fixture is made before the test's loop runs, and which loop that will be depends on the
test's runner (pytest-tornado's ``io_loop``, pytest-asyncio's loop, ``asyncio.run`` in the
test's body), so the client connects when a coroutine first uses it (a call, a publish, a
subscribe made on the loop, or ``await client.connect()``); with pytest-tornado, whose loop
is known, the fixture connects it on that loop at once (:meth:`LazyClient.start_on`). It
closes when that loop's owner cancels what is left on it at the end (``asyncio.run``,
``asyncio.Runner`` and pytest-asyncio do), or at the fixture's teardown if the loop is
still open then (pytest-tornado's). After its loop closed, the next loop that uses it
connects it again.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable

from .client import Client
from .loops import running_loop, thread_loop
from .pubsub import Callback

__all__ = ["LazyClient"]

#: Seconds the client may take to connect for a publish, and to close.
CONNECT_TIMEOUT = 30.0
CLOSE_TIMEOUT = 10.0


class LazyClient(Client):
    """A :class:`~crew.Client` that connects on first use, on the loop that uses it."""

    _loop_used: asyncio.AbstractEventLoop | None = None
    _guard: asyncio.Task[None] | None = None

    def start_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connect on ``loop``, which is this thread's current loop but may not run yet
        (pytest-tornado's ``io_loop``): calls made meanwhile wait for the connection."""
        if loop is not thread_loop():
            raise RuntimeError("start_on() takes this thread's current event loop")
        self._start(loop)

    def _start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        loop = loop or asyncio.get_running_loop()
        if loop is self._loop_used:
            return
        if self._loop_used is not None and not self._loop_used.is_closed():
            raise RuntimeError("crew_client is in use on another event loop, not closed yet: "
                               "a client lives on one loop at a time")
        # First use, or a new loop after the last one closed (and closed the client).
        self._loop_used = loop
        self._guard = loop.create_task(self._close_with_loop())
        self.connect()  # calls made meanwhile wait for it, up to their deadline

    async def call(self, task: str, data: Any = None, **kwargs: Any) -> Any:
        self._start()
        return await super().call(task, data, **kwargs)

    def subscribe(self, channel: str, callback: Callback) -> Awaitable[None]:
        if running_loop() is not None:  # else the connect makes the binding, whenever
            self._start()
        return super().subscribe(channel, callback)

    def publish(self, channel: str, data: Any = None) -> Awaitable[None]:
        self._start()
        if self.connected:
            return super().publish(channel, data)
        return asyncio.ensure_future(self._publish_when_connected(channel, data))

    async def _publish_when_connected(self, channel: str, data: Any) -> None:
        await self.connect(CONNECT_TIMEOUT)
        await super().publish(channel, data)

    async def _close_with_loop(self) -> None:
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            await asyncio.wait_for(self.close(), CLOSE_TIMEOUT)

    def close_at_teardown(self) -> None:
        """Close the client on its loop, if it was used and that loop is still open."""
        loop, guard = self._loop_used, self._guard
        if loop is None or guard is None or loop.is_closed() or guard.done():
            return
        guard.cancel()  # which closes the client
        waiting = asyncio.wait([guard], timeout=CLOSE_TIMEOUT + 1)
        if loop.is_running():  # on another thread
            asyncio.run_coroutine_threadsafe(waiting, loop).result(CLOSE_TIMEOUT + 2)
        else:
            loop.run_until_complete(waiting)
