"""The client: calls tasks and awaits their replies, from Tornado or any asyncio program.

::

    client = Client()              # or Client('amqp://user:pass@host:5672/vhost')
    await client.connect()         # or client.connect() before the loop runs, as the article
    resp = await client.call('test', data, priority=100)
    with client.parallel() as mc:
        mc.call('test')
        mc.call('stat')
        test_result, stat_result = await mc.result()
    await client.close()

Every call ends with exactly one outcome: its result, or a :class:`~crew.CallError`.
Replies arrive on the client's private, server-named reply queue and are matched by
correlation id; a reply for no pending call (late, duplicate, forged) is dropped. The client
is not thread-safe: use it from the thread that runs its event loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Sequence

from pika.spec import BasicProperties

from . import protocol, validation
from .amqp import Channel, Connection
from .exceptions import ConnectionLostError
from .link import Link
from .loops import Background
from .observing import ClientObserver, for_client
from .parallel import Parallel
from .pending import Call, Messages, Outcome, Pending, Resend, ThreadCall, encode
from .pubsub import Callback, Subscriptions
from .settings import BrokerSettings

__all__ = ["Client", "Parallel"]

log = logging.getLogger(__name__)

#: Seconds the client waits past a call's deadline for the worker's or the broker's own
#: answer (a kill notice or a dead letter) before it answers the caller by itself.
DEFAULT_DEADLINE_GRACE = 1.0


class Client:
    """A connection to the broker that calls tasks and carries pubsub.

    ``url``: amqp:// or amqps:// (default ``$CREW_URL``, else guest on localhost); ``host``,
    ``port``, ``vhost``, ``user``, ``password`` override parts of it. Several URLs (a list,
    or separated by commas) are the nodes of one cluster, tried in turn (then ``host`` and
    ``port`` are refused). ``content_type``: how
    calls are encoded (msgpack, or JSON). ``expiration``: the default deadline of a call in
    seconds. ``deadline_grace``: how long past a deadline the client waits for the worker's
    or broker's own answer before raising :class:`~crew.TimeoutError` itself.
    ``reconnect``: after a lost connection, connect again by itself (with capped, jittered
    backoff) and declare its reply queue and subscriptions again. ``metrics``: count calls in
    prometheus_client's default registry; ``traces``: a span per call (OpenTelemetry); both
    on when their library is installed unless False (see :mod:`crew.observing`).
    """

    def __init__(self, url: str | Sequence[str] | None = None, *, host: str | None = None,
                 port: int | None = None, vhost: str | None = None, user: str | None = None,
                 password: str | None = None, broker: BrokerSettings | None = None,
                 content_type: str = protocol.MSGPACK,
                 expiration: float = protocol.DEFAULT_EXPIRATION,
                 deadline_grace: float = DEFAULT_DEADLINE_GRACE,
                 reconnect: bool = True, metrics: bool | None = None,
                 traces: object = None) -> None:
        if broker is None:
            broker = BrokerSettings.from_url(url, host=host, port=port, vhost=vhost, user=user,
                                             password=password, name="crew-client")
        elif not isinstance(broker, BrokerSettings):  # URLs go first; here they failed late
            raise TypeError(f"broker= takes BrokerSettings, not {type(broker).__name__}")
        if content_type not in (protocol.MSGPACK, protocol.JSON):
            raise ValueError(f"content_type must be {protocol.MSGPACK!r} or {protocol.JSON!r}, "
                             f"got {content_type!r}")
        if not deadline_grace >= 0:
            raise ValueError(f"deadline_grace must be >= 0 seconds, got {deadline_grace!r}")
        self.content_type = content_type
        self.expiration = validation.validate_expiration(expiration)
        self.deadline_grace = float(deadline_grace)
        #: Its pending calls (:class:`crew.pending.Pending`), by correlation id.
        self.pending = Pending()
        self._pending = self.pending.calls  # the table itself: read and written on every call
        #: How its calls become messages (:class:`crew.pending.Messages`).
        self.messages = Messages()
        background = Background(log)
        self._subscriptions = Subscriptions(background.spawn)
        self._link = Link(broker, reconnect=reconnect, pending=self.pending,
                          subscriptions=self._subscriptions, background=background)
        #: Metrics and traces of its calls (:mod:`crew.observing`); None when both are off.
        self.observer: ClientObserver | None = for_client(metrics, traces)

    # --- connection --------------------------------------------------------------------

    @property
    def broker(self) -> BrokerSettings:
        """Where the client connects (read at each connection)."""
        return self._link.broker

    @broker.setter
    def broker(self, broker: BrokerSettings) -> None:
        self._link.broker = broker

    @property
    def reconnect(self) -> bool:
        """Whether the client connects again by itself after a lost connection."""
        return self._link.reconnect

    @reconnect.setter
    def reconnect(self, reconnect: bool) -> None:
        self._link.reconnect = reconnect

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def _connection(self) -> Connection | None:  # tests reach through it to pika's
        return self._link.connection

    @property
    def _reply_queue(self) -> str:  # tests send forged replies to it
        return self._link.reply_queue

    def connect(self, timeout: float | None = None) -> "asyncio.Future[None]":
        """Start connecting: declare the private reply queue and receive replies.

        Returns a future that is done once connected: ``await client.connect()`` (or
        ``yield`` it in a ``@gen.coroutine``) waits for that. Or call it plainly, and even
        before the event loop runs, as the article does before ``IOLoop.instance().start()``:
        the client connects on this thread's loop (the running one, else the one Tornado's
        ``IOLoop.current()`` will run), and calls made meanwhile wait for the connection, up
        to their deadline.

        While the broker does not answer, retries with capped, jittered backoff, logging
        each attempt; ``timeout`` (seconds, None = no limit) bounds that, after which the
        future fails with :class:`~crew.ConnectionLostError`. A refused login or certificate
        fails it with :class:`~crew.AuthenticationError` at once (later reconnections keep
        retrying it). A connect that fails is logged, and the calls waiting for it fail with
        its error. While a connect is under way, this returns it (waited for up to this
        ``timeout``, if given); when connected, a done future. :meth:`close` stops a connect
        under way, which then fails with :class:`~crew.ConnectionLostError`.
        """
        return self._link.connect(timeout)

    async def close(self) -> None:
        """Fail every pending call with :class:`~crew.ConnectionLostError`, stop a connect
        or reconnection under way and disconnect."""
        await self._link.close()

    async def __aenter__(self) -> "Client":
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # --- calls -------------------------------------------------------------------------

    # longer than 40 lines because its docstring is the reference of every argument
    async def call(self, task: str, data: Any = None, *, priority: int = 0,
                   expiration: float | None = None, persistent: bool = True,
                   gzip: bool | None = None, headers: dict[str, Any] | None = None,
                   return_headers: bool = False, retry: bool = False) -> Any:
        """Call ``task`` with ``data`` and return its result.

        ``priority`` 0-255 (a queue's maximum caps it); ``expiration`` seconds from now until
        the call must be answered, queue time included; ``persistent`` survives a broker
        restart while queued; ``gzip`` None compresses large bodies (the call's and the
        reply's) when it pays, True compresses both always, False neither;
        ``headers`` reach the task as ``context.headers``. With ``return_headers`` the result
        is ``(value, headers)``, the headers being the task's ``context.headers``.
        ``retry``: the call is safe to run twice, so if the connection is lost while it
        waits, it is sent again on the next connection under the same deadline. A call made
        while the client reconnects waits for the connection, up to its deadline.

        Raises :class:`~crew.RemoteError`, :class:`~crew.TimeoutError`,
        :class:`~crew.ExpirationError`, :class:`~crew.UnknownTaskError`,
        :class:`~crew.ConnectionLostError`, or a :class:`~crew.CodecError` for data that
        cannot be sent or a reply that cannot be read. Cancelling the awaiting coroutine
        cancels the call: a running job is interrupted, a queued one never starts.
        """
        seconds, user_headers = self.messages.check(
            task, priority, self.expiration if expiration is None else expiration, headers)
        body, encoding = await encode(data, self.content_type, gzip)
        if self._link.connector is None and not self._link.connected:
            raise ConnectionLostError("the client is not connected; call connect() first")
        properties = self.messages.properties(
            task, seconds, user_headers, self.content_type, encoding, priority=priority,
            persistent=persistent, gzip=gzip)
        correlation_id: str = properties.correlation_id
        call = Call(task, asyncio.get_running_loop().create_future(),
                    user_headers[protocol.DEADLINE_HEADER], retry)
        run = self._run(correlation_id, call, seconds, properties, body)
        if self.observer is not None:
            run = self.observer.call(run, task, call.started, correlation_id, user_headers)
        value, reply_headers = await run
        return (value, reply_headers) if return_headers else value

    async def _run(self, correlation_id: str, call: Call, seconds: float,
                   properties: BasicProperties, body: bytes) -> Outcome:
        """Send the call (again after a lost connection if it may) and await its outcome;
        it is pending meanwhile, and answered by the client itself past its deadline."""
        loop = call.future.get_loop()
        self._pending[correlation_id] = call
        call.timer = loop.call_later(seconds + self.deadline_grace, self._on_deadline,
                                     correlation_id)
        try:
            while True:
                await self._link.send(call, properties, body)
                try:
                    return await call.future
                except Resend:
                    log.warning("call %s to %r is sent again after the connection was lost",
                                correlation_id, call.task)
                    call.future = loop.create_future()
        except asyncio.CancelledError:
            # Cancelling the awaiting task cancels call.future too; a future that holds an
            # outcome means the call had ended already and there is nothing to stop.
            if call.future.cancelled() and call.reply_to:
                self._link.send_cancel(correlation_id, call)
            raise
        finally:
            call.timer.cancel()
            self._pending.pop(correlation_id, None)

    def parallel(self) -> "Parallel":
        """Gather several calls: ``with client.parallel() as mc: ...; await mc.result()``."""
        return Parallel(self)

    def _on_deadline(self, correlation_id: str) -> None:
        self.pending.on_deadline(correlation_id, self._link.blocked)

    # --- for a thread that sends a lone call itself (crew.synccall): with messages, a
    # ThreadCall in pending, channel_now(), its publish_now and address(), observer.

    @property
    def blocked(self) -> bool:
        """Whether the broker blocks publishers now (memory or disk alarm)."""
        return self._link.blocked

    def channel_now(self) -> Channel | None:
        """The channel another thread may publish a call on now, or None if the loop must
        send it: other calls pending, no connection, publishers blocked, or a connection
        that cannot send from a thread (pika's public path, TLS)."""
        channel = self._link.channel
        if (self._pending or channel is None or not channel.is_open or self._link.blocked
                or not channel.can_send_now()):
            return None
        return channel

    def address(self, channel: Channel, call: ThreadCall, properties: BasicProperties) -> bool:
        """Under ``channel``'s send lock: address ``call`` (``properties``) to the reply queue
        of ``channel``'s connection; False, and nothing changed, if that is no longer the
        client's current connection (then the loop sends the call)."""
        link = self._link
        if link.channel is not channel or not link.ready.is_set():
            return False
        call.reply_to = properties.reply_to = link.reply_queue
        properties.headers[protocol.CLIENT_HEADER] = link.reply_queue
        properties.expiration = protocol.ttl_property(call.deadline_ms)
        return True

    def send_cancel(self, correlation_id: str, call: Call | ThreadCall) -> None:
        """On the loop: tell the workers that the caller cancelled the call (if connected)."""
        self._link.send_cancel(correlation_id, call)

    # --- pubsub --------------------------------------------------------------------------

    def subscribe(self, channel: str, callback: Callback) -> Awaitable[None]:
        """Call ``callback(data)`` (a function or coroutine function) for each message on
        ``channel``; ``*`` (one word) and ``#`` (any words) are wildcards, as in AMQP topics.

        Works before :meth:`connect` (which then makes the binding and reports its failure)
        and after it; subscriptions survive a close and a new connect. The result may be
        ignored; awaiting it waits until the broker delivers the channel to this client and
        raises if it cannot.
        """
        return self._subscriptions.subscribe(channel, callback)

    def unsubscribe(self, channel: str, callback: Callback | None = None) -> Awaitable[None]:
        """Remove ``callback`` (or, when None, every callback) from ``channel``.

        Once a channel has no callback left, its messages stop coming to this client;
        awaiting the result waits for that.
        """
        return self._subscriptions.unsubscribe(channel, callback)

    def publish(self, channel: str, data: Any = None) -> Awaitable[None]:
        """Send ``data`` to every client subscribed to ``channel`` now (fire and forget).

        The message is handed to the connection at once, awaited or not; awaiting the
        result raises what went wrong (not connected, data that cannot be encoded), which
        is also logged. Nothing is kept for subscribers that come later.
        """
        return self._subscriptions.publish(channel, data)
