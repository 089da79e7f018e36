"""The call path of a worker: from a delivered call to its running job, and the job's stop.

:class:`CallHandler` checks each delivery, admits it under the worker's memory ceiling
(:mod:`crew.memory`), starts its job (in a job thread of :mod:`crew.pool`, or as a coroutine
for ``async`` tasks) and arms a timer for its deadline. It stops a job at its deadline, on
its caller's cancel notice (remembered for a call not delivered yet), when the task channel
is lost and on a graceful stop, and counts the stuck job threads. How each call then ends,
exactly once, is :mod:`crew.replies`; which calls are let in, :mod:`crew.intake`; section 6
of docs/PROTOCOL.md has them in prose. All but :meth:`CallHandler.gauges` runs on the loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from functools import partial
from typing import Any, Callable

from pika.spec import Basic, BasicProperties

from . import codec
from .amqp import Channel
from .cancels import Key, Remembered
from .exceptions import JobKilled, MessageTooLargeError
from .jobs import Job, Scope
from .intake import Intake
from .memory import MemoryGate
from .pool import JobThreads
from .registry import TaskFunction
from .replies import Replies

__all__ = ["STUCK_AFTER", "CallHandler"]

log = logging.getLogger(__name__)

#: Seconds after an interruption at which a job thread that has not returned counts as stuck.
STUCK_AFTER = 1.0


class CallHandler:
    """Serves the calls delivered to one worker; :attr:`replies` ends each exactly once.

    ``scope``: what task code sees of the worker (``context.settings`` and ``.pubsub``);
    ``concurrency``: jobs run at once (and calls held, :mod:`crew.intake`); ``worker_id``
    names the job threads; ``max_memory``: bytes the calls served may hold (:mod:`crew.memory`);
    ``on_too_many_stuck()`` is called (on the loop) once more than ``max_stuck`` job threads are
    stuck; ``call_in_loop(func, *args)`` runs ``func`` on the loop from any thread.
    """

    def __init__(self, scope: Scope, *, concurrency: int, worker_id: str, max_memory: int,
                 max_stuck: int, call_in_loop: Callable[..., None],
                 on_too_many_stuck: Callable[[], None]) -> None:
        self._scope = scope
        self._max_stuck = max_stuck
        self._on_too_many_stuck = on_too_many_stuck
        self._loop: asyncio.AbstractEventLoop | None = None
        #: How each call ends, and the table of the calls being served.
        self.replies = Replies(call_in_loop, self._released)
        #: Cancel notices of calls not delivered (yet).
        self._cancelled = Remembered()
        self.threads = JobThreads(concurrency, f"crew-job-{worker_id[:6]}",
                                  self.replies.thread_done)
        #: What the calls being served may hold decoded, against the worker's max_memory.
        self._memory = MemoryGate(max_memory)
        self.intake = Intake(concurrency, self.replies, self._memory)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve calls on ``loop``, the loop that owns the worker's connection."""
        self._loop = loop
        self.replies.start()

    def attach(self, channel: Channel) -> None:
        """Calls now come on ``channel`` (the worker opened a task channel)."""
        self.replies.attach(channel)

    def begin_stop(self) -> None:
        """The worker stops: calls still delivered go back to their queue."""
        self.replies.begin_stop()

    @property
    def channel(self) -> Channel | None:
        """The task channel the calls come in on; None while the worker is disconnected."""
        return self.replies.channel

    @property
    def idle(self) -> asyncio.Event | None:
        """Set while no call is being served (None before :meth:`start`)."""
        return self.replies.idle

    def gauges(self) -> tuple[int, int, bool]:  # served, stuck threads, stopping; any thread
        return self.replies.serving_now, len(self.threads.stuck), self.replies.stopping

    @property
    def serving(self) -> int:
        """How many calls are being served (running, or waiting); on the loop only."""
        self.replies.settle_sent()
        return len(self.replies.jobs)

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
        replies = self.replies
        replies.settle_sent()
        channel = replies.channel
        if channel is None or self._turned_away(channel, name, method, props):
            return
        correlation_id = props.correlation_id
        try:
            job, refusal = Job.from_delivery(self._scope, name, func, method.delivery_tag,
                                             props, body)
        except Exception:  # a case the checks missed: still no redelivery loop
            log.exception("call %r to %s could not be read; dropped", correlation_id, name)
            channel.ack(method.delivery_tag)
            return
        job.channel = channel
        if refusal is not None:
            log.warning("call %r to %s refused: %s", correlation_id, name, refusal)
            replies.answer(job, job.error_reply(refusal, with_traceback=False))
            return
        self._begin(job, is_async)

    def _turned_away(self, channel: Channel, name: str, method: Basic.Deliver,
                     props: BasicProperties) -> bool:
        """Requeue or drop a delivery that must not run, before it is read; True if it was."""
        if self.replies.stopping:  # delivered before the consumer cancel took effect
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
        if key in self.replies.jobs:
            # A replayed or forged copy, or the call itself returned by a 4.3 quorum
            # queue's consumer timeout while its first run goes on (a closed channel's
            # calls come after the worker forgot them): the running job answers.
            log.warning("call %r to %s is a copy of a running call; dropped", correlation_id,
                        name)
            channel.ack(method.delivery_tag)
            return True
        return False

    def _begin(self, job: Job, is_async: bool) -> None:
        """Start a checked call's job, unless its deadline has passed already."""
        remaining = job.deadline - time.monotonic()
        if remaining <= 0:
            self.replies.answer(job, job.expired_reply(
                f"deadline passed before a worker started the call ({-remaining:.3f} s ago)"))
            return
        cost = codec.decode_memory(job.body, job.content_type, job.content_encoding)
        if cost > self._memory.limit:
            refusal = MessageTooLargeError(
                f"decoding this call may take up to {cost >> 20} MiB, more than this worker's "
                f"memory ceiling of {self._memory.limit >> 20} MiB (--max-memory)")
            log.warning("call %r to %s refused: %s", job.correlation_id, job.task, refusal)
            self.replies.answer(job, job.error_reply(refusal, with_traceback=False))
            return
        self.replies.add(job)
        job.timer = self._loop.call_later(remaining, self._on_deadline, job)  # type: ignore
        if not self._memory.admit(job.key, cost, partial(self._start, job, is_async)):
            self.intake.check()  # consume nothing while a call waits for memory

    def _released(self, job: Job) -> None:
        """``job``'s call is no longer served: its memory may start the calls that wait."""
        self._memory.release(job.key)
        self.intake.check()

    def _start(self, job: Job, is_async: bool) -> None:
        """Run a call that has its memory reserved: in a job thread, or as a coroutine."""
        if is_async:
            job.coroutine = self._loop.create_task(self._run_coroutine(job))  # type: ignore
        else:
            self.threads.submit(job)

    async def _run_coroutine(self, job: Job) -> None:
        try:
            reply = await job.run_async()
        except asyncio.CancelledError:
            return  # the loop answered (deadline) or dropped (cancel) the call already
        self.replies.job_done(job, reply)

    def on_cancel(self, key: Key, deadline_ms: int | None) -> None:
        """A caller cancelled its call ``key``: stop its job here, or remember the notice
        until ``deadline_ms`` in case the call is delivered to this worker later."""
        self.replies.settle_sent()
        job = self.replies.jobs.get(key)
        if job is None:
            self._cancelled.add(key, deadline_ms)
            return
        if self._abandon(job) == "ended":
            return  # it ended just now: its thread answers it
        log.info("call %s to %s cancelled by its caller; job stopped", job.correlation_id,
                 job.task)
        self.replies.drop(job)

    # --- stopping jobs -----------------------------------------------------------------

    def _on_deadline(self, job: Job) -> None:
        if job.answered:
            return
        where = job.where()  # before the kill lands and unwinds it
        state = self._abandon(job)
        if state == "ended":
            return  # it ended just now: its thread answers it
        if state == "pending":
            waited_for = "memory" if self._memory.is_waiting(job.key) else "a job thread"
            reply = job.expired_reply(f"deadline passed before {waited_for} was free")
        else:
            log.warning("job %s of task %s interrupted at its deadline", job.correlation_id,
                        job.task)
            reply = job.killed_reply(where)
        self.replies.answer(job, reply)

    def _abandon(self, job: Job) -> str:
        """Stop ``job`` wherever it is; return the state it was in."""
        if job.coroutine is not None:
            job.coroutine.cancel()
            return "running"
        state = job.watch.abandon(JobKilled)
        if state == "running" and job.thread is not None:
            thread = job.thread
            self.threads.replace(thread)
            self._loop.call_later(STUCK_AFTER, self._check_stuck, job, thread)  # type: ignore
        return state

    def _check_stuck(self, job: Job, thread: threading.Thread) -> None:
        if thread not in self.threads.stuck:
            return
        count = len(self.threads.stuck)
        log.error("job thread %s (task %s, call %s) is stuck %.0f s after its interruption; "
                  "%d stuck thread(s), limit %d", thread.name, job.task, job.correlation_id,
                  STUCK_AFTER, count, self._max_stuck)
        if count > self._max_stuck and not self.replies.stopping:
            self._on_too_many_stuck()

    def channel_lost(self) -> None:
        """The task channel closed: stop and forget every call, and wait for a new channel.

        The broker puts every unacknowledged call back in its queue; the jobs serving them
        are stopped, as their delivery tags die with the channel.
        """
        replies = self.replies
        replies.settle_sent()
        for job in list(replies.jobs.values()):
            self._abandon(job)
            replies.forget(job, requeued=True)
        for job in self.threads.drain_pending():
            job.watch.abandon(JobKilled)
            replies.forget(job, requeued=True)
        replies.detach()
        self.intake.detach()

    def requeue_waiting(self) -> None:
        """Return the calls whose job waits for memory or a thread to their queues
        (graceful stop). Those waiting for memory go first: requeuing the others frees
        memory, which would start them."""
        replies = self.replies
        replies.settle_sent()
        for job in [job for job in replies.jobs.values() if self._memory.is_waiting(job.key)]:
            replies.requeue(job)
        for job in self.threads.drain_pending():
            replies.requeue(job)

    def requeue_running(self) -> None:
        """Stop the jobs still running after the grace period and requeue their calls."""
        self.replies.settle_sent()
        for job in list(self.replies.jobs.values()):
            if self._abandon(job) == "ended":
                continue  # it ended just now: its thread answers it
            log.warning("job %s of task %s did not finish within the grace period; requeued",
                        job.correlation_id, job.task)
            self.replies.requeue(job)

    def close(self) -> None:
        """Let idle job threads exit and forget the remembered cancel notices."""
        self.threads.close()
        self._cancelled.clear()
