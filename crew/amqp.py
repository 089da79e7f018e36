"""Awaitable operations over pika's callback-based ``AsyncioConnection`` (internal).

pika calls back on the event loop's thread; this module turns each RPC (declare, bind,
consume, ...) into an awaitable and, unlike bare pika, fails every pending one when the
channel or connection closes, so nothing awaits forever."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.channel import Channel as PikaChannel
from pika.spec import Basic, BasicProperties

from . import protocol, transport
from .failures import NOT_RETRYABLE, describe, describe_close, root_cause
from .exceptions import AuthenticationError, BrokerError, ConnectionLostError
from .settings import BrokerSettings

log = logging.getLogger(__name__)

#: on_message(channel, method, properties, body), called on the loop's thread.
MessageCallback = Callable[[PikaChannel, Basic.Deliver, BasicProperties, bytes], None]
ReturnCallback = Callable[[PikaChannel, Basic.Return, BasicProperties, bytes], None]


def _dropping_failures(queue: str, on_message: MessageCallback) -> MessageCallback:
    """``on_message``, but what it raises is logged, not left to pika: one forged message,
    or one bug, costs that message rather than the connection and every call on it."""
    def guarded(channel: PikaChannel, method: Basic.Deliver, properties: BasicProperties,
                body: bytes) -> None:
        try:
            on_message(channel, method, properties, body)
        except Exception:
            log.exception("a message from queue %r could not be handled; dropped", queue)
    return guarded


class Channel:
    """A pika channel whose RPCs are awaitable."""

    def __init__(self, channel: PikaChannel) -> None:
        self._channel = channel
        self._pending: set[asyncio.Future[Any]] = set()
        self.closed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        channel.add_on_close_callback(self._on_close)

    @property
    def is_open(self) -> bool:
        return bool(self._channel.is_open)

    def _on_close(self, _channel: PikaChannel, reason: BaseException) -> None:
        code, text = describe_close(reason)
        error: Exception
        if code in (0, 200, 320) or isinstance(reason, pika.exceptions.ConnectionClosed):
            error = ConnectionLostError(f"channel closed: {code} {text}")
        else:
            error = BrokerError(f"broker closed the channel: {code} {text}", code, text)
        for fut in self._pending:
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        if not self.closed.done():
            self.closed.set_result(reason)

    def _start(self, method: Callable[..., Any], *args: Any,
               **kwargs: Any) -> tuple[Any, asyncio.Future[Any]]:
        """Send an RPC; return what pika returned and a future for the broker's reply."""
        if not self._channel.is_open:
            raise ConnectionLostError("channel is closed")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(frame: Any) -> None:
            if not fut.done():
                fut.set_result(frame)

        returned = method(*args, callback=done, **kwargs)
        self._pending.add(fut)
        return returned, fut

    async def _wait(self, fut: asyncio.Future[Any]) -> Any:
        try:
            return await fut
        finally:
            self._pending.discard(fut)

    async def _rpc(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        _, fut = self._start(method, *args, **kwargs)
        return await self._wait(fut)

    async def declare_exchange(self, name: str, kind: str, durable: bool = True) -> None:
        await self._rpc(self._channel.exchange_declare, exchange=name, exchange_type=kind,
                        durable=durable)

    async def declare_queue(self, name: str = "", *, durable: bool = False,
                            exclusive: bool = False, auto_delete: bool = False,
                            arguments: dict[str, Any] | None = None) -> str:
        """Declare a queue and return its name (the broker's choice when ``name`` is empty)."""
        frame = await self._rpc(self._channel.queue_declare, queue=name, durable=durable,
                                exclusive=exclusive, auto_delete=auto_delete, arguments=arguments)
        return str(frame.method.queue)

    async def delete_queue(self, name: str) -> None:
        await self._rpc(self._channel.queue_delete, queue=name)

    async def queue_counts(self, name: str) -> tuple[int, int]:
        """``(messages ready, consumers)`` of queue ``name``; if absent, 404 closes the channel."""
        frame = await self._rpc(self._channel.queue_declare, queue=name, passive=True)
        return int(frame.method.message_count), int(frame.method.consumer_count)

    async def purge(self, name: str) -> int:
        """Delete the messages ready in queue ``name``; return how many."""
        frame = await self._rpc(self._channel.queue_purge, queue=name)
        return int(frame.method.message_count)

    async def bind(self, queue: str, exchange: str, routing_key: str = "",
                   arguments: dict[str, Any] | None = None) -> None:
        await self._rpc(self._channel.queue_bind, queue=queue, exchange=exchange,
                        routing_key=routing_key or None, arguments=arguments)

    async def unbind(self, queue: str, exchange: str, routing_key: str = "",
                     arguments: dict[str, Any] | None = None) -> None:
        await self._rpc(self._channel.queue_unbind, queue=queue, exchange=exchange,
                        routing_key=routing_key or None, arguments=arguments)

    async def qos(self, prefetch_count: int, global_qos: bool = False) -> None:
        await self._rpc(self._channel.basic_qos, prefetch_count=prefetch_count,
                        global_qos=global_qos)

    async def consume(self, queue: str, on_message: MessageCallback, *,
                      auto_ack: bool = False, exclusive: bool = False,
                      arguments: dict[str, Any] | None = None) -> str:
        """Start consuming ``queue``; return the consumer tag once the broker confirmed it.
        With ``auto_ack``, a message ``on_message`` raises on is logged and dropped (there is
        nothing to give back), where pika would close the whole connection for it."""
        if auto_ack:
            on_message = _dropping_failures(queue, on_message)
        tag, fut = self._start(self._channel.basic_consume, queue, on_message,
                               auto_ack=auto_ack, exclusive=exclusive, arguments=arguments)
        await self._wait(fut)
        return str(tag)

    async def declare_topology(self) -> None:
        """Declare the exchanges that clients and workers both use: expiry notices
        (headers), control (fanout) and pub/sub (topic)."""
        await self.declare_exchange(protocol.EXPIRED_EXCHANGE, "headers")
        await self.declare_exchange(protocol.CONTROL_EXCHANGE, "fanout")
        await self.declare_exchange(protocol.PUBSUB_EXCHANGE, "topic")

    async def cancel(self, consumer_tag: str) -> None:
        await self._rpc(self._channel.basic_cancel, consumer_tag)

    def cancel_nowait(self, consumer_tag: str) -> None:
        """Cancel a consumer, not waiting (pika requeues what it delivers after)."""
        self._channel.basic_cancel(consumer_tag)

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: BasicProperties, mandatory: bool = False) -> None:
        """Hand a message to the connection's write buffer (no broker round trip)."""
        transport.publish(self._channel, exchange, routing_key, body, properties, mandatory)

    def flush(self) -> None:
        """Send what was published on this channel's connection now rather than at the end
        of the loop iteration (see :mod:`crew.transport`)."""
        transport.flush(self._channel.connection)

    def publish_and_ack_now(self, exchange: str, routing_key: str, body: bytes,
                            properties: BasicProperties, mandatory: bool,
                            delivery_tag: int) -> bool:
        """From any thread: publish a message and then acknowledge ``delivery_tag``, both
        sent at once, in that order. False, and nothing sent, when this channel or its
        connection is closed or cannot send from a thread (the public path, TLS): use
        :meth:`publish` and :meth:`ack` on the loop then. Raises what pika raises for
        properties it cannot encode."""
        return transport.publish_and_ack_now(self._channel, exchange, routing_key, body,
                                             properties, mandatory, delivery_tag)

    def can_send_now(self) -> bool:
        """Whether :meth:`publish_now` may send from a thread (the fast path, plain TCP)."""
        return transport.can_send_now(self._channel)

    def publish_now(self, exchange: str, routing_key: str, body: bytes,
                    prepare: Callable[[], BasicProperties | None], mandatory: bool) -> bool:
        """From any thread: publish a message now, its properties made by ``prepare()``
        while no other thread or the loop writes (None: send nothing); False, as for
        :meth:`publish_and_ack_now`, when it cannot."""
        return transport.publish_now(self._channel, exchange, routing_key, body, prepare,
                                     mandatory)

    def ack(self, delivery_tag: int) -> None:
        transport.ack(self._channel, delivery_tag)

    def reject(self, delivery_tag: int, requeue: bool) -> None:
        if self._channel.is_open:
            self._channel.basic_reject(delivery_tag, requeue=requeue)

    def on_return(self, callback: ReturnCallback) -> None:
        self._channel.add_on_return_callback(callback)

    def on_cancel(self, callback: Callable[[Any], None]) -> None:
        """Call ``callback(frame)`` when the broker cancels a consumer of this channel (its
        queue was deleted, or its node went away); the consumer gets nothing more."""
        self._channel.add_on_cancel_callback(callback)

    async def close(self) -> None:
        if self._channel.is_open:
            self._channel.close()
        if not self._channel.is_closed:
            await asyncio.shield(self.closed)


