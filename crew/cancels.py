"""Cancel notices: a caller's word that its call must not run, kept until the call's deadline.

A caller cancels a call by publishing a notice to the ``crew.control`` fanout exchange
(docs/PROTOCOL.md, section 7). The exchange is bound to the stream ``crew.cancels``, which
keeps every notice for longer than any call can live; reading a stream does not consume it,
so every worker reads every notice:

- On each connection a worker reads the stream from :data:`~crew.protocol.MAX_EXPIRATION`
  ago, so a worker that starts after a notice was sent still learns of it. It consumes its
  task queues only once it has read everything sent before it connected: AMQP 0-9-1 has no
  "end of stream", so it writes a marker of its own to the stream and waits to read it back.
- Then it follows the stream as notices come. If the broker cancels that consumer (the
  stream was deleted, or its node went away), the worker declares and reads it again.
- A worker never waits for the stream to serve calls: while it is unavailable (RabbitMQ
  3.10 can take long to recover a stream after its node was killed) the worker follows
  the notices live, from a queue of its own, as crew did before the stream, and tries the
  stream again every minute. Only notices sent while no worker of the call's task was
  connected can then be missed.

:class:`Remembered` keeps the notices of calls not (yet) delivered to this worker until
their deadlines; :class:`CancelFeed` reads the stream and hands each notice to the worker's
call handler.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable

from pika.spec import Basic, BasicProperties

from . import protocol
from .amqp import Channel, Connection
from .connecting import NOT_FOUND
from .exceptions import BrokerError, ConnectionLostError, CrewError

__all__ = ["CancelFeed", "Remembered", "StreamUnavailable", "declare_stream", "send_notice"]

log = logging.getLogger(__name__)

#: Cancel notices for calls not (yet) seen that a worker remembers at most.
MAX_REMEMBERED_CANCELS = 100_000
#: Seconds a worker waits to read its marker back before it serves calls all the same.
CATCH_UP_TIMEOUT = 30.0
#: Seconds between tries of the stream while notices are followed live only.
STREAM_RETRY = 60.0
#: Unacknowledged notices the broker sends ahead: a stream consumer needs a prefetch limit.
_PREFETCH = 1000

#: A call, as a cancel notice names it: ``(reply_to, correlation_id)``.
Key = tuple[str, str]
#: ``on_cancel(key, deadline_ms)``: deadline_ms is None when the notice carries none.
OnCancel = Callable[[Key, "int | None"], None]


def send_notice(channel: Channel, correlation_id: str, reply_to: str,
                deadline_ms: int | None) -> None:
    """Publish a caller's cancel notice of the call ``(reply_to, correlation_id)`` to
    ``crew.control`` (docs/PROTOCOL.md, section 7); without ``deadline_ms`` workers
    remember it for :data:`~crew.protocol.MAX_EXPIRATION`, the most they do with one."""
    if deadline_ms is not None:  # a forged presence answer's, maybe: keep it a signed 64-bit
        deadline_ms = max(0, min(deadline_ms, protocol.now_ms() + protocol.seconds_to_ms(
            protocol.MAX_EXPIRATION)))
    headers = {} if deadline_ms is None else {protocol.DEADLINE_HEADER: deadline_ms}
    channel.publish(protocol.CONTROL_EXCHANGE, "", b"", BasicProperties(
        type=protocol.CANCEL_TYPE, correlation_id=correlation_id, reply_to=reply_to,
        headers=headers, delivery_mode=1))


async def cancel_call(connection: Connection, correlation_id: str, reply_to: str,
                      deadline_ms: int | None) -> None:
    """Send the cancel notice of a call made by another program (``crew cancel``, the
    dashboard), on a channel of its own: as a worker would, it first declares
    ``crew.control`` and the stream, so that the notice is kept even where no worker ran."""
    channel = await connection.channel()
    await channel.declare_topology()
    await declare_stream(channel)
    await channel.bind(protocol.CANCEL_STREAM, protocol.CONTROL_EXCHANGE)
    send_notice(channel, correlation_id, reply_to, deadline_ms)
    await channel.close()


class StreamUnavailable(ConnectionLostError):
    """The cancel stream's node is down, or has not recovered the stream yet."""


