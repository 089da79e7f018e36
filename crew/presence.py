"""Worker presence: a worker's answer to "who is there, and how busy?" (``crew status``,
``crew inspect``).

A program asks by publishing a request to the ``crew.presence`` fanout exchange with its own
reply queue as ``reply_to``; every worker connected then answers there with its *presence
map*: who it is, what it serves, how busy it is and the calls it is serving
(docs/PROTOCOL.md, section 12). Each worker follows the requests on a channel of its own,
from an exclusive queue of its own, and answers on its event loop: job threads play no
part, so a worker whose every slot is busy, or whose job threads are stuck, still answers
(unless a job holds the GIL in C code: RABBITMQ-NOTES 8).

The map is versioned (``v``) and self-contained. The worker also publishes it unasked,
every :data:`~crew.protocol.FIGURES_INTERVAL` seconds, with its figures (:mod:`crew.figures`)
on the ``crew.figures`` fanout exchange, for dashboards (section 13); readers ignore keys
they do not know.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any, Mapping

from pika.spec import Basic, BasicProperties

from . import codec, protocol
from .amqp import Channel, Connection
from .calls import CallHandler
from .exceptions import BrokerError, CrewError
from .figures import Figures
from .jobs import Job

__all__ = ["PRESENCE_VERSION", "Presence"]

log = logging.getLogger(__name__)

#: ``v`` of the presence map: raised when a key changes meaning or goes away (new keys
#: do not raise it).
PRESENCE_VERSION = 1


class Presence:
    """What a worker tells of itself, and its answers to presence requests.

    ``calls``: the worker's call handler (its calls and job threads); ``figures``: what its
    calls' ends are counted in; the other arguments are the worker's, as
    :class:`~crew.serving.Worker` was given them. One per worker, for its whole life;
    :meth:`follow` on each connection.
    """

    def __init__(self, calls: CallHandler, figures: Figures, worker_id: str,
                 tasks: Mapping[str, Any], queue_type: str, max_priority: int,
                 concurrency: int, max_stuck: int) -> None:
        self._calls = calls
        self._figures = figures
        self._static: dict[str, Any] = {
            "v": PRESENCE_VERSION, "worker": worker_id, "host": socket.gethostname(),
            "version": protocol.VERSION, "tasks": sorted(tasks), "queue_type": queue_type,
            "max_priority": max_priority if queue_type == protocol.CLASSIC else None,
            "concurrency": concurrency, "max_stuck": max_stuck}
        self._started_ms = protocol.now_ms()
        self._started = time.monotonic()
        self._channel: Channel | None = None
        self._closed = False
        self._again: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._figures_on = False  # whether the broker let it declare crew.figures

    def snapshot(self) -> dict[str, Any]:
        """The presence map now (docs/PROTOCOL.md, section 12); on the worker's loop."""
        replies = self._calls.replies
        replies.settle_sent()
        now, now_ms = time.monotonic(), protocol.now_ms()
        calls = [_call(job, now, now_ms) for job in list(replies.jobs.values())]
        busy = sum(call["state"] == "running" for call in calls)
        return {**self._static, "pid": os.getpid(), "started": self._started_ms,
                "uptime": round(now - self._started, 3), "at": now_ms, "busy": busy,
                "waiting": len(calls) - busy, "stuck": len(self._calls.threads.stuck),
                "calls": calls}

    async def follow(self, connection: Connection) -> None:
        """Answer the requests sent from now on, on a channel of its own of ``connection``.

        If that channel closes while the connection stays open, or the broker cancels its
        consumer (its queue was deleted), it follows them again on a new channel; the
        connection's loss is the worker's to mend (it calls this again). A broker that
        refuses it (403: a user without rights on ``crew.presence``) is logged: the worker
        serves its calls all the same, unseen by ``crew status`` and dashboards.

        Its figures leave on the same channel, now and every ``FIGURES_INTERVAL`` seconds,
        unless the broker refuses ``crew.figures`` (a user whose permissions predate it):
        that is logged, and presence is answered all the same.
        """
        self._closed = False
        channel = self._channel = await connection.channel()
        try:
            await channel.declare_exchange(protocol.FIGURES_EXCHANGE, "fanout")
            self._figures_on = True
        except BrokerError as exc:  # it closed the channel: presence goes on a new one
            log.warning("figures cannot be published: %s; dashboards do not see this worker "
                        "(docs/SECURITY.md, section 2)", exc)
            self._figures_on = False
            channel = self._channel = await connection.channel()
        try:
            await channel.declare_exchange(protocol.PRESENCE_EXCHANGE, "fanout")
            queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
            await channel.bind(queue, protocol.PRESENCE_EXCHANGE)
            await channel.consume(queue, self._on_request, auto_ack=True, exclusive=True)
        except BrokerError as exc:
            log.warning("presence requests cannot be followed: %s; this worker serves its "
                        "calls, but crew status and dashboards do not see it "
                        "(docs/SECURITY.md, section 2)", exc)
            return
        self._publish_figures()
        channel.on_cancel(lambda _frame: self._again_on(connection, channel, "consumer cancelled"))
        channel.closed.add_done_callback(
            lambda _closed: self._again_on(connection, channel, "channel closed"))

    def close(self) -> None:
        """Stop following (the connection is lost or closed): nothing is started again."""
        self._closed = True
        if self._again is not None:
            self._again.cancel()
        if self._timer is not None:
            self._timer.cancel()

    def farewell(self) -> None:
        """Publish the figures one last time, marked ``stopping``: the worker stops."""
        if not self._closed:
            self._publish_figures(stopping=True)

    def _publish_figures(self, stopping: bool = False) -> None:
        """Publish the map and figures (section 13), and again in ``FIGURES_INTERVAL``."""
        if self._timer is not None:
            self._timer.cancel()
        channel = self._channel
        if self._closed or not self._figures_on or channel is None or not channel.is_open:
            return  # following again (or the connection's loss) starts it again
        figures = {**self.snapshot(), **self._figures.snapshot(),
                   "interval": protocol.FIGURES_INTERVAL, "stopping": stopping}
        try:
            body = codec.serialize(figures)
        except CrewError:  # not with crew's own values; a timer callback must not raise
            log.exception("figures could not be encoded")
        else:
            channel.publish(protocol.FIGURES_EXCHANGE, "", body, BasicProperties(
                type=protocol.FIGURES_TYPE, content_type=protocol.MSGPACK, delivery_mode=1,
                expiration=str(protocol.seconds_to_ms(5 * protocol.FIGURES_INTERVAL))))
        if not stopping:
            self._timer = asyncio.get_running_loop().call_later(
                protocol.FIGURES_INTERVAL, self._publish_figures)

    def _again_on(self, connection: Connection, channel: Channel, why: str) -> None:
        if (self._closed or channel is not self._channel or not connection.is_open
                or (self._again is not None and not self._again.done())):
            return
        log.warning("presence requests: %s; following them on a new channel", why)
        self._again = asyncio.ensure_future(self._follow_again(connection, channel))

    async def _follow_again(self, connection: Connection, old: Channel) -> None:
        try:
            await old.close()  # its close comes back to _again_on, which leaves it be
            await self.follow(connection)
        except CrewError as exc:  # the connection went too: the worker connects again
            log.warning("presence requests: could not follow them again: %s", exc)

    def _on_request(self, _ch: Any, _method: Basic.Deliver, props: BasicProperties,
                    _body: bytes) -> None:
        channel = self._channel
        if props.type != protocol.PRESENCE_REQUEST_TYPE or not props.reply_to:
            log.warning("presence message ignored (type %r, reply_to %r)", props.type,
                        props.reply_to)
            return
        if channel is None or not channel.is_open:
            return
        try:
            body = codec.serialize(self.snapshot())
        except CrewError:  # not with crew's own values; a pika callback must never raise
            log.exception("presence map could not be encoded")
            return
        channel.publish("", props.reply_to, body, BasicProperties(
            type=protocol.PRESENCE_TYPE, content_type=protocol.MSGPACK,
            correlation_id=props.correlation_id, delivery_mode=1))


def _call(job: Job, now: float, now_ms: int) -> dict[str, Any]:
    """One call being served, as the presence map lists it."""
    running = job.coroutine is not None or job.watch.state == "running"
    return {"task": job.task, "correlation_id": job.correlation_id, "caller": job.reply_to,
            "state": "running" if running else "waiting",
            "received": now_ms - round((now - job.received) * 1000),
            "elapsed": round(now - job.received, 3),
            "deadline": now_ms + round((job.deadline - now) * 1000)}
