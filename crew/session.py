"""A worker's session: what it sets up on one broker connection, and takes down again.

On each connection (the first, and every reconnection) a worker opens its task channel,
declares the exchanges and its task queues, starts following the cancel notices
(:class:`crew.cancels.CancelFeed`), answers presence requests (:mod:`crew.presence`) and
consumes its task queues through its intake
(:mod:`crew.intake`: per-consumer prefetch; on classic queues at most the worker's
concurrency held across them), handing each delivery to its
:class:`~crew.calls.CallHandler`, which outlives the session. Connecting again after a
loss, and stopping, is :class:`crew.serving.Worker`'s.
"""

from __future__ import annotations

from typing import Mapping

from . import protocol
from .amqp import Channel, Connection
from .connecting import NOT_FOUND, unavailable
from .calls import CallHandler
from .cancels import CancelFeed
from .exceptions import BrokerError
from .presence import Presence
from .registry import TaskFunction
from .settings import BrokerSettings

__all__ = ["Session"]


class Session:
    """One broker connection of a worker, with its task channel, cancel feed and consumers.

    Made by :meth:`open`; ``worker_id`` makes the cancel feed's markers unique; ``presence``
    (if given) answers presence requests on this connection.
    """

    def __init__(self, connection: Connection, calls: CallHandler,
                 tasks: Mapping[str, TaskFunction], *, max_priority: int, worker_id: str,
                 queue_type: str = protocol.CLASSIC, presence: Presence | None = None) -> None:
        self.connection = connection
        #: The task channel, once opened.
        self.channel: Channel | None = None
        self._calls = calls
        self._tasks = tasks
        self._max_priority = max_priority
        self._queue_type = queue_type
        self._worker_id = worker_id
        self._cancel_feed: CancelFeed | None = None
        self._presence = presence

    @classmethod
    async def open(cls, broker: BrokerSettings, calls: CallHandler,
                   tasks: Mapping[str, TaskFunction], *, max_priority: int, worker_id: str,
                   queue_type: str = protocol.CLASSIC,
                   presence: Presence | None = None) -> Session:
        """One attempt: connect, declare, consume. A connection lost half-way is closed and
        the error raised, for :func:`~crew.connecting.connect_retrying` to try again."""
        session = cls(await Connection.open(broker), calls, tasks, max_priority=max_priority,
                      worker_id=worker_id, queue_type=queue_type, presence=presence)
        try:
            await session._setup()
        except BaseException:
            calls.intake.detach()
            await session.close()
            raise
        return session

    async def _setup(self) -> None:
        channel = self.channel = await self.connection.channel()
        self._calls.attach(channel)
        await channel.declare_topology()
        channel.on_return(self._calls.replies.on_reply_returned)
        await self._declare_task_queues(channel)
        # Cancel notices get a channel of their own: the task channel's intake stops
        # consuming while the worker is full. They are read up to now before
        # any call is taken, so that a notice sent while no worker ran still holds.
        self._cancel_feed = CancelFeed(self.connection, self._calls.on_cancel, self._worker_id)
        await self._cancel_feed.start()
        if self._presence is not None:  # before any call is taken: a busy worker answers
            await self._presence.follow(self.connection)
        await self._calls.intake.start(channel, {
            protocol.task_queue(name): self._calls.consumer(name, func)
            for name, func in self._tasks.items()}, self._redeclare,
            returns=self._queue_type == protocol.CLASSIC)

    async def _redeclare(self) -> None:
        """Declare the task queues again, on a channel of their own: a failed declare
        closes its channel, and the task channel holds the calls being served."""
        channel = await self.connection.channel()
        try:
            await self._declare_task_queues(channel)
        finally:
            await channel.close()

    async def _declare_task_queues(self, channel: Channel) -> None:
        arguments = protocol.task_queue_arguments(self._max_priority, self._queue_type)
        for name in self._tasks:
            queue = protocol.task_queue(name)
            try:
                await channel.declare_queue(queue, durable=True, arguments=arguments)
            except BrokerError as exc:
                if exc.code == NOT_FOUND:  # its node restarts: connect_retrying tries again
                    raise unavailable(exc, queue) from None
                raise BrokerError(f"cannot declare {queue}: {exc.text}. {self._mismatch(exc)}",
                                  exc.code, exc.text) from None

    def _mismatch(self, exc: BrokerError) -> str:
        """What to do about a 406 on declaring a task queue that exists with other arguments."""
        other = protocol.CLASSIC if self._queue_type == protocol.QUORUM else protocol.QUORUM
        if "x-queue-type" in exc.text or (  # a quorum declare meets x-max-priority first
                self._queue_type == protocol.QUORUM and "x-max-priority" in exc.text):
            return (f"It is a {other} queue and this worker declares {self._queue_type} ones: "
                    f"run it with --queue-type {other} (or $CREW_QUEUE_TYPE, "
                    f"Worker(queue_type=...)) like the task's other workers, or move the task "
                    f"to {self._queue_type} queues (README, 'Quorum task queues')")
        if self._queue_type == protocol.QUORUM:
            return ("It exists with other arguments: every worker of a task must use the same "
                    "crew version and queue type, or delete the queue")
        return ("It exists with other arguments; every worker of a task must use the same "
                f"max_priority (this one: {self._max_priority}), or delete the queue")

    async def cancel_consumers(self) -> None:
        """Stop consuming the task queues, unless the task channel closed already."""
        await self._calls.intake.stop()

    def lost(self) -> None:
        """The connection or the task channel closed: stop following the cancel notices."""
        if self._cancel_feed is not None:
            self._cancel_feed.close()
        if self._presence is not None:
            self._presence.close()
        self._calls.intake.detach()

    async def close(self) -> None:
        """Stop following the cancel notices and close the connection."""
        if self._cancel_feed is not None:
            self._cancel_feed.close()
        if self._presence is not None:
            self._presence.close()
        await self.connection.close()
