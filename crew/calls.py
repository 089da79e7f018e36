"""The call path of a worker: from a delivered call to its reply and acknowledgement.

:class:`CallHandler` takes each delivery off a task queue, checks it, starts its job (in a
job thread of :mod:`crew.pool`, or as a coroutine for ``async`` tasks), arms a loop timer
for its deadline and ends the call exactly once: reply then ack, or requeue on a graceful
stop, or drop (cancelled by its caller, or its channel lost). It also remembers cancel
notices for calls not delivered yet (:mod:`crew.cancels` reads them). docs/PROTOCOL.md,
section 6, is this module in prose.

Everything here runs on the worker's loop, except :meth:`CallHandler._thread_done` and
:meth:`CallHandler._job_done`, which job threads call. A job thread whose job is the only one
being served sends the reply and the acknowledgement itself, without waking the loop (see
:meth:`~CallHandler._thread_done`); the loop forgets the call the next time it runs. The
job's :class:`~crew.threads.Interruptible` decides who answers a call that the loop gives up
on just as it ends: once the job has ended, its thread answers, and the loop leaves it be.
The lifecycle (connecting, reconnecting, stopping) stays in
:mod:`crew.worker`: the :class:`~crew.worker.Worker` owns one handler for its whole life, as
job threads and remembered cancel notices outlive a reconnection, and tells it which task
channel is current.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from pika.spec import Basic, BasicProperties

from . import codec, protocol
from .amqp import Channel
from .cancels import Key, Remembered
from .exceptions import (ConnectionLostError, CrewError, EncodeError, JobKilled,
                         MessageTooLargeError)
from .jobs import Job, Reply
from .memory import MemoryGate
from .pool import JobThreads
from .registry import TaskFunction

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger(__name__)

#: Seconds after an interruption at which a job thread that has not returned counts as stuck.
STUCK_AFTER = 1.0


class CallHandler:
    """Serves the calls delivered to one worker and ends each exactly once.

    ``call_in_loop(func, *args)`` runs ``func`` on the worker's loop from any thread;
    ``on_too_many_stuck()`` is called (on the loop) once more than ``worker.max_stuck`` job
    threads are stuck. The worker sets :attr:`channel` and :attr:`stopping`.
    """

    def __init__(self, worker: "Worker", call_in_loop: Callable[..., None],
                 on_too_many_stuck: Callable[[], None]) -> None:
        self._worker = worker
        self._call_in_loop = call_in_loop
        self._on_too_many_stuck = on_too_many_stuck
        #: The task channel the calls came in on; None while the worker is disconnected.
        self.channel: Channel | None = None
        #: Set once the worker stops: calls still delivered go back to their queue.
        self.stopping = False
        #: Set while no call is being served (created by :meth:`start`).
        self.idle: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: dict[tuple[str, str], Job] = {}
        #: Cancel notices of calls not delivered (yet).
        self._cancelled = Remembered()
        self._threads = JobThreads(worker.concurrency, f"crew-job-{worker.uuid[:6]}",
                                   self._thread_done)
        self._finished: list[tuple[Job, Reply]] = []
        #: Jobs whose thread sent the reply and ack itself, for the loop to forget.
        self._sent: list[Job] = []
        self._finished_lock = threading.Lock()
        self._finished_scheduled = False
        #: What the calls being served may hold decoded, against the worker's max_memory.
        self._memory = MemoryGate(worker.max_memory)
        #: Set while the channel's prefetch is lowered because calls wait for memory.
        self._holding_back = False
        self._qos_tasks: set[asyncio.Task[None]] = set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve calls on ``loop``, the loop that owns the worker's connection."""
        self._loop = loop
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def serving(self) -> int:
        """How many calls are being served (running, or waiting for a job thread), once
        the calls that job threads answered themselves are forgotten. On the loop only."""
        self._settle_sent()
        return len(self._jobs)

    # --- receiving calls ---------------------------------------------------------------

    def consumer(self, name: str, func: TaskFunction) -> Callable[..., None]:
        """The ``on_message`` callback for the queue of task ``name``."""
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
        self._settle_sent()
        channel = self.channel
        if channel is None or self._turned_away(channel, name, method, props):
            return
        correlation_id = props.correlation_id
        try:
            job, refusal = Job.from_delivery(self._worker, name, func, method.delivery_tag,
                                             props, body)
        except Exception:  # a case the checks missed: still no redelivery loop
            log.exception("call %r to %s could not be read; dropped", correlation_id, name)
            channel.ack(method.delivery_tag)
            return
        job.channel = channel
        if refusal is not None:
            log.warning("call %r to %s refused: %s", correlation_id, name, refusal)
            self._answer(job, job.error_reply(refusal, with_traceback=False))
            return
        self._begin(job, is_async)

    def _turned_away(self, channel: Channel, name: str, method: Basic.Deliver,
                     props: BasicProperties) -> bool:
        """Requeue or drop a delivery that must not run, before it is read; True if it was."""
        if self.stopping:  # delivered before the consumer cancel took effect
            channel.reject(method.delivery_tag, requeue=True)
            return True
        reply_to, correlation_id = props.reply_to, props.correlation_id
        if not reply_to or not correlation_id:
            log.warning("call to %s without reply_to or correlation_id dropped", name)
            channel.ack(method.delivery_tag)
            return True
        key = (reply_to, correlation_id)
        if self._cancelled.take(key):
            log.info("call %r to %s was cancelled before it started; dropped",
                     correlation_id, name)
            channel.ack(method.delivery_tag)
            return True
        if key in self._jobs:
            # Only a replayed or forged copy meets its original here (a redelivered call
            # comes after the worker forgot the old delivery); replying to it would answer
            # the real caller's call with the copy's outcome.
            log.warning("call %r to %s is a copy of a running call; dropped", correlation_id,
                        name)
            channel.ack(method.delivery_tag)
            return True
        return False

    def _begin(self, job: Job, is_async: bool) -> None:
        """Start a checked call's job, unless its deadline has passed already."""
        remaining = job.deadline - time.monotonic()
        if remaining <= 0:
            self._answer(job, job.encode_reply(protocol.STATUS_EXPIRED, {
                "type": "ExpirationError", "message": "deadline passed before a worker "
                f"started the call ({-remaining:.3f} s ago)", "traceback": ""}))
            return
        cost = codec.decode_memory(job.body, job.content_type, job.content_encoding)
        if cost > self._memory.limit:
            refusal = MessageTooLargeError(
                f"decoding this call may take up to {cost >> 20} MiB, more than this worker's "
                f"memory ceiling of {self._memory.limit >> 20} MiB (--max-memory)")
            log.warning("call %r to %s refused: %s", job.correlation_id, job.task, refusal)
            self._answer(job, job.error_reply(refusal, with_traceback=False))
            return
        self._jobs[job.key] = job
        self.idle.clear()  # type: ignore[union-attr]  # set by start()
        job.timer = self._loop.call_later(remaining, self._on_deadline, job)  # type: ignore
        if not self._memory.admit(job.key, cost, partial(self._start, job, is_async)):
            self._hold_back_deliveries()

    def _hold_back_deliveries(self) -> None:
        """Calls wait for memory: lower the channel's prefetch to the calls running, so that
        the broker keeps the next calls for other workers (or for this one, once the waiting
        calls have started) instead of delivering them here to wait too."""
        if not self._holding_back and self.channel is not None:
            self._holding_back = True
            self._set_prefetch(max(1, self._memory.started))

    def _resume_deliveries(self) -> None:
        """No call waits for memory any more: the worker's own prefetch again."""
        if self._holding_back and not self._memory.waiting and self.channel is not None:
            self._holding_back = False
            self._set_prefetch(self._worker.concurrency)

    def _set_prefetch(self, count: int) -> None:
        channel = self.channel

        async def qos() -> None:
            try:
                await channel.qos(count, global_qos=True)  # type: ignore[union-attr]
            except CrewError:  # the channel closed: a new one gets the worker's prefetch
                pass

        # Issued in order on one channel, so the last one set wins.
        task = self._loop.create_task(qos())  # type: ignore[union-attr]
        self._qos_tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._qos_tasks.discard)

    def _start(self, job: Job, is_async: bool) -> None:
        """Run a call that has its memory reserved: in a job thread, or as a coroutine."""
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

    def on_cancel(self, key: Key, deadline_ms: int | None) -> None:
        """A caller cancelled its call ``key``: stop its job here, or remember the notice
        until ``deadline_ms`` in case the call is delivered to this worker later."""
        self._settle_sent()
        job = self._jobs.get(key)
        if job is None:
            self._cancelled.add(key, deadline_ms)
            return
        if self._abandon(job) == "ended":
            return  # it ended just now: its thread answers it
        log.info("call %s to %s cancelled by its caller; job stopped", job.correlation_id,
                 job.task)
        self._forget(job)
        self.channel.ack(job.delivery_tag)  # type: ignore[union-attr]

    # --- ending jobs -------------------------------------------------------------------

    def _thread_done(self, job: Job, reply: Reply) -> None:
        """A job thread's job ended (called in that thread): answer it from here if it is the
        only call being served, else as :meth:`_job_done`.

        Alone, the reply and the acknowledgement leave at once from this thread, and the loop
        is not woken: waking it (its self-pipe, a return from ``epoll``, the GIL handed over
        twice) cost a quarter of the worker's CPU per sequential call, and made the reply
        wait for the loop. The loop forgets the call the next time it runs for any reason
        (:meth:`_settle_sent`); only a stop, which waits for it, wakes the loop. With other
        calls under way the loop is busy anyway, and answering them in batches is cheaper.
        """
        if self._alone() and self._send_now(job, reply):
            with self._finished_lock:
                self._sent.append(job)
                wake = self.stopping and not self._finished_scheduled
                if wake:
                    self._finished_scheduled = True
            if wake:
                self._wake_loop(job)
            return
        self._job_done(job, reply)

    def _alone(self) -> bool:
        """Whether the job that just ended (in the calling thread) is the only call served."""
        return len(self._jobs) == 1

    def _send_now(self, job: Job, reply: Reply) -> bool:
        """Publish ``reply`` and acknowledge the call from the current thread; False, and
        nothing sent, if the connection cannot (then the loop must)."""
        channel = job.channel
        if channel is None or channel is not self.channel:
            return False  # the channel it came on is gone, and the call with it
        try:
            return channel.publish_and_ack_now(
                "", job.reply_to, reply.body, self._reply_properties(job, reply, job.headers),
                mandatory=True, delivery_tag=job.delivery_tag)
        except Exception:  # pika cannot encode a header the task set: the loop's path says so
            return False

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
        self._wake_loop(job)

    def _wake_loop(self, job: Job) -> None:
        """Have the loop run :meth:`_answer_finished`."""
        try:
            self._call_in_loop(self._answer_finished)
        except (ConnectionLostError, RuntimeError):  # the worker stopped and its loop closed
            log.info("job %r of task %s ended after the worker stopped; not acknowledged, "
                     "the broker redelivers it", job.correlation_id, job.task)

    def _answer_finished(self) -> None:
        with self._finished_lock:
            batch, self._finished = self._finished, []
            sent, self._sent = self._sent, []
            self._finished_scheduled = False
        for job in sent:
            self._forget(job)
        for job, reply in batch:
            self._answer(job, reply)
        if self.channel is not None:
            # The batch leaves now rather than after one more poll of the selector; what
            # other callbacks write later in this loop iteration leaves at its end.
            self.channel.flush()

    def _settle_sent(self) -> None:
        """Forget the calls that job threads answered themselves (:meth:`_thread_done`).

        Run first wherever the loop reads which calls are being served.
        """
        if self._sent:
            with self._finished_lock:
                sent, self._sent = self._sent, []
            for job in sent:
                self._forget(job)

    def _on_deadline(self, job: Job) -> None:
        if job.answered:
            return
        state = self._abandon(job)
        if state == "ended":
            return  # it ended just now: its thread answers it
        if state == "pending":
            waited_for = ("memory" if self._memory.is_waiting(job.key)
                          else "a job thread")
            reply = job.encode_reply(protocol.STATUS_EXPIRED, {
                "type": "ExpirationError", "message": f"deadline passed before {waited_for} "
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
        count, limit = len(self._threads.stuck), self._worker.max_stuck
        log.error("job thread %s (task %s, call %s) is stuck %.0f s after its interruption; "
                  "%d stuck thread(s), limit %d", thread.name, job.task, job.correlation_id,
                  STUCK_AFTER, count, limit)
        if count > limit and not self.stopping:
            self._on_too_many_stuck()

    def _answer(self, job: Job, reply: Reply) -> None:
        """Publish ``reply`` and acknowledge the call, once per job."""
        if job.answered:
            return
        channel = self.channel
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
        # mandatory: if the caller's queue is gone, the broker returns the reply to us
        # (logged in on_reply_returned) instead of dropping it unseen.
        channel.publish("", job.reply_to, reply.body,
                        self._reply_properties(job, reply, headers), mandatory=True)

    @staticmethod
    def _reply_properties(job: Job, reply: Reply, headers: dict[str, Any]) -> BasicProperties:
        if headers:
            headers = _sendable(job, headers)
        return BasicProperties(
            correlation_id=job.correlation_id, content_type=job.reply_type,
            content_encoding=reply.encoding,
            headers={**headers, protocol.STATUS_HEADER: reply.status}, delivery_mode=1)

    def _forget(self, job: Job) -> None:
        job.answered = True
        if job.timer is not None:
            job.timer.cancel()
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]
            self._memory.release(job.key)  # may start calls that waited for memory
            self._resume_deliveries()
        if not self._jobs and self.idle is not None:
            self.idle.set()

    def _requeue(self, job: Job) -> None:
        if job.answered or job.watch.abandon(JobKilled) == "ended":
            return  # answered, or its thread is answering it
        if self.channel is not None:
            self.channel.reject(job.delivery_tag, requeue=True)
        self._forget(job)

    def on_reply_returned(self, _ch: Any, method: Basic.Return, props: BasicProperties,
                          _body: bytes) -> None:
        """The broker returned a reply (published ``mandatory``) it could not route."""
        log.warning("reply to call %r dropped: the caller's queue %r is gone (%s %s)",
                    props.correlation_id, method.routing_key, method.reply_code,
                    method.reply_text)

    # --- the worker's lifecycle --------------------------------------------------------

    def channel_lost(self) -> None:
        """The task channel closed: stop and forget every call, and wait for a new channel.

        The broker puts every unacknowledged call back in its queue; the jobs serving them
        are stopped, as their delivery tags die with the channel.
        """
        self._settle_sent()
        for job in list(self._jobs.values()):
            self._abandon(job)
            self._forget(job)
        for job in self._threads.drain_pending():
            job.watch.abandon(JobKilled)
            self._forget(job)
        self.channel = None
        self._holding_back = False  # a new channel starts with the worker's own prefetch

    def requeue_waiting(self) -> None:
        """Return the calls whose job waits for memory or a thread to their queues
        (graceful stop). Those waiting for memory go first: requeuing the others frees
        memory, which would start them."""
        self._settle_sent()
        for job in [job for job in self._jobs.values() if self._memory.is_waiting(job.key)]:
            self._requeue(job)
        for job in self._threads.drain_pending():
            self._requeue(job)

    def requeue_running(self) -> None:
        """Stop the jobs still running after the grace period and requeue their calls."""
        self._settle_sent()
        for job in list(self._jobs.values()):
            if self._abandon(job) == "ended":
                continue  # it ended just now: its thread answers it
            log.warning("job %s of task %s did not finish within the grace period; requeued",
                        job.correlation_id, job.task)
            self._requeue(job)

    def close(self) -> None:
        """Let idle job threads exit and forget the remembered cancel notices."""
        self._threads.close()
        self._cancelled.clear()


def _sendable(job: Job, headers: dict[str, Any]) -> dict[str, Any]:
    """The headers a task left in ``context.headers``, without reserved names: crew's own
    would confuse the caller, and the broker acts on some (``CC`` copies a message to other
    queues)."""
    kept = protocol.user_headers(headers)
    if len(kept) != len(headers):
        log.warning("reply to call %r: reserved header(s) %s set by task %s not sent",
                    job.correlation_id, sorted(map(str, headers.keys() - kept.keys())),
                    job.task)
    return kept
