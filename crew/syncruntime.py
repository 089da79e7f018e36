"""One process's share of the synchronous client (internal; :class:`crew.SyncClient` uses
it): the loop thread, the :class:`~crew.Client` it runs, the thread for pubsub callbacks,
and how a blocked caller waits for what it handed over.

Subscriber callbacks do not run on the loop thread: one that blocks (or calls the client,
which waits for that very loop) would stop the connection. The loop hands each message to
:class:`CallbackThread`, which runs the callbacks one at a time, in order.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Coroutine

from .client import Client
from .exceptions import ConnectionLostError, TimeoutError
from .loopthread import LoopThread, Work
from .pubsub import Callback

__all__ = ["CONNECT_TIMEOUT", "HOP_MARGIN", "CallbackThread", "Handoff", "Runtime", "Waiting",
           "call_on_loop", "connected", "publish_on_loop", "subscribe_one", "unsubscribe_one"]

log = logging.getLogger("crew.client")

#: Seconds a caller waits past a call's deadline and grace before it gives up by itself
#: (should crew's loop thread not answer in time): the hop between threads on a busy
#: machine.
HOP_MARGIN = 0.5
#: Seconds that connecting, publishing and subscribing wait for the connection by default.
CONNECT_TIMEOUT = 10.0


class Runtime:
    """The loop thread (``crew-sync-client``), the :class:`~crew.Client` it runs,
    connecting at once with ``subscriptions`` made, and the callback thread, made when a
    subscription needs it."""

    def __init__(self, client: Client, subscriptions: list[tuple[str, Callback]]) -> None:
        self.client = client
        self.thread = LoopThread("crew-sync-client")
        self._callbacks: CallbackThread | None = None
        for channel, callback in subscriptions:  # bound when the connection opens
            self.thread.loop.call_soon_threadsafe(client.subscribe, channel,
                                                  self.handoff(callback))
        self.thread.loop.call_soon_threadsafe(client.connect)

    def handoff(self, callback: Callback) -> Handoff:
        if self._callbacks is None:
            self._callbacks = CallbackThread("crew-sync-callbacks")
        return Handoff(callback, self._callbacks)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float, what: str) -> Any:
        """Run ``coro`` on the loop; wait for it up to ``timeout`` plus the hop."""
        limit = time.monotonic() + timeout + HOP_MARGIN
        return Waiting(self.thread.submit(coro), limit, what).wait()

    def close(self, timeout: float) -> None:
        """Close the connection (failing pending calls), stop the threads."""
        limit = time.monotonic() + timeout
        try:
            Waiting(self.thread.submit(self.client.close()), limit, "closing").wait()
        except Exception as exc:  # noqa: BLE001 - closing goes on whatever the close met
            log.warning("closing the sync client's connection: %r", exc)
        if not self.thread.stop(max(0.1, limit - time.monotonic())):
            log.warning("the sync client's loop thread did not stop within %s s", timeout)
        if self._callbacks is not None:
            self._callbacks.stop()


class Waiting:
    """What a caller waits on: work on the loop thread, until a monotonic ``limit``."""

    __slots__ = ("work", "limit", "what")

    def __init__(self, work: Work, limit: float, what: str) -> None:
        self.work, self.limit, self.what = work, limit, what

    def wait(self) -> Any:
        """The outcome; crew's TimeoutError at the limit (the work is then cancelled);
        ConnectionLostError if the client was closed meanwhile."""
        work = self.work
        try:
            ended = work.wait(self.limit - time.monotonic())
        except BaseException:
            work.cancel()  # a KeyboardInterrupt, say: cancel, as Client's callers would
            raise
        if not ended:
            work.cancel()
            raise TimeoutError(f"no answer from {self.what} by its deadline: crew's event "
                               "loop thread did not answer in time; cancelled, it may or may "
                               "not have run")
        try:
            return work.outcome()
        except asyncio.CancelledError:
            raise ConnectionLostError(f"the client was closed while waiting for "
                                      f"{self.what}") from None


class CallbackThread:
    """A daemon thread named ``name`` that runs the callbacks :meth:`put` hands it, one at a
    time, in order; what a callback raises is logged."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Callback, Any] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def put(self, callback: Callback, data: Any) -> None:
        self._queue.put((callback, data))

    def stop(self) -> None:
        """End the thread once the callbacks handed to it so far have run."""
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            callback, data = item
            try:
                callback(data)
            except Exception:
                log.exception("pubsub callback %r failed", callback)


@dataclass(frozen=True)
class Handoff:
    """What the loop's subscriptions call: hands ``data`` to ``callback`` on ``thread``.

    Equal to any handoff of the same callback, so that unsubscribing finds it.
    """

    callback: Callback
    thread: CallbackThread = field(compare=False)

    def __call__(self, data: Any) -> None:
        self.thread.put(self.callback, data)


# --- coroutines run on the loop --------------------------------------------------------


async def call_on_loop(client: Client, task: str, data: Any, options: dict[str, Any]) -> Any:
    if client.reconnect and not client.connected:
        client.connect()  # none under way after a failed connect: start one
    return await client.call(task, data, **options)


async def connected(client: Client, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for ``client`` to be connected (starting a connect if
    none is under way), or raise ConnectionLostError; the connect goes on either way."""
    if client.connected:
        return
    try:
        await asyncio.wait_for(asyncio.shield(client.connect()), timeout)
    except asyncio.TimeoutError:
        raise ConnectionLostError(f"not connected to the broker within {timeout:g} s; "
                                  "still trying") from None


async def publish_on_loop(client: Client, channel: str, data: Any, timeout: float) -> None:
    await connected(client, timeout)
    await client.publish(channel, data)


async def subscribe_one(client: Client, channel: str, handoff: Handoff,
                        timeout: float) -> None:
    """Subscribe ``handoff`` on ``channel``; wait until the broker delivers the channel,
    the connection first if need be (then the connect binds it)."""
    binding = client.subscribe(channel, handoff)
    await connected(client, timeout)
    await binding


async def unsubscribe_one(client: Client, channel: str, handoff: Handoff | None) -> None:
    await client.unsubscribe(channel, handoff)
