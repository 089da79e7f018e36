"""A worker's intake: its consumers of its task queues, and the calls it lets in (internal).

A worker with concurrency N must never hold (delivered, unacknowledged) more calls than it
can start, across all its task queues, so that an idle worker is never starved while a busy
one holds calls. RabbitMQ 4.x no longer permits a channel-wide (``global``) prefetch, and
quorum queues never had one, so every consumer gets its own prefetch, and:

- With one task queue the consumer's prefetch N is the whole guarantee; the broker keeps
  the rest, and nothing else happens per call.
- With several, each consumer's prefetch alone would let the worker hold N per queue. The
  worker counts what it holds; a call delivered while it holds N is never held: the worker
  cancels its consumers (``basic.cancel``, no wait), so the broker keeps the next calls
  for other workers, and puts that call back in its queue (``basic.reject``, requeue),
  whence another worker takes it. When a slot frees it consumes again, each consumer with
  the prefetch of the slots free, starting with the next queue in turn so that no queue
  is starved. A worker whose callers never send more than it can run (its queues empty
  whenever it is full) thus never cancels anything.
- While a call waits for memory (:mod:`crew.memory`) the worker consumes nothing, with one
  queue or several, and consumes again once no call waits.
- On quorum task queues none of this: every return of a call (a reject, and a delivery to a
  cancelled consumer, which pika rejects) counts against its delivery limit, which would
  turn a worker's fullness into a caller's ``DeliveryLimitError``. There each consumer keeps
  the prefetch N, and a worker may hold up to N per task queue, the calls past N waiting for
  a job slot (``returns=False`` in :meth:`Intake.start`).

A consumer the broker cancels (its queue deleted, its node lost, a quorum queue's consumer
timeout on RabbitMQ 4.3) is logged once, its queue declared again on a channel of its own,
with backoff, and consumed again. Everything here runs on the worker's loop;
docs/PROTOCOL.md, section 6, has it in prose, with the broker facts it relies on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pika.spec import Basic, BasicProperties

from .amqp import Channel, MessageCallback
from .connecting import backoff
from .exceptions import CrewError
from .memory import MemoryGate
from .replies import Replies

__all__ = ["Intake"]

log = logging.getLogger(__name__)


class Intake:
    """The consumers of one worker's task queues on its current task channel.

    ``concurrency``: the calls it may hold; ``replies`` holds them (its table) and is told
    when the worker consumes nothing (its job threads must then wake the loop); ``memory``:
    the calls waiting for memory. The counters :attr:`cancels`, :attr:`consumes` and
    :attr:`rejects` measure the churn.
    """

    def __init__(self, concurrency: int, replies: Replies, memory: MemoryGate) -> None:
        self._limit = concurrency
        self._replies = replies
        self._memory = memory
        self._channel: Channel | None = None
        self._queues: dict[str, MessageCallback] = {}
        self._redeclare: Callable[[], Awaitable[None]] | None = None
        self._tags: dict[str, str] = {}  # consumer tag -> queue
        self._missing: set[str] = set()  # queues whose consumer the broker cancelled
        self._restoring: dict[str, asyncio.Task[None]] = {}
        self._consuming: asyncio.Task[None] | None = None  # the consume of _resume()
        self._paused = False
        self._changing = False  # consuming (again) is under way or scheduled: wait for it
        self._parked: list[int] = []  # deliveries past the limit, rejected once it is not
        self._prefetch = concurrency
        self._turn = 0
        self._stopped = False
        self._renew = False  # consume every queue anew once the pending RPC is answered
        self._returns = True  # see start()
        self.cancels = self.consumes = self.rejects = 0

    async def start(self, channel: Channel, consumers: Mapping[str, MessageCallback],
                    redeclare: Callable[[], Awaitable[None]], *, returns: bool = True) -> None:
        """Consume each queue of ``consumers`` on ``channel`` with its ``on_message``;
        ``redeclare()`` declares the task queues again (after the broker cancelled one).
        ``returns``: whether calls may go back to their queue at no cost (False on quorum
        queues: then the worker never pauses and never turns a call back)."""
        self._channel, self._redeclare, self._paused = channel, redeclare, False
        self._tags, self._missing, self._parked = {}, set(), []
        self._returns = returns
        multi = returns and len(consumers) > 1
        self._queues = {queue: (self._guard(on_message) if multi else on_message)
                        for queue, on_message in consumers.items()}
        channel.on_cancel(self._on_broker_cancel)
        self._on_pause(False)
        await self._consume(self._limit)

    def _guard(self, on_message: MessageCallback) -> MessageCallback:
        """``on_message``, letting in only the calls this worker can start."""
        def guarded(ch: Any, method: Basic.Deliver, props: BasicProperties,
                    body: bytes) -> None:
            if self._paused or self._full():
                self._turn_back(method.delivery_tag)
                return
            on_message(ch, method, props, body)

        return guarded

    def _load(self) -> tuple[int, bool]:
        """The calls held (delivered, not acknowledged), and whether one waits for memory."""
        replies = self._replies
        replies.settle_sent()
        return len(replies.jobs), self._memory.waiting > 0

    def _on_pause(self, paused: bool) -> None:
        self._replies.wake_on_end = paused

    def _full(self) -> bool:
        held, waiting = self._load()
        return waiting or held >= self._limit

    def _turn_back(self, delivery_tag: int) -> None:
        """A call past the limit: back to its queue, once our consumers are cancelled."""
        if self._changing:
            self._parked.append(delivery_tag)
            return
        self._pause()
        self._reject(delivery_tag)

    def _reject(self, delivery_tag: int) -> None:
        if self._channel is not None:
            self.rejects += 1
            self._channel.reject(delivery_tag, requeue=True)

    def check(self) -> None:
        """After a call was let in or released: pause, consume again, or raise the prefetch."""
        if self._channel is None or self._stopped or not self._returns:
            return
        held, waiting = self._load()  # may end calls, whose release checks in between
        if self._changing:
            return  # consuming (again) is under way or scheduled; it checks when done
        free = self._limit - held
        if not self._paused:
            if waiting:
                self._pause()
            elif free > self._prefetch:  # consumed again while busy: let the slots fill
                self._pause()
                self._resume(free)
        elif not waiting and free > 0:
            self._resume(free)

    def _pause(self) -> None:
        """Cancel every consumer now (no wait); pika requeues what they deliver after."""
        self._paused = True
        channel = self._channel
        if channel is not None and channel.is_open:
            for tag in self._tags:
                channel.cancel_nowait(tag)
                self.cancels += 1
            channel.flush()
        self._tags.clear()
        self._on_pause(True)

    def _resume(self, free: int) -> None:
        self._paused = False
        self._on_pause(False)
        # Changing from now, not from when the task runs: a check() in between (the next
        # reply of a batch) would otherwise consume again too, and the queue would have two
        # consumers of this worker, one never cancelled (seen on RabbitMQ 4.3).
        self._changing = True
        self._consuming = asyncio.get_running_loop().create_task(self._consume(free))
        self._consuming.add_done_callback(self._consumed)

    async def _consume(self, prefetch: int) -> None:
        """Consume every queue, from the next in turn, each with ``prefetch``. The prefetch
        of a consumer is set when it starts (``basic.qos`` with ``global`` false changes no
        existing consumer)."""
        channel = self._channel
        if channel is None:
            self._changing = False
            return
        self._changing = True
        try:
            await channel.qos(prefetch)
            self._prefetch = prefetch
            queues = [queue for queue in self._queues if queue not in self._missing]
            self._turn = (self._turn + 1) % max(1, len(queues))
            for queue in queues[self._turn:] + queues[:self._turn]:
                if self._paused:  # stopped meanwhile
                    break
                tag = await channel.consume(queue, self._queues[queue])
                self._tags[tag] = queue
                self.consumes += 1
            waiting = self._returns and self._load()[1]  # a check it leads to waits for us
        finally:
            self._changing = False
        if self._parked or self._renew or self._stopped or waiting:
            self._renew = False
            self._pause()
        parked, self._parked = self._parked, []
        for delivery_tag in parked:
            self._reject(delivery_tag)

    def _consumed(self, task: asyncio.Task[None]) -> None:
        if self._consuming is task:
            self._consuming = None
        if not task.cancelled() and isinstance(task.exception(), CrewError):
            return  # the channel closed: the worker connects again
        self.check()

    async def stop(self) -> None:
        """Consume nothing more (the worker stops)."""
        self._stopped = True
        self._pause()

    def detach(self) -> None:
        """The task channel closed: nothing to cancel, nothing to consume again."""
        self._channel = None
        self._tags.clear()
        self._parked.clear()
        self._changing = False
        if self._consuming is not None:
            self._consuming.cancel()  # it would consume on the next channel
            self._consuming = None
        for task in self._restoring.values():
            task.cancel()
        self._restoring.clear()

    # --- consumers the broker cancels --------------------------------------------------

    def _on_broker_cancel(self, frame: Any) -> None:
        queue = self._tags.pop(frame.method.consumer_tag, None)
        if queue is None or queue in self._restoring:
            return
        log.warning("the broker cancelled the worker's consumer of %s (queue deleted, its "
                    "node lost, or a consumer timeout); declaring and consuming it again",
                    queue)
        self._missing.add(queue)
        self._restoring[queue] = asyncio.get_running_loop().create_task(self._restore(queue))

    async def _restore(self, queue: str) -> None:
        for delay in backoff(0.25, 15.0):
            await asyncio.sleep(delay)
            try:
                await self._redeclare()  # type: ignore[misc]  # set by start()
                break
            except CrewError as exc:
                log.debug("declaring %s again failed: %s; retrying", queue, exc)
        self._restoring.pop(queue, None)
        self._missing.discard(queue)
        log.info("consuming %s again", queue)
        if not self._returns:  # quorum queues: the others' consumers stay as they are
            if self._channel is not None and not self._stopped:
                tag = await self._channel.consume(queue, self._queues[queue])
                self._tags[tag] = queue
                self.consumes += 1
        elif self._changing:
            self._renew = True  # see the end of _consume
        elif self._channel is not None and not self._stopped and not self._paused:
            self._pause()  # all consumers anew, this queue among them
            self.check()