class Connection:
    """One open AMQP connection on the running event loop."""

    def __init__(self, connection: AsyncioConnection, settings: BrokerSettings,
                 closed: asyncio.Future[BaseException]) -> None:
        self._connection = connection
        self.settings = settings
        #: Resolves with the close reason when the connection closes, for whatever cause.
        self.closed = closed
        #: True while the broker blocks this connection's publishes (memory or disk alarm).
        self.blocked = False
        transport.tune(connection)
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)

    def _on_blocked(self, _conn: Any, _frame: Any) -> None:
        self.blocked = True
        log.warning("the broker at %s blocks publishing (memory or disk alarm)",
                    self.settings.safe_url)

    def _on_unblocked(self, _conn: Any, _frame: Any) -> None:
        self.blocked = False
        log.warning("the broker at %s accepts publishing again", self.settings.safe_url)

    @classmethod
    async def open(cls, settings: BrokerSettings) -> Connection:
        """Connect and log in, or raise :class:`ConnectionLostError` saying why not."""
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[AsyncioConnection] = loop.create_future()
        closed: asyncio.Future[BaseException] = loop.create_future()

        def on_open(conn: AsyncioConnection) -> None:
            if not opened.done():
                opened.set_result(conn)

        def on_open_error(_conn: AsyncioConnection, error: BaseException) -> None:
            if not opened.done():
                cause = root_cause(error)
                kind = (AuthenticationError if isinstance(cause, NOT_RETRYABLE)
                        else ConnectionLostError)
                opened.set_exception(kind(
                    f"cannot connect to {settings.safe_url}: {describe(cause)}"))

        def on_close(_conn: AsyncioConnection, reason: BaseException) -> None:
            if not closed.done():
                closed.set_result(reason)

        connection_class = transport.connection_class()
        conn = connection_class(settings.pika_parameters(), on_open_callback=on_open,
                                on_open_error_callback=on_open_error,
                                on_close_callback=on_close, custom_ioloop=loop)
        try:
            await opened
        except asyncio.CancelledError:
            if not conn.is_closed and not conn.is_closing:
                conn.close()
            raise
        return cls(conn, settings, closed)

    @property
    def is_open(self) -> bool:
        return bool(self._connection.is_open)

    async def channel(self) -> Channel:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[PikaChannel] = loop.create_future()

        def on_open(ch: PikaChannel) -> None:
            if not opened.done():
                opened.set_result(ch)

        if not self._connection.is_open:
            raise ConnectionLostError("connection is closed")
        self._connection.channel(on_open_callback=on_open)
        done, _ = await asyncio.wait([opened, self.closed], return_when=asyncio.FIRST_COMPLETED)
        if opened not in done:
            opened.cancel()
            raise ConnectionLostError("connection closed while opening a channel")
        return Channel(opened.result())

    async def close(self) -> None:
        if not self._connection.is_closed and not self._connection.is_closing:
            self._connection.close()
        await asyncio.shield(self.closed)
