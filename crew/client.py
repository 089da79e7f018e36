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
import functools
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Coroutine

from pika.spec import Basic, BasicProperties

from . import codec, protocol
from .amqp import Channel, Connection
from .connecting import connect_retrying
from .exceptions import (CallError, CodecError, ConnectionLostError,
                         CrewError, DecodeError, ExpirationError, RemoteError, TimeoutError,
                         UnknownTaskError)
from .loops import thread_loop
from .pubsub import Callback, PubSub
from .settings import BrokerSettings

__all__ = ["Client", "Parallel"]

log = logging.getLogger(__name__)

#: Seconds the client waits past a call's deadline for the worker's or the broker's own
#: answer (a kill notice or a dead letter) before it answers the caller by itself.
DEFAULT_DEADLINE_GRACE = 1.0
#: Task names a client remembers as valid; beyond that they are checked on every call.
_MAX_REMEMBERED_NAMES = 1024
#: AMQP reply code of a mandatory message that no queue took.
_NO_ROUTE = 312
#: gzip bodies from this size up are compressed and inflated in a thread, off the loop:
#: zlib takes about 2.5 ms for 256 KiB of text here, a thread hop about 0.1 ms.
_OFF_LOOP_BYTES = 256 * 1024

class _Resend(Exception):
    """Settles a ``retry=True`` call whose connection was lost: send it again."""


@dataclass(slots=True, eq=False)
class _Call:
    task: str
    future: asyncio.Future[tuple[Any, dict[str, Any]]]
    deadline_ms: int
    retry: bool = False
    reply_to: str = ""  # the reply queue it was last sent with
    timer: asyncio.TimerHandle | None = None
    started: float = field(default_factory=time.monotonic)

    def settle(self, outcome: tuple[Any, dict[str, Any]] | BaseException) -> None:
        if self.future.done():
            return
        if isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)


