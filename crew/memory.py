"""A worker's memory ceiling: bytes reserved by the calls it decodes and runs (internal).

Each call reserves, before it is decoded, the most its decoding can hold at once
(:func:`crew.codec.decode_memory`: the body, its inflated copy and the value's bound). A call
starts only while the reservations of the calls already started leave room for its own under
``limit``, or when no other call holds any (so that any call that fits the ceiling alone
runs in the end). The others wait, in order of delivery, holding only their undecoded
body; the worker holds at most ``concurrency`` calls, and consumes nothing while calls
wait for memory, so the broker keeps the next ones for other workers (:mod:`crew.intake`).
A call's reservation is released when it is answered, dropped or requeued (:mod:`crew.calls`
admits calls, :mod:`crew.replies` ends them).

What a task allocates itself is not counted: the ceiling covers what crew holds for calls.
Everything here runs on the worker's loop.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Hashable

__all__ = ["MemoryGate"]


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
