"""Event-loop helpers (internal): the loop that will run what a thread schedules before any
loop runs, the tasks that nobody awaits, and waiting for the first of several events.

The article calls ``client.connect()`` at the top level of a script, then
``IOLoop.instance().start()``: the connect must be scheduled on the loop that ``start()``
will run. Tornado 6's ``IOLoop.current()`` wraps the thread's current asyncio loop, made and
set when there is none; :func:`thread_loop` finds the same loop, in plain asyncio terms.

Not for code that runs its loop with ``asyncio.run()``, which makes a loop of its own:
call from inside that loop instead.

:class:`Background` keeps the tasks that a client starts and nobody awaits (binds, unbinds,
coroutine callbacks, reconnections) referenced until done, and logs how each one failed.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from typing import Any, Coroutine

from .exceptions import ConnectionLostError

__all__ = ["Background", "first_set", "running_loop", "thread_loop"]


def thread_loop() -> asyncio.AbstractEventLoop:
    """The running loop; else this thread's current loop, which is made and set as current
    when there is none, as Tornado's ``IOLoop.current()`` does."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    with warnings.catch_warnings():
        # With no running loop, get_event_loop() warns on Python 3.12 and 3.13 when it makes
        # the main thread's loop (on 3.10.0-3.10.8 and 3.11.0, always): making it is the
        # point here. Python 3.14 raises instead, as other threads always did.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return asyncio.get_event_loop()
        except RuntimeError:
            pass
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


class Background:
    """Tasks nobody awaits: referenced until done (the loop keeps only weak references to
    tasks, so an unreferenced one can vanish midway), each failure logged once on ``log``.

    ``closing`` is set by the owner while it closes: a failure then is a stop, logged at
    INFO, as is a :class:`~crew.ConnectionLostError` (the lost connection is logged once
    already).
    """

    __slots__ = ("tasks", "closing", "_log")

    def __init__(self, log: logging.Logger) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closing = False
        self._log = log

    def spawn(self, coro: Coroutine[Any, Any, Any], describe: str) -> "asyncio.Task[Any]":
        """Run ``coro`` as a task that is referenced until done and logs its failure."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(lambda done: self._done(done, describe))
        return task

    def _done(self, task: "asyncio.Task[Any]", describe: str) -> None:
        self.tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if self.closing or isinstance(task.exception(), ConnectionLostError):
            self._log.info("%s stopped: %s", describe, task.exception())
        else:
            self._log.error("%s failed", describe, exc_info=task.exception())


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The running loop, or None outside one."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def first_set(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
