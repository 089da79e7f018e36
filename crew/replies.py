"""The reply paths of a worker: how each call it serves ends, exactly once.

:class:`Replies` keeps the table of the calls being served and ends each of them one way:
its reply published and the call acknowledged (:meth:`~Replies.answer`), the call
acknowledged without a reply (:meth:`~Replies.drop`: cancelled by its caller), put back in
its queue (:meth:`~Replies.requeue`: a graceful stop), or only forgotten
(:meth:`~Replies.forget`: its channel is gone, and the broker redelivers it).

A finished job's reply takes one of two paths. A job thread whose job is the only call being
served publishes the reply and acknowledges the call itself, at once, without waking the
loop (:meth:`~Replies.thread_done`); the loop forgets the call the next time it looks
(:meth:`~Replies.settle_sent`). Otherwise the reply is queued for the loop, which publishes
the replies finished meanwhile in one batch (:meth:`~Replies.job_done`). The job's
:class:`~crew.threads.Interruptible` decides who answers a call that the loop gives up on
just as it ends: once the job has ended, its thread answers, and the loop leaves it be.

Everything here runs on the worker's loop, except :meth:`~Replies.thread_done` and
:meth:`~Replies.job_done`, which job threads call. docs/PROTOCOL.md, section 6, describes
the replies on the wire.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable, Protocol

from pika.spec import Basic, BasicProperties

from . import outcomes, protocol
from .amqp import Channel
from .cancels import Key
from .exceptions import ConnectionLostError, EncodeError, JobKilled
from .figures import Figures
from .jobs import Job, Reply

__all__ = ["Replies"]

log = logging.getLogger(__name__)


class Observer(Protocol):
    """Hears how each call ended (:class:`crew.observing.WorkerObserver`)."""

    def job_ended(self, job: Job, status: str) -> None: ...

    def channel_lost(self) -> None: ...


class Replies:
    """The calls one worker serves, and the end of each: reply and ack, drop, requeue.

    ``call_in_loop(func, *args)`` runs ``func`` on the worker's loop from any thread;
    ``on_forget(job)`` is called on the loop once a call is no longer served, to free what
    it held. The call handler says which task channel is current (:meth:`attach`,
    :meth:`detach`) and when the worker stops (:meth:`begin_stop`).
    """

    def __init__(self, call_in_loop: Callable[..., None],
                 on_forget: Callable[[Job], None]) -> None:
        self._call_in_loop = call_in_loop
        self._on_forget = on_forget
        #: The task channel the calls came in on; None while the worker is disconnected.
        self.channel: Channel | None = None
        #: Set once the worker stops: a job thread then wakes the loop, which waits for it.
        self.stopping = False
        #: Set while the worker consumes nothing (:mod:`crew.intake`): a job thread then
        #: wakes the loop, which consumes again once a slot is free.
        self.wake_on_end = False
        #: The calls being served (running, or waiting for memory or a job thread).
        self.jobs: dict[Key, Job] = {}
        #: Set while no call is being served (created by :meth:`start`).
        self.idle: asyncio.Event | None = None
        self._finished: list[tuple[Job, Reply]] = []
        #: Jobs whose thread sent the reply and ack itself, for the loop to forget.
        self._sent: list[Job] = []
        self._finished_lock = threading.Lock()
        self._finished_scheduled = False
        #: Told of each call that ends with a reply sent, or dropped (metrics, traces).
        self.observer: Observer | None = None
        #: The worker's own figures, which it publishes (None: a worker's parts in tests).
        self.figures: Figures | None = None

    def _ended(self, job: Job, status: str) -> None:
        """``job``'s call ended with a reply of ``status`` (or was dropped, or requeued)."""
        if self.figures is not None:
            self.figures.job_ended(job, status)
        if self.observer is not None:
            self.observer.job_ended(job, status)

    def start(self) -> None:
        """Called on the worker's loop before the first call."""
        self.idle = asyncio.Event()
        self.idle.set()

    def attach(self, channel: Channel) -> None:
        """Calls now come on ``channel``, and their replies leave on it."""
        self.channel = channel

    def detach(self) -> None:
        """The task channel closed: no reply can be sent until the next :meth:`attach`."""
        self.channel = None
        if self.observer is not None:
            self.observer.channel_lost()

    def begin_stop(self) -> None:
        self.stopping = True

    def add(self, job: Job) -> None:
        """``job``'s call is being served from now on, until it ends."""
        self.jobs[job.key] = job
        self.idle.clear()  # type: ignore[union-attr]  # set by start()

    # --- ending a call, on the loop ----------------------------------------------------

    def answer(self, job: Job, reply: Reply) -> None:
        """Publish ``reply`` and acknowledge the call, once per job."""
        if job.answered:
            return
        channel = self.channel
        if channel is None or not channel.is_open:
            self.forget(job, requeued=True)
            return  # the call will be redelivered by the broker
        try:
            self._publish_reply(channel, job, reply, job.headers)
        except Exception as exc:  # noqa: BLE001 - pika cannot encode a header the task set
            log.warning("reply to call %r could not be sent: %s", job.correlation_id, exc)
            error = EncodeError(f"the reply's headers cannot be sent: {exc}")
            reply = job.error_reply(error, with_traceback=False)
            self._publish_reply(channel, job, reply, {})
        channel.ack(job.delivery_tag)
        self.forget(job)
        self._ended(job, reply.status)

    def drop(self, job: Job) -> None:
        """Acknowledge ``job``'s call without a reply (its caller cancelled it)."""
        self.forget(job)
        self.channel.ack(job.delivery_tag)  # type: ignore[union-attr]
        self._ended(job, outcomes.CANCELLED)

    def requeue(self, job: Job) -> None:
        """Put ``job``'s call back in its queue, unless it ended (its thread answers it)."""
        if job.answered or job.watch.abandon(JobKilled) == "ended":
            return  # answered, or its thread is answering it
        if self.channel is not None:
            self.channel.reject(job.delivery_tag, requeue=True)
        self.forget(job, requeued=True)

    def forget(self, job: Job, *, requeued: bool = False) -> None:
        """``job``'s call is no longer served: nothing more is sent for it. ``requeued``: it
        goes back to its queue (rejected, or its channel is gone), to be served again."""
        job.answered = True
        if job.timer is not None:
            job.timer.cancel()
        if self.jobs.get(job.key) is job:
            del self.jobs[job.key]
            self._on_forget(job)
            if requeued:
                self._ended(job, outcomes.REQUEUED)
        if not self.jobs and self.idle is not None:
            self.idle.set()

    @property
    def serving_now(self) -> int:
        """Calls being served, as any thread may read it (a metrics scrape): not exact
        while jobs end, but never off for long."""
        return len(self.jobs) - len(self._sent)

    def settle_sent(self) -> None:
        """Forget the calls that job threads answered themselves (:meth:`thread_done`).

        Run first wherever the loop reads which calls are being served.
        """
        if self._sent:
            with self._finished_lock:
                sent, self._sent = self._sent, []
            for job in sent:
                self.forget(job)

    def _publish_reply(self, channel: Channel, job: Job, reply: Reply,
                       headers: dict[str, Any]) -> None:
        # mandatory: if the caller's queue is gone, the broker returns the reply to us
        # (logged in on_reply_returned) instead of dropping it unseen.
        channel.publish("", job.reply_to, reply.body,
                        _reply_properties(job, reply, headers), mandatory=True)

    def on_reply_returned(self, _ch: Any, method: Basic.Return, props: BasicProperties,
                          _body: bytes) -> None:
        """The broker returned a reply (published ``mandatory``) it could not route."""
        log.warning("reply to call %r dropped: the caller's queue %r is gone (%s %s)",
                    props.correlation_id, method.routing_key, method.reply_code,
                    method.reply_text)

    # --- a job ended, in its thread or coroutine ---------------------------------------

    def thread_done(self, job: Job, reply: Reply) -> None:
        """A job thread's job ended (called in that thread): answer it from here if it is the
        only call being served, else as :meth:`job_done`.

        Alone, the reply and the acknowledgement leave at once from this thread, and the loop
        is not woken: waking it (its self-pipe, a return from ``epoll``, the GIL handed over
        twice) cost a quarter of the worker's CPU per sequential call, and made the reply
        wait for the loop. The loop forgets the call the next time it runs for any reason
        (:meth:`settle_sent`); only a stop, which waits for it, wakes the loop. With other
        calls under way the loop is busy anyway, and answering them in batches is cheaper.
        """
        if self._alone() and self._send_now(job, reply):
            self._ended(job, reply.status)
            with self._finished_lock:
                self._sent.append(job)
                wake = (self.stopping or self.wake_on_end) and not self._finished_scheduled
                if wake:
                    self._finished_scheduled = True
            if wake:
                self._wake_loop(job)
            return
        self.job_done(job, reply)

    def _alone(self) -> bool:
        """Whether the job that just ended (in the calling thread) is the only call served."""
        return len(self.jobs) == 1

    def _send_now(self, job: Job, reply: Reply) -> bool:
        """Publish ``reply`` and acknowledge the call from the current thread; False, and
        nothing sent, if the connection cannot (then the loop must)."""
        channel = job.channel
        if channel is None or channel is not self.channel:
            return False  # the channel it came on is gone, and the call with it
        try:
            return channel.publish_and_ack_now(
                "", job.reply_to, reply.body, _reply_properties(job, reply, job.headers),
                mandatory=True, delivery_tag=job.delivery_tag)
        except Exception:  # noqa: BLE001 - a header pika cannot encode: the loop's path says so
            return False

    def job_done(self, job: Job, reply: Reply) -> None:
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
            self.forget(job)
        for job, reply in batch:
            self.answer(job, reply)
        if self.channel is not None:
            # The batch leaves now rather than after one more poll of the selector; what
            # other callbacks write later in this loop iteration leaves at its end.
            self.channel.flush()


def _reply_properties(job: Job, reply: Reply, headers: dict[str, Any]) -> BasicProperties:
    if headers:
        headers = _sendable(job, headers)
    return BasicProperties(
        correlation_id=job.correlation_id, content_type=job.reply_type,
        content_encoding=reply.encoding,
        headers={**headers, protocol.STATUS_HEADER: reply.status}, delivery_mode=1)


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