async def declare_stream(channel: Channel) -> None:
    """Declare :data:`~crew.protocol.CANCEL_STREAM` (docs/PROTOCOL.md, section 2.2a), as
    every worker does before it reads the notices; :class:`StreamUnavailable` while its node
    (re)starts, :class:`~crew.BrokerError` if it cannot be made."""
    try:
        await channel.declare_queue(protocol.CANCEL_STREAM, durable=True,
                                    arguments=protocol.cancel_stream_arguments())
    except BrokerError as exc:
        if exc.code == NOT_FOUND or "running replica" in exc.text:  # node (re)starting
            raise StreamUnavailable(f"the stream {protocol.CANCEL_STREAM} is not "
                                    f"available: {exc.text}") from None
        raise BrokerError(
            f"cannot declare the stream {protocol.CANCEL_STREAM}: {exc.text}. It exists "
            "with other arguments (delete it), or streams are off on this broker "
            "(RabbitMQ 3.9 or later, feature flag stream_queue)", exc.code,
            exc.text) from None


class Remembered:
    """Cancel notices of calls this worker has not seen, each until its call's deadline.

    At most ``limit`` at once: past it the oldest is forgotten (its call may then run if
    it is delivered later; its caller ignores the reply), and that is logged once per
    flood, not once per notice. Used on the worker's loop only.
    """

    def __init__(self, limit: int = MAX_REMEMBERED_CANCELS) -> None:
        self._limit = limit
        self._notices: dict[Key, asyncio.TimerHandle] = {}
        self._flooded = False

    def __len__(self) -> int:
        return len(self._notices)

    def __contains__(self, key: object) -> bool:
        return key in self._notices

    def add(self, key: Key, deadline_ms: int | None) -> None:
        """Remember ``key`` until ``deadline_ms``, at most :data:`~crew.protocol.MAX_EXPIRATION`
        from now (also without one); a notice whose deadline has passed is not kept.

        A notice follows its call, which crew's client gives an expiration of at most that,
        and a worker that connects reads the notices of that long ago only (a forged
        deadline of 2**63 ms lasted until the limit pushed it out)."""
        delay = min((deadline_ms - protocol.now_ms()) / 1000 if deadline_ms is not None
                    else protocol.MAX_EXPIRATION, protocol.MAX_EXPIRATION)
        if delay <= 0 or key in self._notices:
            return
        if len(self._notices) >= self._limit:
            oldest = next(iter(self._notices))
            self._notices.pop(oldest).cancel()
            if not self._flooded:
                log.warning("more than %d cancel notices remembered: forgetting the oldest "
                            "(a flood of notices?); their calls may run if delivered later",
                            self._limit)
                self._flooded = True
        elif self._flooded and len(self._notices) < self._limit // 2:
            self._flooded = False  # the flood is over: warn again at the next one
        self._notices[key] = asyncio.get_running_loop().call_later(
            delay, self._notices.pop, key, None)

    def take(self, key: Key) -> bool:
        """Forget ``key``; True if it was remembered (its call was cancelled)."""
        handle = self._notices.pop(key, None)
        if handle is None:
            return False
        handle.cancel()
        return True

    def clear(self) -> None:
        for handle in self._notices.values():
            handle.cancel()
        self._notices.clear()


