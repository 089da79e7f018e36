"""The client's connection to the broker (internal; :class:`~crew.Client` uses it).

A :class:`Link` connects with capped, jittered backoff, declares the client's private reply
queue, receives on it the replies (handed to the pending calls) and the pubsub messages
(handed to the subscriptions), and after a lost connection connects again by itself. Calls
made while it reconnects wait for :attr:`Link.ready`. Given several nodes, each attempt goes
to the next one (:class:`crew.connecting.Nodes`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pika.spec import Basic, BasicProperties

from . import protocol
from .amqp import Channel, Connection
from .cancels import send_notice
from .connecting import Nodes, connect_retrying
from .exceptions import ConnectionLostError
from .loops import Background, thread_loop
from .pending import Call, Pending, ThreadCall
from .pubsub import Subscriptions
from .settings import BrokerSettings

__all__ = ["Link"]

# The client's logger: these lines are the client's.
log = logging.getLogger("crew.client")


class Link:
    """The connection, channel and reply queue of a client, and their (re)connection.

    It fails ``pending`` calls when a connect fails or the client closes, settles them when
    the connection is lost, and tells ``subscriptions`` each channel it opens and loses.
    """

    def __init__(self, broker: BrokerSettings, *, reconnect: bool, pending: Pending,
                 subscriptions: Subscriptions, background: Background) -> None:
        self.broker = broker
        self.reconnect = reconnect
        self.connection: Connection | None = None
        self.channel: Channel | None = None
        self.reply_queue = ""
        #: Set while connected; calls made while reconnecting wait for it.
        self.ready = asyncio.Event()
        #: None before connect(), after close() and after a connect that failed; otherwise
        #: the task that connects or last reconnected, under way or done.
        self.connector: asyncio.Task[None] | None = None
        self._pending = pending
        self._subscriptions = subscriptions
        self._background = background
        #: The nodes of :attr:`broker` in turn (made again when :attr:`broker` changes).
        self._nodes: Nodes | None = None

    @property
    def connected(self) -> bool:
        return self.channel is not None and self.channel.is_open

    @property
    def blocked(self) -> bool:
        """Whether the broker blocks publishers now (memory or disk alarm)."""
        return self.connection is not None and self.connection.blocked

    def connect(self, timeout: float | None = None) -> "asyncio.Future[None]":
        """Start connecting, or return the connect under way; see :meth:`crew.Client.connect`."""
        connector = self.connector
        if connector is not None and not connector.done():
            return connector if timeout is None else _bounded(connector, timeout)
        if connector is not None and self.connected:
            return connector
        self._background.closing = False
        connector = thread_loop().create_task(self._connect(timeout))
        connector.add_done_callback(self._connect_done)
        self.connector = connector
        return connector

    async def _connect(self, timeout: float | None) -> None:
        try:
            await connect_retrying(self._open, who="client", timeout=timeout)
        except asyncio.CancelledError:
            if asyncio.current_task() is not self.connector:
                # close() stopped it: tell whoever awaits connect() why, rather than
                # cancelling them.
                raise ConnectionLostError("the client was closed before it connected") from None
            raise

    def _connect_done(self, connector: "asyncio.Task[None]") -> None:
        # exception() marks the error as retrieved: no "Task exception was never retrieved"
        # from asyncio when nobody awaited the connect.
        error = (ConnectionLostError("connect() was cancelled before the client connected")
                 if connector.cancelled() else connector.exception())
        if error is None or connector is not self.connector:
            return  # connected; or closed, which failed the waiting calls itself
        self.connector = None
        if not connector.cancelled():
            log.error("client could not connect (%d call(s) waiting for it fail): %s",
                      len(self._pending.calls), error)
        self._pending.fail_all(error)  # they were all waiting for this connection

    async def _reconnect(self) -> None:
        await connect_retrying(self._open, who="client", retry_auth=True)

    def _next_node(self) -> BrokerSettings:
        if self._nodes is None or self._nodes.broker is not self.broker:
            self._nodes = Nodes(self.broker)
        return self._nodes.next()

    async def _open(self) -> None:
        connection = await Connection.open(self._next_node())
        try:
            channel = await connection.channel()
            await channel.declare_topology()
            # Server-named and exclusive: a fresh name per connection, so a reconnection never
            # waits for the broker to release the old one (405 RESOURCE_LOCKED).
            queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
            await channel.bind(queue, protocol.EXPIRED_EXCHANGE,
                               arguments=protocol.expired_binding(queue))
            channel.on_return(self._pending.on_return)
            await channel.consume(queue, self._on_message, auto_ack=True, exclusive=True)
            # Last, so that no await separates the final check of the subscriptions from
            # the moment subscribe() sees the client as connected.
            await self._subscriptions.bind_all(channel, queue)
        except BaseException:
            await connection.close()
            raise
        self.connection, self.channel, self.reply_queue = connection, channel, queue
        self._subscriptions.attach(channel, queue)
        connection.closed.add_done_callback(self._on_connection_closed)
        self.ready.set()
        log.info("client connected to %s, reply queue %s", connection.settings.safe_url, queue)

    async def close(self) -> None:
        """Fail every pending call, stop a connect or reconnection under way, disconnect."""
        self._background.closing = True
        self.ready.clear()
        if self.connector is not None:
            self.connector.cancel()
            self.connector = None
        self._pending.fail_all(ConnectionLostError("the client was closed"))
        if self.connection is not None:
            await self.connection.close()
        self.connection = self.channel = None
        self._subscriptions.detach()

    def _on_connection_closed(self, fut: asyncio.Future[BaseException]) -> None:
        if self._background.closing:
            return
        log.error("client lost its broker connection%s: %s", self._node_named(), fut.result())
        self.ready.clear()
        self.channel = None
        self._subscriptions.detach()
        self._pending.connection_lost()
        if self.reconnect:
            self.connector = self._background.spawn(self._reconnect(), "reconnecting")
        else:
            self.connector = None  # calls fail at once, not at their deadline

    def _node_named(self) -> str:
        """' to <node>' when the client has several nodes to choose from, else nothing."""
        connection = self.connection
        if connection is None or len(connection.settings.nodes) < 2:
            return ""
        return f" to {connection.settings.safe_url}"

    async def send(self, call: Call, properties: BasicProperties, body: bytes) -> None:
        """Publish the call, first waiting for a connection up to its deadline."""
        while not self.connected:
            if self.connector is None:
                raise ConnectionLostError("the client was closed")
            remaining = (call.deadline_ms - protocol.now_ms()) / 1000
            waiter = asyncio.ensure_future(self.ready.wait())
            try:
                waits: set[asyncio.Future[Any]] = {waiter, call.future}
                await asyncio.wait(waits, timeout=max(0.0, remaining),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if call.future.done():
                return  # settled meanwhile (cancelled); the caller reads the outcome
            if not self.connected and protocol.now_ms() >= call.deadline_ms:
                raise ConnectionLostError(
                    f"not connected to the broker by the deadline of the call to {call.task!r};"
                    " it was not sent")
        # A new connection has a new reply queue: address the replies to the current one.
        call.reply_to = properties.reply_to = self.reply_queue
        properties.headers[protocol.CLIENT_HEADER] = self.reply_queue
        properties.expiration = protocol.ttl_property(call.deadline_ms)
        # mandatory: with no queue for the task the broker returns the call at once
        # (312 NO_ROUTE), which Pending.on_return turns into UnknownTaskError.
        channel = self.channel
        channel.publish(  # type: ignore[union-attr]  # connected, checked above
            "", protocol.task_queue(call.task), body, properties, mandatory=True)
        if len(self._pending.calls) == 1:
            # A lone call leaves now. Calls made while others are under way (a server's
            # concurrent requests) leave together at the end of the loop iteration: one
            # system call, one wake-up of the broker.
            channel.flush()  # type: ignore[union-attr]

    def send_cancel(self, correlation_id: str, call: Call | ThreadCall) -> None:
        """Tell the workers that the caller cancelled the call (if connected)."""
        channel = self.channel
        if channel is None or not channel.is_open:
            return
        send_notice(channel, correlation_id, call.reply_to, call.deadline_ms)
        log.debug("call %s cancelled by its caller", correlation_id)

    def _on_message(self, _ch: Any, method: Basic.Deliver, props: BasicProperties,
                    body: bytes) -> None:
        if method.exchange == protocol.PUBSUB_EXCHANGE:
            self._subscriptions.on_message(method.routing_key, props, body)
        else:
            self._pending.on_reply(method.exchange, props, body)


def _bounded(connector: "asyncio.Task[None]", timeout: float) -> "asyncio.Task[None]":
    """A task that waits up to ``timeout`` for ``connector`` (which it leaves running)."""
    async def wait() -> None:
        try:
            await asyncio.wait_for(asyncio.shield(connector), timeout)
        except asyncio.TimeoutError:
            raise ConnectionLostError(f"the client did not connect within {timeout} s") from None

    waiter = connector.get_loop().create_task(wait())
    # Retrieved, so that a waiter nobody awaits fails quietly: the connect logs its own error.
    waiter.add_done_callback(lambda done: done.cancelled() or done.exception())
    return waiter
