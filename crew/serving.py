"""Serving: the :class:`Worker`, which connects, consumes its task queues, reconnects and
stops (:func:`crew.worker.serve_in_thread` runs one in a thread of its own).

One asyncio loop owns the AMQP connection and never runs sync task code: jobs run in threads
(:mod:`crew.pool`), ``async def`` tasks as coroutines on the loop (they must not block it).
A call is acknowledged once its reply is published: a worker that dies mid-job leaves it to be
redelivered. Delivery to job is :mod:`crew.calls`, job to reply :mod:`crew.replies`, what
``crew status`` sees :mod:`crew.presence`; tasks see the worker through a
:class:`~crew.jobs.Scope`; the command line is :mod:`crew.worker`."""

from __future__ import annotations

import asyncio
import logging
import uuid as _uuid
from functools import partial
from typing import Any, Callable, Mapping

from pika.spec import BasicProperties

from . import protocol, validation
from .amqp import Connection
from .connecting import Nodes, Stopped, connect_retrying
from .calls import CallHandler
from .context import Publisher, context
from .exceptions import ConnectionLostError
from .jobs import Scope
from .loops import first_set, running_loop
from .observing import for_worker
from .figures import Figures
from .presence import Presence
from .registry import Settings, TaskFunction, tasks
from .session import Session
from .settings import (DEFAULT_GRACE, DEFAULT_MAX_MEMORY, DEFAULT_MAX_STUCK, BrokerSettings,
                       BrokerSpec, check_worker_limits)

__all__ = ["Worker"]

# The name the worker's lifecycle logged under before it moved here from crew.worker.
log = logging.getLogger("crew.worker")

#: ``tasks`` is also a parameter name of Worker; this alias reaches the module's registry.
_default_registry = tasks


