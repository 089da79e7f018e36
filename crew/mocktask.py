"""Stand-in tasks for tests (:mod:`crew.testing`'s ``mock_task``): answer as told, record
every call.

A :class:`MockTask` is the function a real worker serves under the task's name, on the real
broker, so the caller goes through everything a real call does (encoding, headers,
priorities, deadlines, errors as data). It is an ``async def`` task: it runs on the
worker's event loop, and its ``delay`` ends when the call's deadline passes or its caller
cancels it. ``side_effect`` functions run there too: keep them quick (use ``delay`` for a
slow task). Calls are recorded on the worker's thread and read on the test's: the record is
kept under a lock, and :meth:`MockTask.wait_for_calls` waits for calls without polling.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

from .jobs import current_job

__all__ = ["MockCall", "MockTask"]

#: "Not given": ``returns=None`` is a value to return.
_UNSET: Any = object()


@dataclass(frozen=True)
class MockCall:
    """One call a :class:`MockTask` received."""

    #: The call's argument, decoded (as the task sees it: tuples arrive as lists).
    data: Any
    #: The caller's headers (crew's own ``crew-*`` headers left out, as ``context.headers``).
    headers: dict[str, Any]
    #: The priority the caller sent (0-255; 0 when none).
    priority: int
    #: The call's deadline, in seconds since the epoch (``time.time()``'s clock).
    deadline: float


class MockTask:
    """A stand-in task: answers with ``side_effect``, else raises ``raises``, else returns
    ``returns``, after ``delay`` seconds; records every call in :attr:`calls`.

    ``side_effect``: an exception (class or instance) to raise; a function called with the
    call's argument, whose result (awaited if it is awaitable) is returned; or an iterable,
    whose next item each call returns (or raises, if it is an exception). The attributes may
    be changed while the worker serves: each call reads them when it arrives.
    """

    def __init__(self, name: str, *, returns: Any = _UNSET, raises: Any = None,
                 delay: float = 0.0, side_effect: Any = None) -> None:
        given = [what for what, value in (("returns", returns), ("raises", raises),
                                          ("side_effect", side_effect))
                 if value is not _UNSET and value is not None]
        if len(given) > 1:
            raise ValueError(f"mock_task {name!r}: give one of returns, raises and "
                             f"side_effect, not {' and '.join(given)}")
        if raises is not None and not _is_exception(raises):
            raise TypeError(f"mock_task {name!r}: raises must be an exception class or "
                            f"instance, got {raises!r}")
        if not delay >= 0:
            raise ValueError(f"mock_task {name!r}: delay must be >= 0 seconds, got {delay!r}")
        self.name = name
        self.returns = None if returns is _UNSET else returns
        self.raises = raises
        self.delay = float(delay)
        self.side_effect = side_effect
        self._calls: list[MockCall] = []
        self._changed = threading.Condition()

    @property
    def side_effect(self) -> Any:
        return self._side_effect

    @side_effect.setter
    def side_effect(self, effect: Any) -> None:
        self._side_effect = iter(effect) if _is_iterable(effect) else effect

    @property
    def calls(self) -> list[MockCall]:
        """Every call received so far, oldest first (a copy)."""
        with self._changed:
            return list(self._calls)

    @property
    def call_count(self) -> int:
        with self._changed:
            return len(self._calls)

    @property
    def last_call(self) -> MockCall:
        """The latest call; :class:`AssertionError` if none came."""
        calls = self.calls
        if not calls:
            raise AssertionError(f"mock task {self.name!r} was not called")
        return calls[-1]

    def wait_for_calls(self, count: int = 1, timeout: float = 10.0) -> list[MockCall]:
        """Wait until ``count`` calls came (for calls made in the background), and return
        them; :class:`AssertionError` if they did not come within ``timeout`` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._calls) >= count, timeout):
                raise AssertionError(f"mock task {self.name!r} got {len(self._calls)} "
                                     f"call(s) in {timeout} s, not {count}")
            return list(self._calls)

    async def run(self, data: Any) -> Any:
        """The task the worker serves (a coroutine function, so it runs on the loop)."""
        self._record(data)
        if self.delay:
            await asyncio.sleep(self.delay)
        return await self._answer(data)

    def _record(self, data: Any) -> None:
        job = current_job.get()
        if job is None:
            raise RuntimeError(f"mock task {self.name!r} was called outside a worker")
        call = MockCall(data, dict(job.headers), job.priority,
                        time.time() + (job.deadline - time.monotonic()))
        with self._changed:
            self._calls.append(call)
            self._changed.notify_all()

    async def _answer(self, data: Any) -> Any:
        effect = self.side_effect
        if effect is None:
            if self.raises is not None:
                raise _fresh(self.raises)
            return self.returns
        if isinstance(effect, Iterator):
            effect = next(effect, _UNSET)
            if effect is _UNSET:
                raise RuntimeError(f"mock task {self.name!r}: side_effect has no item left for "
                                   f"call {self.call_count}")
            if _is_exception(effect):
                raise _fresh(effect)
            return effect
        if _is_exception(effect):
            raise _fresh(effect)
        result = effect(data)
        return await result if inspect.isawaitable(result) else result

    def __repr__(self) -> str:
        return f"<MockTask {self.name!r}: {self.call_count} call(s)>"


def _is_exception(value: Any) -> bool:
    return isinstance(value, BaseException) or (
        isinstance(value, type) and issubclass(value, BaseException))


def _fresh(error: Any) -> BaseException:
    """``error`` to raise again: an instance without the traceback of its last raise (each
    call's traceback would pile onto it), or the class, instantiated."""
    return error.with_traceback(None) if isinstance(error, BaseException) else error()


def _is_iterable(value: Any) -> bool:
    return (value is not None and not callable(value) and not _is_exception(value)
            and not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"))