class CancelFeed:
    """Follows the cancel notices for a worker on a channel of its own of ``connection``,
    calling ``on_cancel`` (on the loop) for each; ``name`` makes its markers unique.

    From :data:`~crew.protocol.CANCEL_STREAM` when it can. While the stream is unavailable
    (a 404: its node is down, or has not recovered it since a restart), from an exclusive
    queue bound to ``crew.control``, which brings only the notices sent from then on; the
    stream is tried again every :data:`STREAM_RETRY` seconds. A channel that closes under
    it, or a consumer the broker cancels, is replaced; the worker's calls go on meanwhile.
    """

    def __init__(self, connection: Connection, on_cancel: OnCancel, name: str) -> None:
        self._connection = connection
        self._on_cancel = on_cancel
        self._name = name
        self._markers = itertools.count(1)
        self._marker = ""
        self._caught_up: asyncio.Future[None] | None = None
        self._channel: Channel | None = None
        self._closed = False
        #: The follow started again after a loss, or a retry of the stream, under way.
        self._again: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None

    async def start(self, timeout: float = CATCH_UP_TIMEOUT) -> None:
        """Follow the notices: from the stream, returning once every notice sent before
        now was handed over (or after ``timeout``, logged); else live only (logged)."""
        channel = await self._connection.channel()
        try:
            await self._read_stream(channel, timeout)
        except StreamUnavailable as exc:
            log.warning("cancel notices: %s; following those sent from now on only, and "
                        "trying the stream again in %.0f s", exc, STREAM_RETRY)
            channel = await self._connection.channel()
            await self._follow_live(channel)
            self._retry = asyncio.get_running_loop().call_later(
                STREAM_RETRY, self._restart, "to read the stream again")
        self._channel = channel
        channel.on_cancel(lambda _frame: self._restart(
            "after the broker cancelled their consumer (queue deleted, or its node went away)",
            logging.WARNING))
        channel.closed.add_done_callback(
            lambda _closed: self._restart("on a new channel", logging.WARNING))

    def close(self) -> None:
        """Stop following (the worker stops): nothing is started again."""
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        if self._again is not None:
            self._again.cancel()

    async def _read_stream(self, channel: Channel, timeout: float) -> None:
        await channel.qos(_PREFETCH)  # per consumer: streams refuse a global prefetch
        await declare_stream(channel)
        self._marker = f"{self._name}.{next(self._markers)}"
        caught_up = self._caught_up = asyncio.get_running_loop().create_future()
        since = datetime.fromtimestamp(time.time() - protocol.MAX_EXPIRATION, timezone.utc)
        try:
            await channel.bind(protocol.CANCEL_STREAM, protocol.CONTROL_EXCHANGE)
            await channel.consume(protocol.CANCEL_STREAM, self._on_stream_message,
                                  arguments={"x-stream-offset": since})
        except BrokerError as exc:
            # On a cluster, a node whose replica of the stream is not running (yet: after
            # the node restarted) refuses its consumers with 406 "does not have a running
            # replica on the local node": live notices serve until the stream is back.
            raise StreamUnavailable(f"the stream {protocol.CANCEL_STREAM} cannot be read "
                                    f"here: {exc.text}") from None
        channel.publish("", protocol.CANCEL_STREAM, b"", BasicProperties(
            type=protocol.MARKER_TYPE, correlation_id=self._marker, delivery_mode=1))
        channel.flush()
        await asyncio.wait({caught_up, channel.closed}, timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        if channel.closed.done():
            raise ConnectionLostError("the channel closed while the worker read the cancel "
                                      "notices")
        if caught_up.done():
            log.info("cancel notices read from %s up to marker %s", protocol.CANCEL_STREAM,
                     self._marker)
        else:
            log.warning("cancel notices: marker %s not read back within %.0f s; serving "
                        "calls before every earlier notice is known", self._marker, timeout)

    async def _follow_live(self, channel: Channel) -> None:
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await channel.bind(queue, protocol.CONTROL_EXCHANGE)
        await channel.consume(queue, self._on_live_message, auto_ack=True)

    def _on_stream_message(self, channel: Any, method: Basic.Deliver,
                           props: BasicProperties, _body: bytes) -> None:
        # A stream counts acknowledgements as credit for more; they delete nothing.
        channel.basic_ack(method.delivery_tag)
        if props.type == protocol.MARKER_TYPE:
            caught_up = self._caught_up
            if props.correlation_id == self._marker and caught_up and not caught_up.done():
                caught_up.set_result(None)
            return  # another worker's marker, or an old one of ours
        self._on_live_message(channel, method, props, _body)

    def _on_live_message(self, _channel: Any, _method: Basic.Deliver,
                         props: BasicProperties, _body: bytes) -> None:
        if (props.type != protocol.CANCEL_TYPE or not isinstance(props.correlation_id, str)
                or not isinstance(props.reply_to, str) or not props.correlation_id
                or not props.reply_to):
            log.warning("control message of unknown type %r ignored", props.type)
            return
        deadline = (props.headers or {}).get(protocol.DEADLINE_HEADER)
        if not isinstance(deadline, int) or isinstance(deadline, bool):
            deadline = None
        self._on_cancel((props.reply_to, props.correlation_id), deadline)

    def _restart(self, why: str, level: int = logging.INFO) -> None:
        """Follow again on a new channel (the old one, if open, is closed first)."""
        if (self._closed or not self._connection.is_open
                or (self._again is not None and not self._again.done())):
            return
        if self._retry is not None:
            self._retry.cancel()
        log.log(level, "cancel notices: following them again %s", why)
        self._again = asyncio.ensure_future(self._start_again())

    async def _start_again(self) -> None:
        old, self._channel = self._channel, None
        try:
            if old is not None and old.is_open:
                await old.close()
            await self.start()
        except CrewError as exc:
            log.warning("cancel notices: could not follow them again: %s", exc)
            if not self._closed and self._connection.is_open:  # else the worker reconnects
                self._retry = asyncio.get_running_loop().call_later(
                    STREAM_RETRY, self._restart, "after a failed try")