class Worker:
    """Serves tasks from their queues until stopped.

    ``tasks``: a mapping of names to functions (default: everything ``@Task`` registered).
    ``broker``: a :class:`~crew.settings.BrokerSettings` or URL(s) (default ``$CREW_URL``).
    ``concurrency``: jobs run at once; the calls held follow it, so waiting calls stay in the
    broker, in priority order, for any worker to take. ``queue_type``: ``"classic"`` or
    ``"quorum"`` task queues (default ``$CREW_QUEUE_TYPE``, else classic). ``max_priority``:
    classic queues' ``x-max-priority`` (as every other worker's). ``settings``: what jobs see
    as ``context.settings``. ``max_stuck``: stuck job threads tolerated before the worker drains
    and exits (see :mod:`crew.pool`). ``grace``: seconds running jobs get on a graceful stop.
    ``max_memory``: bytes the calls being served may hold undecoded, inflated and decoded
    (see :mod:`crew.memory`); a call that could need more alone is refused with
    :class:`~crew.MessageTooLargeError`. ``metrics``, ``traces``: :mod:`crew.observing`.
    """

    # longer than 40 lines because it sets every attribute of the worker in one place
    def __init__(self, tasks: Mapping[str, TaskFunction] | None = None, *,
                 broker: BrokerSpec = None, concurrency: int = 1,
                 max_priority: int = protocol.DEFAULT_QUEUE_MAX_PRIORITY,
                 settings: Mapping[str, Any] | None = None, options: Any = None,
                 max_stuck: int = DEFAULT_MAX_STUCK, grace: float = DEFAULT_GRACE,
                 max_memory: int = DEFAULT_MAX_MEMORY, queue_type: str | None = None,
                 metrics: bool | None = None, traces: object = None) -> None:
        registry = _default_registry if tasks is None else tasks
        if not registry:
            raise ValueError("a worker needs at least one task")
        for name in registry:
            validation.validate_task_name(name)
        check_worker_limits(concurrency, max_stuck, grace, max_memory)
        self.tasks = dict(registry)
        self.broker = BrokerSettings.given(broker)
        self._nodes = Nodes(self.broker)  # which node each connection attempt goes to
        self.max_priority = validation.validate_max_priority(max_priority)
        self.queue_type = protocol.queue_type(queue_type)
        self.concurrency, self.max_stuck, self.grace = concurrency, max_stuck, grace
        self.max_memory = max_memory
        self.uuid = _uuid.uuid4().hex
        self.settings = Settings(**dict(settings or {}), uuid=self.uuid, options=options)
        self.pubsub = Publisher(partial(self._call_in_loop, self._publish_event))
        #: What task code sees: ``context.settings`` and ``context.pubsub``.
        self._scope = Scope(self.settings, self.pubsub)
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The current connection, with its task channel, cancel feed and consumers.
        self._session: Session | None = None
        self._calls = CallHandler(
            self._scope, concurrency=concurrency, worker_id=self.uuid, max_memory=max_memory,
            max_stuck=max_stuck, call_in_loop=self._call_in_loop,
            on_too_many_stuck=self._on_too_many_stuck)
        figures = self._calls.replies.figures = Figures()
        self._presence = Presence(self._calls, figures, self.uuid, self.tasks,
                                  self.queue_type, self.max_priority, concurrency, max_stuck)
        observer = self._calls.replies.observer = for_worker(  # None: metrics, traces off
            metrics, traces, self._calls.gauges, concurrency)
        self._served = observer.wrap(self.tasks) if observer else self.tasks
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
        context._bind(self._scope)
        try:
            await self._connect(timeout)
        except BaseException:
            self._loop = None  # never connected: it may be started again
            raise

    async def _connect(self, timeout: float | None = None, *, reconnect: bool = False) -> None:
        session = await connect_retrying(
            self._open, who="worker", timeout=timeout, retry_auth=reconnect,
            stop=self._stop_requested)
        self._session = session
        session.connection.closed.add_done_callback(
            partial(self._on_lost, session, "connection"))
        # The broker closes the task channel alone on a consumer ack timeout or a bad publish
        # (406); the connection stays up and the worker would otherwise serve nothing.
        session.channel.closed.add_done_callback(  # type: ignore[union-attr]  # by open()
            partial(self._on_lost, session, "task channel"))
        log.info("worker %s serving %s on %s (concurrency %d, %s)", self.uuid, ", ".join(sorted(
            self.tasks)), session.connection.settings.safe_url, self.concurrency, self.queue_type)

    async def _open(self) -> Session:
        """One attempt: connect, declare, consume. A connection lost half-way is retried."""
        return await Session.open(self._nodes.next(), self._calls, self._served,
                                  max_priority=self.max_priority, worker_id=self.uuid,
                                  queue_type=self.queue_type, presence=self._presence)

    @property
    def _connection(self) -> Connection | None:
        return self._session.connection if self._session is not None else None

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
                await first_set(stop, lost)  # type: ignore[arg-type]  # set by start()
                if stop.is_set():  # type: ignore[union-attr]
                    break
                lost.clear()
                # Forget the old connection first: closing it must not count as a new loss.
                old, self._session = self._session, None
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
        self._stopping = True
        self._calls.begin_stop()
        grace = self.grace if grace is None else grace
        await self._cancel_consumers()
        self._calls.requeue_waiting()
        await self._wait_for_jobs(grace)
        self._calls.requeue_running()
        self._calls.close()
        self._presence.farewell()  # before the connection closes: dashboards drop it now
        if self._session is not None:
            await self._session.close()
        log.info("worker %s stopped", self.uuid)

    async def _cancel_consumers(self) -> None:
        if self._session is not None:
            await self._session.cancel_consumers()

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

    def _on_lost(self, session: Session, what: str,
                 fut: asyncio.Future[BaseException]) -> None:
        """The connection or the task channel closed under the worker: reconnect."""
        if self._stopping or session is not self._session or self._lost.is_set():
            return
        log.error("worker %s lost its broker %s: %s; reconnecting", self.uuid, what,
                  fut.result())
        self._calls.channel_lost()
        session.lost()
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
        if running_loop() is loop:
            func(*args)
        else:
            loop.call_soon_threadsafe(func, *args)
