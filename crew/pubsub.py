"""Pubsub on the client: subscribe, unsubscribe and publish by channel name.

A client receives pubsub messages on its own reply queue, bound to the ``crew.pubsub`` topic
exchange with the channel name as the binding key, so AMQP topic wildcards work (``*`` one
word, ``#`` any number). Messages are fanned out by the broker to every bound client, at most
once, and only to clients subscribed when they are published: nothing is stored for later.
:class:`PubSub` is mixed into :class:`~crew.Client`; it relies on the client's channel,
reply queue and background-task helper.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from pika.spec import BasicProperties

from . import codec, protocol
from .exceptions import CodecError, ConnectionLostError, CrewError

if TYPE_CHECKING:
    from .amqp import Channel

__all__ = ["PubSub"]

log = logging.getLogger("crew.client")

Callback = Callable[[Any], Any]


class PubSub:
    """The pubsub half of :class:`~crew.Client`."""

    _subscriptions: dict[str, list[Callback]]
    _bindings: dict[str, "asyncio.Task[None]"]
    _channel: "Channel | None"
    _reply_queue: str
    connected: bool

    def _spawn(self, coro: Any, describe: str) -> "asyncio.Task[Any]":
        raise NotImplementedError  # provided by Client

    def subscribe(self, channel: str, callback: Callback) -> Awaitable[None]:
        """Call ``callback(data)`` (a function or coroutine function) for each message on
        ``channel``; ``*`` (one word) and ``#`` (any words) are wildcards, as in AMQP topics.

        Works before :meth:`connect` (which then makes the binding and reports its failure)
        and after it; subscriptions survive a close and a new connect. The result may be
        ignored; awaiting it waits until the broker delivers the channel to this client and
        raises if it cannot.
        """
        protocol.validate_channel(channel, pattern=True)
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        callbacks = self._subscriptions.setdefault(channel, [])
        callbacks.append(callback)
        if not self.connected:
            return _done()
        if len(callbacks) == 1:
            bind = self._channel.bind(  # type: ignore[union-attr]
                self._reply_queue, protocol.PUBSUB_EXCHANGE, channel)
            self._bindings[channel] = self._spawn(bind, f"subscribing to {channel!r}")
        binding = self._bindings.get(channel)
        return _done() if binding is None else _Operation(binding)

    def unsubscribe(self, channel: str, callback: Callback | None = None) -> Awaitable[None]:
        """Remove ``callback`` (or, when None, every callback) from ``channel``.

        Once a channel has no callback left, its messages stop coming to this client;
        awaiting the result waits for that.
        """
        callbacks = self._subscriptions.get(channel)
        if callbacks is None:
            return _done()
        if callback is None:
            callbacks.clear()
        elif callback in callbacks:
            callbacks.remove(callback)
        if callbacks:
            return _done()
        del self._subscriptions[channel]
        self._bindings.pop(channel, None)
        if not self.connected:
            return _done()
        return _Operation(self._spawn(self._channel.unbind(  # type: ignore[union-attr]
            self._reply_queue, protocol.PUBSUB_EXCHANGE, channel), f"unsubscribing {channel!r}"))

    def publish(self, channel: str, data: Any = None) -> Awaitable[None]:
        """Send ``data`` to every client subscribed to ``channel`` now (fire and forget).

        The message is handed to the connection at once, awaited or not; awaiting the
        result raises what went wrong (not connected, data that cannot be encoded), which
        is also logged. Nothing is kept for subscribers that come later.
        """
        protocol.validate_channel(channel)
        try:
            body, encoding = codec.encode(data)
            amqp_channel = self._channel
            if amqp_channel is None or not amqp_channel.is_open:
                raise ConnectionLostError("the client is not connected")
            amqp_channel.publish(protocol.PUBSUB_EXCHANGE, channel, body, BasicProperties(
                content_type=protocol.MSGPACK, content_encoding=encoding, delivery_mode=1))
        except CrewError as exc:
            log.warning("publish on %r failed: %s", channel, exc)
            return _failed(exc)
        return _done()

    async def _bind_subscriptions(self, channel: Channel, queue: str) -> None:
        """Bind ``queue`` to every subscribed channel, including those (un)subscribed
        while the binds are under way."""
        bound: set[str] = set()
        while bound != self._subscriptions.keys():
            for name in self._subscriptions.keys() - bound:
                await channel.bind(queue, protocol.PUBSUB_EXCHANGE, name)
                bound.add(name)
            for name in bound - self._subscriptions.keys():
                await channel.unbind(queue, protocol.PUBSUB_EXCHANGE, name)
                bound.discard(name)
        self._bindings.clear()

    def _on_event(self, channel: str, props: BasicProperties, body: bytes) -> None:
        try:
            data = codec.decode(body, props.content_type, props.content_encoding)
        except CodecError as exc:
            log.warning("pubsub message on %r dropped: %s", channel, exc)
            return
        for pattern, callbacks in list(self._subscriptions.items()):
            if _topic_matches(pattern, channel):
                for callback in list(callbacks):
                    self._run_callback(callback, channel, data)

    def _run_callback(self, callback: Callback, channel: str, data: Any) -> None:
        """Call a subscriber; a coroutine it returns runs as a task of its own."""
        try:
            result = callback(data)
        except Exception:
            log.exception("pubsub callback %r on %r failed", callback, channel)
            return
        if inspect.iscoroutine(result):
            self._spawn(result, f"pubsub callback {callback!r} on {channel!r}")
        elif inspect.isawaitable(result):
            self._spawn(_wait(result), f"pubsub callback {callback!r} on {channel!r}")


def _topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: words split on '.', ``*`` is one word, ``#`` zero or more."""
    if pattern == key:
        return True
    if "*" not in pattern and "#" not in pattern:
        return False
    return _match_words(pattern.split("."), key.split("."))


def _match_words(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match_words(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match_words(rest, words[1:])


class _Settled:
    """An already settled awaitable; usable with or without a running event loop."""

    __slots__ = ("_error",)

    def __init__(self, error: BaseException | None = None) -> None:
        self._error = error

    def __await__(self) -> Any:
        if self._error is not None:
            raise self._error
        return None
        yield  # makes this a generator, as __await__ must be


def _done() -> _Settled:
    return _Settled()


def _failed(exc: BaseException) -> _Settled:
    return _Settled(exc)


class _Operation:
    """An awaitable for a broker operation under way; cancelling an awaiter leaves the
    operation alone, so several callers can await it."""

    __slots__ = ("_task",)

    def __init__(self, task: "asyncio.Task[None]") -> None:
        self._task = task

    def __await__(self) -> Any:
        return asyncio.shield(self._task).__await__()


async def _wait(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
