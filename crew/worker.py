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
in threads (:mod:`crew.jobs`), ``async def`` tasks as coroutines on the loop (they must not
block it). Each call is acknowledged only once its reply is published, so a worker that dies
mid-job leaves the call to be redelivered.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import uuid as _uuid
from functools import partial
from typing import Any, Callable, Mapping

from pika.spec import Basic, BasicProperties

from . import codec, protocol
from .amqp import Channel, Connection, Stopped, connect_retrying
from .context import context
from .exceptions import (BrokerError, ConnectionLostError,
                         CrewError, EncodeError, JobKilled)
from .jobs import Job, JobThreads, Reply
from .registry import Settings, Task, TaskFunction, TaskRegistry, tasks
from .settings import BrokerSettings

__all__ = ["Task", "TaskRegistry", "Worker", "context", "run", "serve_in_thread", "tasks"]

log = logging.getLogger(__name__)

#: ``tasks`` is also a parameter name of Worker; this alias reaches the module's registry.
_default_registry = tasks

#: Seconds after an interruption at which a job thread that has not returned counts as stuck.
STUCK_AFTER = 1.0
#: Default number of stuck job threads a worker tolerates before it drains and exits.
DEFAULT_MAX_STUCK = 4
#: Cancel notices for calls not (yet) seen that a worker remembers at most.
MAX_REMEMBERED_CANCELS = 100_000
#: Default seconds running jobs get to finish on a graceful stop.
DEFAULT_GRACE = 30.0


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
    and exits (see :mod:`crew.jobs`). ``grace``: seconds running jobs get on a graceful stop.
    """

    def __init__(self, tasks: Mapping[str, TaskFunction] | None = None, *,
                 broker: BrokerSettings | str | None = None, concurrency: int = 1,
                 max_priority: int = protocol.DEFAULT_QUEUE_MAX_PRIORITY,
                 settings: Mapping[str, Any] | None = None, options: Any = None,
                 max_stuck: int = DEFAULT_MAX_STUCK, grace: float = DEFAULT_GRACE) -> None:
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
        self.tasks = dict(registry)
        self.broker = (broker if isinstance(broker, BrokerSettings)
                       else BrokerSettings.from_url(broker))
        self.concurrency = concurrency
        self.max_priority = protocol.validate_max_priority(max_priority)
        self.max_stuck = max_stuck
        self.grace = grace
        self.uuid = _uuid.uuid4().hex
        self.settings = Settings(**dict(settings or {}), uuid=self.uuid, options=options)
        self.pubsub = Publisher(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: Connection | None = None
        self._channel: Channel | None = None
        self._consumers: list[str] = []
        self._jobs: dict[tuple[str, str], Job] = {}
        self._cancelled: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._threads = JobThreads(concurrency, f"crew-job-{self.uuid[:6]}", self._job_done)
        self._finished: list[tuple[Job, Reply]] = []
        self._finished_lock = threading.Lock()
        self._finished_scheduled = False
        self._idle: asyncio.Event | None = None
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
        """
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop_requested = asyncio.Event()
        self._hurry = asyncio.Event()
        self._lost = asyncio.Event()
        context._bind(self)
        await self._connect(timeout)

    async def _connect(self, timeout: float | None = None, *, reconnect: bool = False) -> None:
        connection = await connect_retrying(
            self._open, who="worker", timeout=timeout, retry_auth=reconnect,
            stop=self._stop_requested)
        self._connection = connection
        connection.closed.add_done_callback(partial(self._on_lost, connection, "connection"))
        # The broker closes the task channel alone on a consumer ack timeout or a bad publish
        # (406); the connection stays up and the worker would otherwise serve nothing.
        self._channel.closed.add_done_callback(  # type: ignore[union-attr]  # set by _setup
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
        channel = self._channel = await connection.channel()
        # Per-channel (global) prefetch: all task consumers share the concurrency slots.
        await channel.qos(self.concurrency, global_qos=True)
        await channel.declare_exchange(protocol.EXPIRED_EXCHANGE, "headers")
        await channel.declare_exchange(protocol.CONTROL_EXCHANGE, "fanout")
        await channel.declare_exchange(protocol.PUBSUB_EXCHANGE, "topic")
        channel.on_return(self._on_reply_returned)
        arguments = protocol.task_queue_arguments(self.max_priority)
        for name in self.tasks:
            queue = protocol.task_queue(name)
            try:
                await channel.declare_queue(queue, durable=True, arguments=arguments)
            except BrokerError as exc:
                raise BrokerError(
                    f"cannot declare {queue}: {exc.text}. It exists with other arguments; every "
                    f"worker of a task must use the same max_priority (this one: "
                    f"{self.max_priority}), or delete the queue", exc.code, exc.text) from None
        # Control messages get a channel of their own: the task channel's prefetch limit
        # holds back every delivery on it, auto-acked ones included, while jobs run.
        control_channel = await connection.channel()
        control = await control_channel.declare_queue("", exclusive=True, auto_delete=True)
        await control_channel.bind(control, protocol.CONTROL_EXCHANGE)
        await control_channel.consume(control, self._on_control, auto_ack=True)
        for name, func in self.tasks.items():
            on_message = self._make_consumer(name, func)
            self._consumers.append(await channel.consume(protocol.task_queue(name), on_message))

    async def serve(self) -> str:
        """Start, serve until :meth:`request_stop` (or too many stuck threads), then stop.

        A lost connection or task channel is connected again, with backoff, as often as it
        takes. Returns :attr:`exit_reason`.
        """
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
        self._stopping = True
        grace = self.grace if grace is None else grace
        channel = self._channel
        if channel is not None and channel.is_open:
            for tag in self._consumers:
                try:
                    await channel.cancel(tag)
                except CrewError:
                    break
        self._consumers.clear()
        for job in self._threads.drain_pending():
            self._requeue(job)
        if self._jobs and self._idle is not None and self._hurry is not None:
            log.info("waiting up to %.1f s for %d running job(s)", grace, len(self._jobs))
            waits = {asyncio.ensure_future(self._idle.wait()),
                     asyncio.ensure_future(self._hurry.wait())}
            await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
        for job in list(self._jobs.values()):
            log.warning("job %s of task %s did not finish within the grace period; requeued",
                        job.correlation_id, job.task)
            self._abandon(job)
            self._requeue(job)
        self._threads.close()
        for handle in self._cancelled.values():
            handle.cancel()
        self._cancelled.clear()
        if self._connection is not None:
            await self._connection.close()
        log.info("worker %s stopped", self.uuid)

    def _on_lost(self, connection: Connection, what: str,
                 fut: asyncio.Future[BaseException]) -> None:
        """The connection or the task channel closed under the worker: reconnect."""
        if self._stopping or connection is not self._connection or self._lost.is_set():
            return
        log.error("worker %s lost its broker %s: %s; reconnecting", self.uuid, what,
                  fut.result())
        # The broker puts every unacknowledged call back in its queue; the jobs serving them
        # are stopped, as their delivery tags die with the channel.
        for job in list(self._jobs.values()):
            self._abandon(job)
            self._forget(job)
        for job in self._threads.drain_pending():
            job.watch.abandon(JobKilled)
            self._forget(job)
        self._consumers.clear()
        self._channel = None
        self._lost.set()

    # --- receiving calls ---------------------------------------------------------------

    def _make_consumer(self, name: str, func: TaskFunction) -> Callable[..., None]:
        is_async = inspect.iscoroutinefunction(func)

        def on_message(_ch: Any, method: Basic.Deliver, props: BasicProperties,
                       body: bytes) -> None:
            self._on_call(name, func, is_async, method, props, body)

        return on_message

    def _on_call(self, name: str, func: TaskFunction, is_async: bool, method: Basic.Deliver,
                 props: BasicProperties, body: bytes) -> None:
        # Anyone who may publish to the vhost chooses what arrives here. An exception that
        # escapes a pika callback closes the connection and the call is redelivered, to
        # this worker or the next, forever: every call must end in a reply or an ack.
        channel = self._channel
        if channel is None:
            return
        if self._stopping:  # delivered before the consumer cancel took effect
            channel.reject(method.delivery_tag, requeue=True)
            return
        reply_to, correlation_id = props.reply_to, props.correlation_id
        if not reply_to or not correlation_id:
            log.warning("call to %s without reply_to or correlation_id dropped", name)
            channel.ack(method.delivery_tag)
            return
        key = (reply_to, correlation_id)
        if key in self._cancelled:
            log.info("call %r to %s was cancelled before it started; dropped",
                     correlation_id, name)
            self._cancelled.pop(key).cancel()
            channel.ack(method.delivery_tag)
            return
        if key in self._jobs:
            # Only a replayed or forged copy meets its original here (a redelivered call
            # comes after the worker forgot the old delivery); replying to it would answer
            # the real caller's call with the copy's outcome.
            log.warning("call %r to %s is a copy of a running call; dropped", correlation_id,
                        name)
            channel.ack(method.delivery_tag)
            return
        try:
            job, refusal = Job.from_delivery(self, name, func, method.delivery_tag, props, body)
        except Exception:  # a case the checks missed: still no redelivery loop
            log.exception("call %r to %s could not be read; dropped", correlation_id, name)
            channel.ack(method.delivery_tag)
            return
        if refusal is not None:
            log.warning("call %r to %s refused: %s", correlation_id, name, refusal)
            self._answer(job, job.error_reply(refusal, with_traceback=False))
            return
        remaining = job.deadline - time.monotonic()
        if remaining <= 0:
            self._answer(job, job.encode_reply(protocol.STATUS_EXPIRED, {
                "type": "ExpirationError", "message": "deadline passed before a worker "
                f"started the call ({-remaining:.3f} s ago)", "traceback": ""}))
            return
        self._jobs[key] = job
        self._idle.clear()  # type: ignore[union-attr]
        job.timer = self._loop.call_later(remaining, self._on_deadline, job)  # type: ignore
        if is_async:
            job.coroutine = self._loop.create_task(self._run_coroutine(job))  # type: ignore
        else:
            self._threads.submit(job)

    async def _run_coroutine(self, job: Job) -> None:
        try:
            reply = await job.run_async()
        except asyncio.CancelledError:
            return  # the loop answered (deadline) or dropped (cancel) the call already
        self._job_done(job, reply)

    def _on_control(self, _ch: Any, _method: Basic.Deliver, props: BasicProperties,
                    _body: bytes) -> None:
        if props.type != protocol.CANCEL_TYPE or not props.correlation_id or not props.reply_to:
            log.warning("control message of unknown type %r ignored", props.type)
            return
        key = (props.reply_to, props.correlation_id)
        job = self._jobs.get(key)
        if job is not None:
            log.info("call %s to %s cancelled by its caller; job stopped",
                     job.correlation_id, job.task)
            self._abandon(job)
            self._forget(job)
            self._channel.ack(job.delivery_tag)  # type: ignore[union-attr]
            return
        # Not here (yet): remember it until its deadline, in case it is delivered to us.
        deadline_ms = (props.headers or {}).get(protocol.DEADLINE_HEADER)
        delay = ((deadline_ms - protocol.now_ms()) / 1000 if isinstance(deadline_ms, int)
                 else protocol.MAX_EXPIRATION)
        if delay <= 0 or key in self._cancelled:
            return
        if len(self._cancelled) >= MAX_REMEMBERED_CANCELS:
            # A flood of cancel notices (forged ones need no crew-deadline) must not grow
            # without bound; the oldest is forgotten and its call may then still run.
            oldest = next(iter(self._cancelled))
            self._cancelled.pop(oldest).cancel()
            log.warning("more than %d cancel notices remembered; forgetting the oldest",
                        MAX_REMEMBERED_CANCELS)
        self._cancelled[key] = self._loop.call_later(  # type: ignore[union-attr]
            delay, self._cancelled.pop, key, None)

    # --- ending jobs -------------------------------------------------------------------

    def _job_done(self, job: Job, reply: Reply) -> None:
        """A job finished (called from its thread or coroutine): queue its reply for the loop.

        Replies finished while the loop is busy go out in one batch, so a busy worker wakes
        its loop once per batch rather than once per job.
        """
        with self._finished_lock:
            self._finished.append((job, reply))
            if self._finished_scheduled:
                return
            self._finished_scheduled = True
        try:
            self._call_in_loop(self._answer_finished)
        except (ConnectionLostError, RuntimeError):  # the worker stopped and its loop closed
            log.info("job %r of task %s ended after the worker stopped; not acknowledged, "
                     "the broker redelivers it", job.correlation_id, job.task)

    def _answer_finished(self) -> None:
        with self._finished_lock:
            batch, self._finished = self._finished, []
            self._finished_scheduled = False
        for job, reply in batch:
            self._answer(job, reply)

    def _on_deadline(self, job: Job) -> None:
        if job.answered:
            return
        state = self._abandon(job)
        if state == "ended":
            return  # finished just now; its reply is already on its way to the loop
        if state == "pending":
            reply = job.encode_reply(protocol.STATUS_EXPIRED, {
                "type": "ExpirationError", "message": "deadline passed before a job thread "
                "was free", "traceback": ""})
        else:
            log.warning("job %s of task %s interrupted at its deadline", job.correlation_id,
                        job.task)
            reply = job.error_reply(JobKilled("the job ran past its deadline"),
                                    status=protocol.STATUS_TIMEOUT, with_traceback=False)
        self._answer(job, reply)

    def _abandon(self, job: Job) -> str:
        """Stop ``job`` wherever it is; return the state it was in."""
        if job.coroutine is not None:
            job.coroutine.cancel()
            return "running"
        state = job.watch.abandon(JobKilled)
        if state == "running" and job.thread is not None:
            thread = job.thread
            self._threads.replace(thread)
            self._loop.call_later(STUCK_AFTER, self._check_stuck, job, thread)  # type: ignore
        return state

    def _check_stuck(self, job: Job, thread: threading.Thread) -> None:
        if thread not in self._threads.stuck:
            return
        count = len(self._threads.stuck)
        log.error("job thread %s (task %s, call %s) is stuck %.0f s after its interruption; "
                  "%d stuck thread(s), limit %d", thread.name, job.task, job.correlation_id,
                  STUCK_AFTER, count, self.max_stuck)
        if count > self.max_stuck and not self._stopping:
            log.error("too many stuck job threads: worker %s drains and exits for a restart",
                      self.uuid)
            self.exit_reason = "stuck"
            self._request_stop()

    def _answer(self, job: Job, reply: Reply) -> None:
        """Publish ``reply`` and acknowledge the call, once per job."""
        if job.answered:
            return
        channel = self._channel
        if channel is None or not channel.is_open:
            self._forget(job)
            return  # the call will be redelivered by the broker
        try:
            self._publish_reply(channel, job, reply, job.headers)
        except Exception as exc:  # pika cannot encode a header value the task set
            log.warning("reply to call %r could not be sent: %s", job.correlation_id, exc)
            error = EncodeError(f"the reply's headers cannot be sent: {exc}")
            self._publish_reply(channel, job, job.error_reply(error, with_traceback=False), {})
        channel.ack(job.delivery_tag)
        self._forget(job)

    def _publish_reply(self, channel: Channel, job: Job, reply: Reply,
                       headers: dict[str, Any]) -> None:
        properties = BasicProperties(
            correlation_id=job.correlation_id, content_type=job.reply_type,
            content_encoding=reply.encoding,
            headers={**headers, protocol.STATUS_HEADER: reply.status}, delivery_mode=1)
        # mandatory: if the caller's queue is gone, the broker returns the reply to us
        # (logged in _on_reply_returned) instead of dropping it unseen.
        channel.publish("", job.reply_to, reply.body, properties, mandatory=True)

    def _forget(self, job: Job) -> None:
        job.answered = True
        if job.timer is not None:
            job.timer.cancel()
        self._jobs.pop(job.key, None)
        if not self._jobs and self._idle is not None:
            self._idle.set()

    def _requeue(self, job: Job) -> None:
        if job.answered:
            return
        job.watch.abandon(JobKilled)
        if self._channel is not None:
            self._channel.reject(job.delivery_tag, requeue=True)
        self._forget(job)

    def _on_reply_returned(self, _ch: Any, method: Basic.Return, props: BasicProperties,
                           _body: bytes) -> None:
        log.warning("reply to call %r dropped: the caller's queue %r is gone (%s %s)",
                    props.correlation_id, method.routing_key, method.reply_code,
                    method.reply_text)

    # --- pubsub and threads ------------------------------------------------------------

    def _publish_event(self, channel: str, body: bytes, encoding: str | None) -> None:
        if self._channel is None or not self._channel.is_open:
            log.warning("pubsub message on %r dropped: not connected", channel)
            return
        self._channel.publish(protocol.PUBSUB_EXCHANGE, channel, body, BasicProperties(
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

