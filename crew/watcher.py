"""The dashboard's link to the broker: it hears the workers' figures, counts the calls the
broker dead-letters, reads the task queues' depths, and, while anyone listens, hands a fresh
view to its listeners every :data:`~crew.protocol.FIGURES_INTERVAL` seconds.

On a connection of its own (not a client's: a dashboard also runs alone, ``crew
dashboard``), it binds two exclusive queues of its own: one to ``crew.figures``, one to
``crew.expired`` with no header to match, which brings it a copy of every dead-lettered call
(docs/PROTOCOL.md, section 13). Both are bounded, and it acknowledges nothing: they are
read with ``no_ack``. The queues' depths and consumers come from passive declares, no
management plugin needed. When the connection is lost it says so in the view (``broker``:
``down``) and connects again, for as long as it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, Callable

from pika.spec import Basic, BasicProperties

from . import census, codec, protocol
from .amqp import Channel, Connection
from .board import Board
from .cancels import cancel_call
from .connecting import Nodes, Stopped, backoff, connect_retrying
from .exceptions import CodecError, CrewError
from .settings import BrokerSettings, BrokerSpec

__all__ = ["Watcher"]

log = logging.getLogger(__name__)

#: Bounds of the watcher's own queues: it reads them as fast as they come, so these only
#: matter if it stalls; the broker then drops the oldest.
_QUEUE_LIMITS = {"x-max-length": 10_000, "x-max-length-bytes": 64 * 1024 * 1024}
Listener = Callable[[str], None]


class Watcher:
    """Keeps ``board`` fed from ``broker`` (settings, or URLs as a worker takes them);
    each listener gets every view as JSON text."""

    def __init__(self, broker: BrokerSpec = None, board: Board | None = None,
                 refresh: float = protocol.FIGURES_INTERVAL) -> None:
        self.broker = BrokerSettings.given(broker)
        self.board = board or Board()
        self.refresh = refresh
        self._listeners: set[Listener] = set()
        #: Set when a listener comes: it gets a view at once, not at the next refresh.
        self._wanted = asyncio.Event()
        self._connection: Connection | None = None
        self._closing = asyncio.Event()
        self._running: asyncio.Task[None] | None = None
        self._closing_channel: asyncio.Future[None] | None = None  # kept: not collected

    def listen(self, listener: Listener) -> None:
        """Hand ``listener`` every view from now on, the first one at once. Views are made
        only while someone listens: a gateway whose dashboard nobody looks at reads no
        queue and makes no view (it still hears the workers, and forgets what gets old)."""
        self._listeners.add(listener)
        self._wanted.set()

    def unlisten(self, listener: Listener) -> None:
        self._listeners.discard(listener)

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.is_open

    async def connect(self) -> None:
        """Start watching, in the background: returns at once, and connects again whenever
        the link is lost; the views say ``broker: down`` meanwhile."""
        if self._running is None:
            self._running = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        self._closing.set()
        if self._running is not None:
            await self._running
        if self._connection is not None:
            await self._connection.close()

    async def cancel(self, correlation_id: str) -> dict[str, Any] | None:
        """Send the cancel notice of the call a worker reported running as
        ``correlation_id``; return that call, or None if no live worker reported it."""
        call = self.board.find_call(correlation_id)
        connection = self._connection
        if call is None:
            return None
        if connection is None or not connection.is_open:
            raise CrewError("the dashboard is not connected to the broker")
        deadline = call.get("deadline")
        await cancel_call(connection, correlation_id, str(call.get("caller")),
                          deadline if isinstance(deadline, int) else None)
        return call

    async def _run(self) -> None:
        nodes, delays = Nodes(self.broker), backoff(first=1.0, cap=30.0)
        while not self._closing.is_set():
            watched = time.monotonic()
            try:
                self._connection = await connect_retrying(
                    lambda: Connection.open(nodes.next()), who="crew dashboard",
                    retry_auth=True, stop=self._closing)
                await self._watch(self._connection)
            except Stopped:
                break
            except CrewError as exc:
                if not self._closing.is_set():
                    log.warning("dashboard: %s; connecting again", exc)
            self._publish(broker_up=False)
            if self._connection is not None and not self._closing.is_set():
                await self._connection.close()
            if time.monotonic() - watched > 60:  # it worked for a while: start over quickly
                delays = backoff(first=1.0, cap=30.0)
            # A link that fails as soon as it is made must not spin: wait before the next.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), next(delays))

    async def _watch(self, connection: Connection) -> None:
        """Follow ``connection`` until it is lost or the watcher closes."""
        channel = await connection.channel()
        await channel.declare_exchange(protocol.EXPIRED_EXCHANGE, "headers")
        await channel.declare_exchange(protocol.FIGURES_EXCHANGE, "fanout")
        for exchange, on_message, binding in (
                (protocol.FIGURES_EXCHANGE, self._on_figures, None),
                (protocol.EXPIRED_EXCHANGE, self._on_dead_letter, protocol.expired_binding())):
            queue = await channel.declare_queue("", exclusive=True, auto_delete=True,
                                                arguments=dict(_QUEUE_LIMITS))
            await channel.bind(queue, exchange, arguments=binding)
            await channel.consume(queue, on_message, auto_ack=True, exclusive=True)
        # A consumer the broker cancels (its queue deleted) would leave the board unfed:
        # start over on a new connection instead.
        channel.on_cancel(lambda _frame: self._start_over(channel))
        log.info("dashboard: watching the workers at %s", connection.settings.safe_url)
        closing: asyncio.Future[Any] = asyncio.ensure_future(self._closing.wait())
        try:
            while not self._closing.is_set() and not channel.closed.done():
                self._wanted.clear()
                if self._listeners:
                    queues = await census.queue_figures(connection, self.board.tasks())
                    for task in [task for task, counts in queues.items() if counts is None]:
                        self.board.queue_gone(task)
                    self._publish(broker_up=True, queues=queues)
                else:
                    self.board.forget_old(time.monotonic())
                wanted = asyncio.ensure_future(self._wanted.wait())
                await asyncio.wait((closing, channel.closed, wanted), timeout=self.refresh,
                                   return_when=asyncio.FIRST_COMPLETED)
                wanted.cancel()
        finally:
            closing.cancel()

    def _start_over(self, channel: Channel) -> None:
        self._closing_channel = asyncio.ensure_future(channel.close())

    def _publish(self, broker_up: bool,
                 queues: dict[str, tuple[int, int] | None] | None = None) -> None:
        if not self._listeners:
            return
        view = self.board.view(time.monotonic(), protocol.now_ms(), queues or {})
        view.update(broker="up" if broker_up else "down", at=protocol.now_ms())
        text = json.dumps(view, separators=(",", ":"), default=str)
        for listener in list(self._listeners):
            listener(text)

    def _on_figures(self, _ch: Any, _method: Basic.Deliver, props: BasicProperties,
                    body: bytes) -> None:
        if props.type != protocol.FIGURES_TYPE:
            return
        try:
            figures = codec.decode(body, props.content_type, props.content_encoding)
        except CodecError as exc:
            log.warning("dashboard: figures that cannot be read: %s", exc)
            return
        if not self.board.heard(figures, time.monotonic()):
            log.warning("dashboard: a figures message that is not a worker's was ignored")

    def _on_dead_letter(self, _ch: Any, _method: Basic.Deliver, props: BasicProperties,
                        _body: bytes) -> None:
        reason, task = protocol.dead_letter(props.headers)
        if task:
            self.board.dead_lettered(task, reason, time.monotonic())