class Client(PubSub):
    """A connection to the broker that calls tasks and carries pubsub.

    ``url``: amqp:// or amqps:// (default ``$CREW_URL``, else guest on localhost); ``host``,
    ``port``, ``vhost``, ``user``, ``password`` override parts of it. ``content_type``: how
    calls are encoded (msgpack, or JSON). ``expiration``: the default deadline of a call in
    seconds. ``deadline_grace``: how long past a deadline the client waits for the worker's
    or broker's own answer before raising :class:`~crew.TimeoutError` itself.
    ``reconnect``: after a lost connection, connect again by itself (with capped, jittered
    backoff) and declare its reply queue and subscriptions again.
    """

    def __init__(self, url: str | None = None, *, host: str | None = None,
                 port: int | None = None, vhost: str | None = None, user: str | None = None,
                 password: str | None = None, broker: BrokerSettings | None = None,
                 content_type: str = protocol.MSGPACK,
                 expiration: float = protocol.DEFAULT_EXPIRATION,
                 deadline_grace: float = DEFAULT_DEADLINE_GRACE,
                 reconnect: bool = True) -> None:
        if broker is None:
            broker = BrokerSettings.from_url(url, host=host, port=port, vhost=vhost, user=user,
                                             password=password, name="crew-client")
        if content_type not in (protocol.MSGPACK, protocol.JSON):
            raise ValueError(f"content_type must be {protocol.MSGPACK!r} or {protocol.JSON!r}, "
                             f"got {content_type!r}")
        if not deadline_grace >= 0:
            raise ValueError(f"deadline_grace must be >= 0 seconds, got {deadline_grace!r}")
        self.broker = broker
        self.content_type = content_type
        self.expiration = protocol.validate_expiration(expiration)
        self.deadline_grace = float(deadline_grace)
        self._connection: Connection | None = None
        self._channel: Channel | None = None
        self._reply_queue = ""
        self._pending: dict[str, _Call] = {}
        self._subscriptions: dict[str, list[Callback]] = {}
        #: The bind under way (or done) for each channel subscribed since connect().
        self._bindings: dict[str, asyncio.Task[None]] = {}
        #: Binds, unbinds and coroutine callbacks under way: the loop keeps only weak
        #: references to tasks, so a task nobody awaits must be referenced here.
        self._background: set[asyncio.Task[Any]] = set()
        self.reconnect = reconnect
        #: Set while connected; calls made while reconnecting wait for it.
        self._ready = asyncio.Event()
        #: None before connect(), after close() and after a connect that failed; otherwise
        #: the task that connects or last reconnected, under way or done.
        self._connector: asyncio.Task[None] | None = None
        self._closing = False
        # Correlation ids: a random prefix per client and a counter, unique and cheaper
        # than a uuid4 per call.
        self._id_prefix = f"{uuid.uuid4().hex[:16]}."
        self._call_numbers = itertools.count(1)
        self._task_names: set[str] = set()

    # --- connection --------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._channel is not None and self._channel.is_open

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
        connector = self._connector
        if connector is not None and not connector.done():
            return connector if timeout is None else _bounded(connector, timeout)
        if connector is not None and self.connected:
            return connector
        self._closing = False
        connector = thread_loop().create_task(self._connect(timeout))
        connector.add_done_callback(self._connect_done)
        self._connector = connector
        return connector

    async def _connect(self, timeout: float | None) -> None:
        try:
            await connect_retrying(self._open, who="client", timeout=timeout)
        except asyncio.CancelledError:
            if asyncio.current_task() is not self._connector:
                # close() stopped it: tell whoever awaits connect() why, rather than
                # cancelling them.
                raise ConnectionLostError("the client was closed before it connected") from None
            raise

    def _connect_done(self, connector: "asyncio.Task[None]") -> None:
        # exception() marks the error as retrieved: no "Task exception was never retrieved"
        # from asyncio when nobody awaited the connect.
        error = (ConnectionLostError("connect() was cancelled before the client connected")
                 if connector.cancelled() else connector.exception())
        if error is None or connector is not self._connector:
            return  # connected; or closed, which failed the waiting calls itself
        self._connector = None
        if not connector.cancelled():
            log.error("client could not connect (%d call(s) waiting for it fail): %s",
                      len(self._pending), error)
        self._fail_all(error)  # they were all waiting for this connection

    async def _reconnect(self) -> None:
        await connect_retrying(self._open, who="client", retry_auth=True)

    async def _open(self) -> None:
        connection = await Connection.open(self.broker)
        try:
            channel = await connection.channel()
            await channel.declare_exchange(protocol.EXPIRED_EXCHANGE, "headers")
            await channel.declare_exchange(protocol.CONTROL_EXCHANGE, "fanout")
            await channel.declare_exchange(protocol.PUBSUB_EXCHANGE, "topic")
            # Server-named and exclusive: a fresh name per connection, so a reconnection never
            # waits for the broker to release the old one (405 RESOURCE_LOCKED).
            queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
            await channel.bind(queue, protocol.EXPIRED_EXCHANGE,
                               arguments=protocol.expired_binding(queue))
            channel.on_return(self._on_return)
            await channel.consume(queue, self._on_message, auto_ack=True, exclusive=True)
            # Last, so that no await separates the final check of the subscriptions from
            # the moment subscribe() sees the client as connected.
            await self._bind_subscriptions(channel, queue)
        except BaseException:
            await connection.close()
            raise
        self._connection, self._channel, self._reply_queue = connection, channel, queue
        connection.closed.add_done_callback(self._on_connection_closed)
        self._ready.set()
        log.info("client connected to %s, reply queue %s", self.broker.safe_url, queue)

    async def close(self) -> None:
        """Fail every pending call with :class:`~crew.ConnectionLostError`, stop a connect
        or reconnection under way and disconnect."""
        self._closing = True
        self._ready.clear()
        if self._connector is not None:
            self._connector.cancel()
            self._connector = None
        self._fail_all(ConnectionLostError("the client was closed"))
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._channel = None

    async def __aenter__(self) -> "Client":
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def _on_connection_closed(self, fut: asyncio.Future[BaseException]) -> None:
        if self._closing:
            return
        log.error("client lost its broker connection: %s", fut.result())
        self._ready.clear()
        self._channel = None
        # The replies to these calls were lost with the old reply queue.
        for call in list(self._pending.values()):
            call.settle(_Resend() if call.retry else ConnectionLostError(
                f"the broker connection was lost while the call to {call.task!r} waited; "
                "it may or may not have run"))
        if self.reconnect:
            self._connector = self._spawn(self._reconnect(), "reconnecting")
        else:
            self._connector = None  # calls fail at once, not at their deadline

    def _fail_all(self, error: BaseException) -> None:
        for call in list(self._pending.values()):
            call.settle(error)

    # --- calls -------------------------------------------------------------------------

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
        if task not in self._task_names:  # validated once per name, not on every call
            protocol.validate_task_name(task)
            if len(self._task_names) < _MAX_REMEMBERED_NAMES:  # names may come from HTTP
                self._task_names.add(task)
        protocol.validate_priority(priority)
        seconds = protocol.validate_expiration(self.expiration if expiration is None
                                               else expiration)
        user_headers = protocol.validate_user_headers(headers)
        body, encoding = await _encode(data, self.content_type, gzip)
        if self._connector is None and not self.connected:
            raise ConnectionLostError("the client is not connected; call connect() first")
        loop = asyncio.get_running_loop()
        correlation_id = f"{self._id_prefix}{next(self._call_numbers)}"
        deadline_ms = protocol.now_ms() + protocol.seconds_to_ms(seconds)
        call = _Call(task, loop.create_future(), deadline_ms, retry)
        user_headers[protocol.DEADLINE_HEADER] = deadline_ms
        user_headers[protocol.TASK_HEADER] = task
        if gzip is not None:  # the worker compresses the reply as the caller chose
            user_headers[protocol.GZIP_HEADER] = bool(gzip)
        properties = BasicProperties(
            content_type=self.content_type, content_encoding=encoding,
            correlation_id=correlation_id, priority=priority, headers=user_headers,
            delivery_mode=2 if persistent else 1)
        self._pending[correlation_id] = call
        call.timer = loop.call_later(seconds + self.deadline_grace, self._on_deadline,
                                     correlation_id)
        try:
            while True:
                await self._send(call, properties, body)
                try:
                    value, reply_headers = await call.future
                    break
                except _Resend:
                    log.warning("call %s to %r is sent again after the connection was lost",
                                correlation_id, task)
                    call.future = loop.create_future()
        except asyncio.CancelledError:
            # Cancelling the awaiting task cancels call.future too; a future that holds an
            # outcome means the call had ended already and there is nothing to stop.
            if call.future.cancelled() and call.reply_to:
                self._send_cancel(correlation_id, call)
            raise
        finally:
            call.timer.cancel()
            self._pending.pop(correlation_id, None)
        return (value, reply_headers) if return_headers else value

    async def _send(self, call: _Call, properties: BasicProperties, body: bytes) -> None:
        """Publish the call, first waiting for a connection up to its deadline."""
        while not self.connected:
            if self._connector is None:
                raise ConnectionLostError("the client was closed")
            remaining = (call.deadline_ms - protocol.now_ms()) / 1000
            waiter = asyncio.ensure_future(self._ready.wait())
            try:
                await asyncio.wait({waiter, call.future}, timeout=max(0.0, remaining),
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
        call.reply_to = properties.reply_to = self._reply_queue
        properties.headers[protocol.CLIENT_HEADER] = self._reply_queue
        properties.expiration = protocol.ttl_property(call.deadline_ms)
        # mandatory: with no queue for the task the broker returns the call at once
        # (312 NO_ROUTE), which _on_return turns into UnknownTaskError.
        channel = self._channel
        channel.publish(  # type: ignore[union-attr]  # connected, checked above
            "", protocol.task_queue(call.task), body, properties, mandatory=True)
        if len(self._pending) == 1:
            # A lone call leaves now. Calls made while others are under way (a server's
            # concurrent requests) leave together at the end of the loop iteration: one
            # system call, one wake-up of the broker.
            channel.flush()  # type: ignore[union-attr]

    def parallel(self) -> "Parallel":
        """Gather several calls: ``with client.parallel() as mc: ...; await mc.result()``."""
        return Parallel(self)

    def _send_cancel(self, correlation_id: str, call: _Call) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        channel.publish(protocol.CONTROL_EXCHANGE, "", b"", BasicProperties(
            type=protocol.CANCEL_TYPE, correlation_id=correlation_id, reply_to=call.reply_to,
            headers={protocol.DEADLINE_HEADER: call.deadline_ms}, delivery_mode=1))
        log.debug("call %s cancelled by its caller", correlation_id)

    def _on_deadline(self, correlation_id: str) -> None:
        call = self._pending.get(correlation_id)
        if call is None:
            return
        blocked = self._connection is not None and self._connection.blocked
        why = ("; the broker is blocking publishers (memory or disk alarm)" if blocked
               else "; it may or may not have run")
        call.settle(TimeoutError(
            f"no answer from task {call.task!r} by its deadline "
            f"({time.monotonic() - call.started:.3f} s after the call){why}"))

    def _on_return(self, _ch: Any, method: Basic.Return, props: BasicProperties,
                   _body: bytes) -> None:
        call = self._pending.get(props.correlation_id or "")
        if call is None:
            return
        if method.reply_code == _NO_ROUTE:
            call.settle(UnknownTaskError(call.task))
        else:
            call.settle(CallError(f"the broker returned the call to {call.task!r}: "
                                  f"{method.reply_code} {method.reply_text}"))

    def _spawn(self, coro: Coroutine[Any, Any, Any], describe: str) -> "asyncio.Task[Any]":
        """Run ``coro`` as a task that is referenced until done and logs its failure."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(lambda done: self._background_done(done, describe))
        return task

    def _background_done(self, task: "asyncio.Task[Any]", describe: str) -> None:
        self._background.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if self._closing or isinstance(task.exception(), ConnectionLostError):
            # Cut short by close() or a lost connection, which is logged once already.
            log.info("%s stopped: %s", describe, task.exception())
        else:
            log.error("%s failed", describe, exc_info=task.exception())

    def _on_message(self, _ch: Any, method: Basic.Deliver, props: BasicProperties,
                    body: bytes) -> None:
        if method.exchange == protocol.PUBSUB_EXCHANGE:
            self._on_event(method.routing_key, props, body)
            return
        call = self._pending.get(props.correlation_id or "")
        if call is None:
            log.info("message %r on the reply queue matches no pending call (late, duplicate "
                     "or forged); dropped", props.correlation_id)
            return
        if method.exchange == protocol.EXPIRED_EXCHANGE:
            call.settle(ExpirationError(
                f"no worker took the call to {call.task!r} before its deadline"))
            return
        if props.content_encoding == protocol.GZIP and len(body) >= _OFF_LOOP_BYTES:
            # Inflating megabytes would hold up every other coroutine on this loop; zlib
            # lets them run meanwhile in a thread.
            try:
                decoding = asyncio.get_running_loop().run_in_executor(
                    None, _outcome, props, body)
            except RuntimeError:  # the loop's executor is shut down: inflate here
                pass
            else:
                decoding.add_done_callback(functools.partial(_settle_decoded, call))
                return
        call.settle(_outcome(props, body))


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


def _settle_decoded(call: _Call, decoding: asyncio.Future[Any]) -> None:
    if not decoding.cancelled():
        # _outcome returns crew's errors; anything it raised is a bug, but still an answer.
        call.settle(decoding.exception() or decoding.result())


async def _encode(data: Any, content_type: str,
                  gzip: bool | None) -> tuple[bytes, str | None]:
    """:func:`crew.codec.encode`, compressing a large body in a thread: on the loop, a
    megabyte of text would hold up every other coroutine for about 10 ms."""
    body = codec.serialize(data, content_type)
    if not codec.should_gzip(body, gzip):
        return codec.check_wire_size(body), None
    if len(body) < _OFF_LOOP_BYTES:
        return codec.gzip_body(body), protocol.GZIP
    return await asyncio.to_thread(codec.gzip_body, body), protocol.GZIP


def _outcome(props: BasicProperties, body: bytes) -> tuple[Any, dict[str, Any]] | CrewError:
    """The result or the error a reply carries."""
    headers = props.headers or {}
    status = headers.get(protocol.STATUS_HEADER)
    try:
        value = codec.decode(body, props.content_type, props.content_encoding)
    except CodecError as exc:
        return exc
    if status == protocol.STATUS_OK:
        return value, protocol.user_headers(headers)
    kind, message, traceback = codec.parse_error_envelope(value)
    if status == protocol.STATUS_ERROR:
        return RemoteError(kind, message, traceback)
    if status == protocol.STATUS_TIMEOUT:
        return TimeoutError(message or "the job ran past its deadline and was interrupted")
    if status == protocol.STATUS_EXPIRED:
        return ExpirationError(message or "no worker started the call before its deadline")
    return DecodeError(f"reply with unknown status {status!r}")


class Parallel:
    """Several calls made at once; :meth:`result` returns their outcomes in call order.

    A failed call puts its exception object in its slot instead of raising. Leaving the
    ``with`` block cancels calls whose results were not awaited, so none leaks.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._tasks: list[asyncio.Task[Any]] = []

    def call(self, task: str, data: Any = None, **kwargs: Any) -> "asyncio.Task[Any]":
        """Start a call at once (same arguments as :meth:`Client.call`)."""
        started = asyncio.ensure_future(self._client.call(task, data, **kwargs))
        self._tasks.append(started)
        return started

    async def result(self) -> list[Any]:
        """Every call's result or exception, in call order."""
        return list(await asyncio.gather(*self._tasks, return_exceptions=True))

    def __enter__(self) -> "Parallel":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for task in self._tasks:
            if not task.done():
                task.cancel()

    async def __aenter__(self) -> "Parallel":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.__exit__(*exc_info)
