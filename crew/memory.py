"""A worker's memory ceiling: bytes reserved by the calls it decodes and runs (internal).

Each call reserves, before it is decoded, the most its decoding can hold at once
(:func:`crew.codec.decode_memory`: the body, its inflated copy and the value's bound). A call
starts only while the reservations of the calls already started leave room for its own under
``limit``, or when no other call holds any (so that any call that fits the ceiling alone
runs in the end). The others wait, in order of delivery, holding only their undecoded
body; the broker keeps every call beyond the prefetch (= concurrency), and the worker lowers
its prefetch while calls wait (:class:`Prefetch`). A call's reservation is released when it
is answered, dropped or requeued (:mod:`crew.calls` admits calls, :mod:`crew.replies` ends
them).

What a task allocates itself is not counted: the ceiling covers what crew holds for calls.
Everything here runs on the worker's loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable, Hashable, Protocol

from .exceptions import CrewError

__all__ = ["MemoryGate", "Prefetch"]


class MemoryGate:
    """Reservations against ``limit`` bytes, and the calls waiting for room."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Bytes reserved by the started calls.
        self.reserved = 0
        self._held: dict[Hashable, int] = {}
        self._waiting: deque[tuple[Hashable, int, Callable[[], None]]] = deque()

    def admit(self, key: Hashable, cost: int, start: Callable[[], None]) -> bool:
        """Reserve ``cost`` bytes for call ``key`` and ``start()`` it, or queue it until
        there is room; True if it started now. ``cost`` must be at most ``limit``."""
        if self._waiting or not self._fits(cost):
            self._waiting.append((key, cost, start))
            return False
        self._reserve(key, cost)
        start()
        return True

    def release(self, key: Hashable) -> None:
        """Call ``key`` is over (or no longer waits): free its bytes, start who now fits."""
        cost = self._held.pop(key, None)
        if cost is None:
            self._waiting = deque(entry for entry in self._waiting if entry[0] != key)
            return
        self.reserved -= cost
        while self._waiting and self._fits(self._waiting[0][1]):
            next_key, next_cost, start = self._waiting.popleft()
            self._reserve(next_key, next_cost)
            start()

    @property
    def started(self) -> int:
        """How many calls hold a reservation."""
        return len(self._held)

    @property
    def waiting(self) -> int:
        """How many calls wait for room."""
        return len(self._waiting)

    def is_waiting(self, key: Hashable) -> bool:
        return any(entry[0] == key for entry in self._waiting)

    def _fits(self, cost: int) -> bool:
        return not self._held or self.reserved + cost <= self.limit

    def _reserve(self, key: Hashable, cost: int) -> None:
        self._held[key] = cost
        self.reserved += cost


class QosChannel(Protocol):
    """What :class:`Prefetch` needs of a task channel (a :class:`crew.amqp.Channel`)."""

    async def qos(self, prefetch_count: int, global_qos: bool = False) -> None: ...


class Prefetch:
    """A worker's prefetch (``concurrency``), lowered while calls wait for memory.

    Lowered to the calls running, the broker keeps the next calls for other workers (or for
    this one, once the waiting calls have started) instead of delivering them here to wait
    too; once no call waits, the worker's own prefetch again.
    """

    def __init__(self, concurrency: int) -> None:
        self._concurrency = concurrency
        #: Set while the channel's prefetch is lowered because calls wait for memory.
        self._holding_back = False
        self._qos_tasks: set[asyncio.Task[None]] = set()

    def hold_back(self, channel: QosChannel | None, gate: MemoryGate) -> None:
        """Calls wait for memory: lower ``channel``'s prefetch to the calls ``gate`` started."""
        if not self._holding_back and channel is not None:
            self._holding_back = True
            self._set(channel, max(1, gate.started))

    def resume(self, channel: QosChannel | None, gate: MemoryGate) -> None:
        """If no call waits for memory in ``gate`` any more: the worker's own prefetch."""
        if self._holding_back and not gate.waiting and channel is not None:
            self._holding_back = False
            self._set(channel, self._concurrency)

    def reset(self) -> None:
        """The channel closed: a new channel starts with the worker's own prefetch."""
        self._holding_back = False

    def _set(self, channel: QosChannel, count: int) -> None:
        async def qos() -> None:
            try:
                await channel.qos(count, global_qos=True)
            except CrewError:  # the channel closed: a new one gets the worker's prefetch
                pass

        # Issued in order on one channel, so the last one set wins.
        task = asyncio.get_running_loop().create_task(qos())
        self._qos_tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._qos_tasks.discard)
