"""Several calls made at once: what :meth:`crew.Client.parallel` returns (internal module;
the class is public as ``crew.Parallel``)."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Protocol

__all__ = ["Caller", "Parallel"]


class Caller(Protocol):
    """What :class:`Parallel` calls through: a :class:`~crew.Client`."""

    @property
    def call(self) -> Callable[..., Awaitable[Any]]: ...


class Parallel:
    """Several calls made at once; :meth:`result` returns their outcomes in call order.

    A failed call puts its exception object in its slot instead of raising. Leaving the
    ``with`` block cancels calls whose results were not awaited, so none leaks.
    """

    def __init__(self, client: Caller) -> None:
        self._client = client
        self._tasks: list[asyncio.Task[Any]] = []

    def call(self, task: str, data: Any = None, **kwargs: Any) -> "asyncio.Task[Any]":
        """Start a call at once (same arguments as :meth:`crew.Client.call`)."""
        started = asyncio.ensure_future(self._client.call(task, data, **kwargs))
        self._tasks.append(started)
        return started

    async def result(self) -> list[Any]:
        """Every call's result or exception, in call order."""
        return list(await asyncio.gather(*self._tasks, return_exceptions=True))

    def __enter__(self) -> "Parallel":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for task in self._tasks:
            if not task.done():
                task.cancel()

    async def __aenter__(self) -> "Parallel":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.__exit__(*exc_info)
