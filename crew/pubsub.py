"""Pubsub on the client: subscribe, unsubscribe and publish by channel name.

A client receives pubsub messages on its own reply queue, bound to the ``crew.pubsub`` topic
exchange with the channel name as the binding key, so AMQP topic wildcards work (``*`` one
word, ``#`` any number). Messages are fanned out by the broker to every bound client, at most
once, and only to clients subscribed when they are published: nothing is stored for later.
A :class:`~crew.Client` owns one :class:`Subscriptions` and tells it the channel and the
reply queue of each connection it opens, and when it loses them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Coroutine

from pika.spec import BasicProperties

from . import codec, protocol, validation
from .exceptions import CodecError, ConnectionLostError, CrewError

if TYPE_CHECKING:
    from .amqp import Channel

__all__ = ["Callback", "Subscriptions"]

# The client's logger: these lines are the client's.
log = logging.getLogger("crew.client")

Callback = Callable[[Any], Any]
#: Runs a coroutine as a task that is referenced until done and logs its failure.
Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]


class Subscriptions:
    """A client's subscriptions: the callbacks of each channel pattern, and the bindings of
    its reply queue to ``crew.pubsub`` while connected (see :meth:`attach`).

    ``spawn`` runs the binds, unbinds and coroutine callbacks that nobody awaits.
    """

    def __init__(self, spawn: Spawn) -> None:
        self._callbacks: dict[str, list[Callback]] = {}
        #: The bind under way (or done) for each channel subscribed since the last connect.
        self._bindings: dict[str, asyncio.Task[None]] = {}
        self._channel: Channel | None = None
        self._queue = ""
        self._spawn = spawn

    def attach(self, channel: Channel, queue: str) -> None:
        """A connection is open: bind on ``channel`` from now on, to ``queue``."""
        self._channel, self._queue = channel, queue

    def detach(self) -> None:
        """The connection is lost or closed: keep the subscriptions for the next one."""
        self._channel = None

    @property
    def _connected(self) -> bool:
        return self._channel is not None and self._channel.is_open

    def subscribe(self, channel: str, callback: Callback) -> Awaitable[None]:
        """Add ``callback`` to ``channel``, binding it if connected; see
        :meth:`crew.Client.subscribe`."""
        validation.validate_channel(channel, pattern=True)
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        callbacks = self._callbacks.setdefault(channel, [])
        callbacks.append(callback)
        if not self._connected:
            return _done()
        if len(callbacks) == 1:
            bind = self._channel.bind(  # type: ignore[union-attr]
                self._queue, protocol.PUBSUB_EXCHANGE, channel)
            self._bindings[channel] = self._spawn(bind, f"subscribing to {channel!r}")
        binding = self._bindings.get(channel)
        return _done() if binding is None else _Operation(binding)

    def unsubscribe(self, channel: str, callback: Callback | None = None) -> Awaitable[None]:
        """Remove ``callback`` (None: every one) from ``channel``, unbinding it when none is
        left; see :meth:`crew.Client.unsubscribe`."""
        callbacks = self._callbacks.get(channel)
        if callbacks is None:
            return _done()
        if callback is None:
            callbacks.clear()
        elif callback in callbacks:
            callbacks.remove(callback)
        if callbacks:
            return _done()
        del self._callbacks[channel]
        self._bindings.pop(channel, None)
        if not self._connected:
            return _done()
        return _Operation(self._spawn(self._channel.unbind(  # type: ignore[union-attr]
            self._queue, protocol.PUBSUB_EXCHANGE, channel), f"unsubscribing {channel!r}"))

    def publish(self, channel: str, data: Any = None) -> Awaitable[None]:
        """Send ``data`` on ``channel`` at once; see :meth:`crew.Client.publish`."""
        validation.validate_channel(channel)
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

    async def bind_all(self, channel: Channel, queue: str) -> None:
        """Bind ``queue`` to every subscribed channel, including those (un)subscribed
        while the binds are under way."""
        bound: set[str] = set()
        while bound != self._callbacks.keys():
            for name in self._callbacks.keys() - bound:
                await channel.bind(queue, protocol.PUBSUB_EXCHANGE, name)
                bound.add(name)
            for name in bound - self._callbacks.keys():
                await channel.unbind(queue, protocol.PUBSUB_EXCHANGE, name)
                bound.discard(name)
        self._bindings.clear()

    def on_message(self, channel: str | bytes, props: BasicProperties, body: bytes) -> None:
        """A message published on ``channel``: call every callback whose pattern matches."""
        if not isinstance(channel, str):  # pika gives a routing key that is not UTF-8 as bytes
            log.warning("pubsub message on %r dropped: its channel name is not UTF-8", channel)
            return
        try:
            data = codec.decode(body, props.content_type, props.content_encoding)
        except CodecError as exc:
            log.warning("pubsub message on %r dropped: %s", channel, exc)
            return
        for pattern, callbacks in list(self._callbacks.items()):
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
        yield  # type: ignore[unreachable]  # a generator, as __await__ must be


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
