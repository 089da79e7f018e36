"""The worker: ``@Task`` functions served from their queues, each job in a watched thread.

::

    from crew.worker import run, context, Task

    @Task('test')
    def long_task(req):
        context.settings.counter += 1
        return 'Wake up Neo.\\n'

    run(counter=0)

:class:`Worker` is the explicit API (embedding, tests); :func:`run` parses the command line
around it. One asyncio loop owns the AMQP connection and never runs sync task code: jobs run
in threads (:mod:`crew.pool`), ``async def`` tasks as coroutines on the loop (they must not
block it). Each call is acknowledged only once its reply is published, so a worker that dies
mid-job leaves the call to be redelivered. What happens to each call, from delivery to
reply, is :mod:`crew.calls`; this module connects, reconnects and stops.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid as _uuid
from functools import partial
from typing import Any, Callable, Mapping

from pika.spec import BasicProperties

from . import codec, protocol
from .amqp import Connection
from .connecting import NOT_FOUND, Stopped, connect_retrying, unavailable
from .calls import CallHandler
from .cancels import CancelFeed
from .context import context
from .exceptions import BrokerError, ConnectionLostError, CrewError
from .registry import Settings, Task, TaskFunction, TaskRegistry, tasks
from .settings import BrokerSettings

__all__ = ["Task", "TaskRegistry", "Worker", "context", "run", "serve_in_thread", "tasks"]

log = logging.getLogger(__name__)

#: ``tasks`` is also a parameter name of Worker; this alias reaches the module's registry.
_default_registry = tasks

#: Default number of stuck job threads a worker tolerates before it drains and exits.
DEFAULT_MAX_STUCK = 4
#: Default seconds running jobs get to finish on a graceful stop.
DEFAULT_GRACE = 30.0
#: Default memory ceiling, in bytes, of what a worker reserves for the calls it decodes and
#: runs (see crew.memory): any body of up to 16 MiB as sent, and any gzip body that inflates
#: to at most 30 MiB (27 MiB of JSON), fits it whatever it holds.
DEFAULT_MAX_MEMORY = 1024 * 1024 * 1024
#: The smallest ceiling accepted: a 16 MiB body of strings or bytes must fit.
MIN_MAX_MEMORY = 128 * 1024 * 1024


class Publisher:
    """``context.pubsub``: publishes to pubsub channels from any thread of the worker."""

    def __init__(self, worker: "Worker") -> None:
        self._worker = worker

    def publish(self, channel: str, data: Any = None) -> None:
        """Send ``data`` to every client subscribed to ``channel`` (fire and forget).

        Safe from job threads and ``async`` tasks alike: the message is encoded here and
        handed to the worker's loop, which owns the connection, so it goes out before the
        reply of the job that published it. Raises :class:`~crew.EncodeError` for data
        that cannot be sent and :class:`~crew.ConnectionLostError` once the worker stopped;
        a message published while the connection is down is dropped (and logged).
        """
        protocol.validate_channel(channel)
        body, encoding = codec.encode(data)
        self._worker._call_in_loop(self._worker._publish_event, channel, body, encoding)


class Worker:
    """Serves tasks from their queues until stopped.

    ``tasks``: a mapping of names to functions (default: everything ``@Task`` registered).
    ``broker``: a :class:`~crew.settings.BrokerSettings` or URL (default from ``$CREW_URL``).
    ``concurrency``: jobs run at once; the prefetch equals it, so waiting calls stay in the
    broker, in priority order, for any worker to take. ``max_priority``: ``x-max-priority``
    of the task queues (must match every other worker's). ``settings``: what jobs see as
    ``context.settings``. ``max_stuck``: stuck job threads tolerated before the worker drains
    and exits (see :mod:`crew.pool`). ``grace``: seconds running jobs get on a graceful stop.
    ``max_memory``: bytes the calls being served may hold undecoded, inflated and decoded
    (see :mod:`crew.memory`); a call that could need more alone is refused with
    :class:`~crew.MessageTooLargeError`.
    """

    def __init__(self, tasks: Mapping[str, TaskFunction] | None = None, *,
                 broker: BrokerSettings | str | None = None, concurrency: int = 1,
                 max_priority: int = protocol.DEFAULT_QUEUE_MAX_PRIORITY,
                 settings: Mapping[str, Any] | None = None, options: Any = None,
                 max_stuck: int = DEFAULT_MAX_STUCK, grace: float = DEFAULT_GRACE,
                 max_memory: int = DEFAULT_MAX_MEMORY) -> None:
        registry = _default_registry if tasks is None else tasks
        if not registry:
            raise ValueError("a worker needs at least one task")
        for name in registry:
            protocol.validate_task_name(name)
        if not isinstance(concurrency, int) or not 1 <= concurrency <= 1000:
            raise ValueError(f"concurrency must be an int in 1..1000, got {concurrency!r}")
        if not isinstance(max_stuck, int) or max_stuck < 0:
            raise ValueError(f"max_stuck must be an int >= 0, got {max_stuck!r}")
        if not grace >= 0:
            raise ValueError(f"grace must be >= 0 seconds, got {grace!r}")
        if not isinstance(max_memory, int) or max_memory < MIN_MAX_MEMORY:
            raise ValueError(f"max_memory must be an int of at least {MIN_MAX_MEMORY} bytes "
                             f"(128 MiB), got {max_memory!r}")
        self.tasks = dict(registry)
        self.broker = (broker if isinstance(broker, BrokerSettings)
                       else BrokerSettings.from_url(broker))
        self.concurrency = concurrency
        self.max_priority = protocol.validate_max_priority(max_priority)
        self.max_stuck = max_stuck
        self.grace = grace
        self.max_memory = max_memory
        self.uuid = _uuid.uuid4().hex
        self.settings = Settings(**dict(settings or {}), uuid=self.uuid, options=options)
        self.pubsub = Publisher(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: Connection | None = None
        #: What follows the cancel notices on the current connection, set by :meth:`_setup`.
        self._cancel_feed: CancelFeed | None = None
        self._consumers: list[str] = []
        self._calls = CallHandler(self, self._call_in_loop, self._on_too_many_stuck)
        self._stop_requested: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None
        self._lost = asyncio.Event()
        self._stopping = False
        #: Why :meth:`serve` returned: ``"stopped"`` or ``"stuck"``.
        self.exit_reason = "stopped"

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self, timeout: float | None = None) -> None:
        """Connect, declare every queue and exchange, and start consuming.

        While the broker does not answer, retries with capped, jittered backoff, logging
        each attempt, for up to ``timeout`` seconds (None: until it answers), then raises
        :class:`~crew.ConnectionLostError`. A refused login or certificate raises
        :class:`~crew.AuthenticationError` at once; later reconnections retry it.
        Call it once: :meth:`serve` serves a started worker, or starts it first.
        """
        if self._loop is not None:
            # A second connection would consume the same queues and ack its deliveries on
            # the first one's channel: the broker closes it (406 unknown delivery tag).
            raise RuntimeError("this worker was started before: a worker starts once, and "
                               "serve() serves a started worker")
        self._loop = asyncio.get_running_loop()
        self._calls.start(self._loop)
        self._stop_requested = asyncio.Event()
        self._hurry = asyncio.Event()
        self._lost = asyncio.Event()
        context._bind(self)
        try:
            await self._connect(timeout)
        except BaseException:
            self._loop = None  # never connected: it may be started again
            raise

    async def _connect(self, timeout: float | None = None, *, reconnect: bool = False) -> None:
        connection = await connect_retrying(
            self._open, who="worker", timeout=timeout, retry_auth=reconnect,
            stop=self._stop_requested)
        self._connection = connection
        connection.closed.add_done_callback(partial(self._on_lost, connection, "connection"))
        # The broker closes the task channel alone on a consumer ack timeout or a bad publish
        # (406); the connection stays up and the worker would otherwise serve nothing.
        self._calls.channel.closed.add_done_callback(  # type: ignore[union-attr]  # by _setup
            partial(self._on_lost, connection, "task channel"))
        log.info("worker %s serving %s on %s (concurrency %d)", self.uuid,
                 ", ".join(sorted(self.tasks)), self.broker.safe_url, self.concurrency)

    async def _open(self) -> Connection:
        """One attempt: connect, declare, consume. A connection lost half-way is retried."""
        connection = await Connection.open(self.broker)
        try:
            await self._setup(connection)
        except BaseException:
            self._consumers.clear()
            await connection.close()
            raise
        return connection

    async def _setup(self, connection: Connection) -> None:
        channel = self._calls.channel = await connection.channel()
        # Per-channel (global) prefetch: all task consumers share the concurrency slots.
        await channel.qos(self.concurrency, global_qos=True)
        await channel.declare_exchange(protocol.EXPIRED_EXCHANGE, "headers")
        await channel.declare_exchange(protocol.CONTROL_EXCHANGE, "fanout")
        await channel.declare_exchange(protocol.PUBSUB_EXCHANGE, "topic")
        channel.on_return(self._calls.on_reply_returned)
        arguments = protocol.task_queue_arguments(self.max_priority)
        for name in self.tasks:
            queue = protocol.task_queue(name)
            try:
                await channel.declare_queue(queue, durable=True, arguments=arguments)
            except BrokerError as exc:
                if exc.code == NOT_FOUND:  # its node restarts: connect_retrying tries again
                    raise unavailable(exc, queue) from None
                raise BrokerError(
                    f"cannot declare {queue}: {exc.text}. It exists with other arguments; every "
                    f"worker of a task must use the same max_priority (this one: "
                    f"{self.max_priority}), or delete the queue", exc.code, exc.text) from None
        # Cancel notices get a channel of their own: the task channel's prefetch limit
        # holds back every delivery on it while jobs run. They are read up to now before
        # any call is taken, so that a notice sent while no worker ran still holds.
        self._cancel_feed = CancelFeed(connection, self._calls.on_cancel, self.uuid)
        await self._cancel_feed.start()
        for name, func in self.tasks.items():
            on_message = self._calls.consumer(name, func)
            self._consumers.append(await channel.consume(protocol.task_queue(name), on_message))

    async def serve(self) -> str:
        """Start (unless :meth:`start` did), serve until :meth:`request_stop` (or too many
        stuck threads), then stop.

        A lost connection or task channel is connected again, with backoff, as often as it
        takes. Returns :attr:`exit_reason`.
        """
        if self._loop is None:
            try:
                await self.start()
            except Stopped:
                return self.exit_reason  # stopped before the broker ever answered
        return await self._serve_started()

    async def _serve_started(self) -> str:
        stop, lost = self._stop_requested, self._lost
        try:
            while True:
                await _first_set(stop, lost)  # type: ignore[arg-type]  # set by start()
                if stop.is_set():  # type: ignore[union-attr]
                    break
                lost.clear()  # type: ignore[union-attr]
                # Forget the old connection first: closing it must not count as a new loss.
                old, self._connection = self._connection, None
                if old is not None:
                    await old.close()
                try:
                    await self._connect(reconnect=True)
                except Stopped:
                    break
        finally:
            await self.stop()
        return self.exit_reason

    def request_stop(self, grace: float | None = None) -> None:
        """Ask :meth:`serve` to stop; ``grace=0`` cuts a graceful stop under way short.

        Safe from any thread or signal handler.
        """
        self._call_in_loop(self._request_stop, grace)

    def _request_stop(self, grace: float | None = None) -> None:
        if grace is not None:
            self.grace = min(self.grace, grace)
            if grace == 0 and self._hurry is not None:
                self._hurry.set()
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, give running jobs ``grace`` seconds, requeue the rest, close."""
        if self._stopping:
            return
        self._stopping = self._calls.stopping = True
        grace = self.grace if grace is None else grace
        await self._cancel_consumers()
        self._calls.requeue_waiting()
        await self._wait_for_jobs(grace)
        self._calls.requeue_running()
        self._calls.close()
        if self._cancel_feed is not None:
            self._cancel_feed.close()
        if self._connection is not None:
            await self._connection.close()
        log.info("worker %s stopped", self.uuid)

    async def _cancel_consumers(self) -> None:
        channel = self._calls.channel
        if channel is not None and channel.is_open:
            for tag in self._consumers:
                try:
                    await channel.cancel(tag)
                except CrewError:
                    break
        self._consumers.clear()

    async def _wait_for_jobs(self, grace: float) -> None:
        """Wait until no job runs, for ``grace`` seconds at most, or until told to hurry."""
        idle, running = self._calls.idle, self._calls.serving
        if running and idle is not None and self._hurry is not None:
            log.info("waiting up to %.1f s for %d running job(s)", grace, running)
            waits = {asyncio.ensure_future(idle.wait()),
                     asyncio.ensure_future(self._hurry.wait())}
            await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()

    def _on_lost(self, connection: Connection, what: str,
                 fut: asyncio.Future[BaseException]) -> None:
        """The connection or the task channel closed under the worker: reconnect."""
        if self._stopping or connection is not self._connection or self._lost.is_set():
            return
        log.error("worker %s lost its broker %s: %s; reconnecting", self.uuid, what,
                  fut.result())
        self._calls.channel_lost()
        if self._cancel_feed is not None:
            self._cancel_feed.close()
        self._consumers.clear()
        self._lost.set()

    def _on_too_many_stuck(self) -> None:
        log.error("too many stuck job threads: worker %s drains and exits for a restart",
                  self.uuid)
        self.exit_reason = "stuck"
        self._request_stop()

    # --- pubsub and threads ------------------------------------------------------------

    def _publish_event(self, channel: str, body: bytes, encoding: str | None) -> None:
        task_channel = self._calls.channel
        if task_channel is None or not task_channel.is_open:
            log.warning("pubsub message on %r dropped: not connected", channel)
            return
        task_channel.publish(protocol.PUBSUB_EXCHANGE, channel, body, BasicProperties(
            content_type=protocol.MSGPACK, content_encoding=encoding, delivery_mode=1))

    def _call_in_loop(self, func: Callable[..., None], *args: Any) -> None:
        """Run ``func`` on the worker's loop: directly if already there, else thread-safely."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise ConnectionLostError("the worker is not running")
        if _running_loop() is loop:
            func(*args)
        else:
            loop.call_soon_threadsafe(func, *args)


async def _first_set(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def run(**settings: Any) -> None:
    """Parse the command line and serve the ``@Task`` registry until SIGINT or SIGTERM.

    Keyword arguments become ``context.settings``. See ``--help`` for the options.
    """
    from .cli import main

    main(tasks, settings)


def serve_in_thread(worker: Worker) -> threading.Thread:
    """Run ``worker`` on a loop of its own in a daemon thread (embedding and tests).

    Returns once the worker is consuming, or raises why it could not start. Stop it with
    ``worker.request_stop()`` and join the thread.
    """
    started = threading.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        try:
            await worker.start()
        except BaseException as exc:
            failure.append(exc)
            started.set()
            return
        started.set()
        await worker._serve_started()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="crew-worker",
                              daemon=True)
    thread.start()
    started.wait()
    if failure:
        thread.join()
        raise failure[0]
    return thread

