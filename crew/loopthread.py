"""An event loop run by a daemon thread of crew's, and state that belongs to one process
(internal; :class:`crew.SyncClient` uses them).

:class:`LoopThread` runs an asyncio loop in a thread of its own; other threads hand it
coroutines (:meth:`LoopThread.submit`) and wait for each (:class:`Work`).
:meth:`LoopThread.stop` ends it: a coroutine handed over before the stop either runs or is
cancelled, one handed over after it is refused, so no thread is left waiting for something
that nothing will end.

:class:`PerProcess` holds what one process owns (for the synchronous client: the loop
thread and the connection it runs). A process forked after it was made does not own it:
the thread that ran the loop does not exist in the child, and the loop's socket and epoll
descriptors are copies of the parent's, shared with it. So the child *forgets* the
parent's value and makes its own on first use. Forgetting means never touching it: the
child neither writes to the copied socket (an AMQP close frame would close the parent's
connection) nor closes the loop (closing unregisters descriptors from the epoll instance
that parent and child share, which would silence the parent's loop). The old value is kept
referenced for the child's lifetime so that no finalizer runs on it; its few descriptors
close when the child exits, which the broker does not notice while the parent holds its
own copies. Forks through :func:`os.fork` (gunicorn, multiprocessing) are caught by an
:func:`os.register_at_fork` hook, which also replaces the lock (a lock held by another
thread at the moment of the fork would stay held forever in the child); a fork that
bypasses Python's hooks (a C library's ``fork()``) is caught by the process id, checked on
every use.

Not for use under gevent or eventlet monkey-patching: :func:`refuse_green_threads`.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import sys
import threading
import weakref
from typing import Any, Coroutine, Generic, TypeVar

from .exceptions import ConnectionLostError

__all__ = ["LoopThread", "PerProcess", "Work", "refuse_green_threads"]

T = TypeVar("T")

#: What children forked after use inherited from their parent: referenced, never touched.
_INHERITED: list[Any] = []


def refuse_green_threads(who: str) -> None:
    """Raise RuntimeError, saying why, if gevent or eventlet has monkey-patched threads,
    sockets or ``select``: crew's loop thread must be a real thread running asyncio over
    real sockets, and a patched process makes it a greenlet on a patched socket, which
    blocks or never wakes."""
    gevent = sys.modules.get("gevent.monkey")
    eventlet = sys.modules.get("eventlet.patcher")
    patched = []
    if gevent is not None:
        patched += [("gevent", m) for m in ("threading", "socket", "select")
                    if gevent.is_module_patched(m)]
    if eventlet is not None:
        patched += [("eventlet", m) for m in ("thread", "socket", "select")
                    if eventlet.is_monkey_patched(m)]
    if patched:
        library = patched[0][0]
        modules = ", ".join(m for _, m in patched)
        raise RuntimeError(
            f"{who} does not work under {library}'s monkey-patching (patched: {modules}): it "
            "runs the broker connection on an asyncio event loop in a real thread, which "
            f"{library} turns into a greenlet. Use gunicorn's sync or gthread workers "
            "(--threads N) instead of its gevent or eventlet ones, or crew.Client in an "
            "asyncio application.")


class LoopThread:
    """An asyncio event loop run by a daemon thread named ``name``, started at once.

    Other threads hand it coroutines with :meth:`submit`. Submissions that arrive while
    the loop is busy are started together, with one wake-up of the loop, and each
    submitter waits on a plain lock: 1.1 to 2.4 times the hops per second of
    :func:`asyncio.run_coroutine_threadsafe` and a concurrent future, from 1 thread and
    from 64 (``python bench/sync_client.py hop``; docs/BENCHMARKS.md).
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._stopping = False
        self._queued: list[Work] = []
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> "Work":
        """Run ``coro`` on the loop. Raises ConnectionLostError once stopped."""
        work = Work(coro, self.loop)
        with self._lock:
            if self._stopping:
                coro.close()
                raise ConnectionLostError("the client was closed")
            self._queued.append(work)
            if len(self._queued) == 1:  # else a wake-up is on its way already
                self.loop.call_soon_threadsafe(self._start_queued)
        return work

    def _start_queued(self) -> None:
        with self._lock:
            queued, self._queued = self._queued, []
        for work in queued:
            work.start()

    def stop(self, timeout: float) -> bool:
        """Stop the loop (what was submitted and has not ended is cancelled), wait up to
        ``timeout`` for the thread to end; whether it ended."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                if not self.loop.is_closed():
                    self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)
        return not self.thread.is_alive()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # What the stop left (calls submitted just before it, their helpers): cancel it
            # and let it end, so that every submitter gets an answer, as asyncio.run() does.
            self._start_queued()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


class Work:
    """A coroutine handed to a :class:`LoopThread`, as the thread that handed it sees it:
    :meth:`wait` for it, then read its :meth:`outcome`; or :meth:`cancel` it. It runs in a
    copy of the handing thread's context (its ``contextvars``: the current OpenTelemetry
    span of a request, say), as it would have run in that thread."""

    __slots__ = ("_coro", "_loop", "_ended", "_waited", "_task", "_cancelled", "_context")

    def __init__(self, coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop) -> None:
        self._coro: Coroutine[Any, Any, Any] | None = coro
        self._loop = loop
        self._ended = threading.Lock()  # held until the coroutine has ended
        self._ended.acquire()
        self._waited = False
        self._task: asyncio.Task[Any] | None = None
        self._cancelled = False
        self._context = contextvars.copy_context()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the coroutine to end; whether it has."""
        if not self._waited:
            self._waited = self._ended.acquire(timeout=max(0.0, timeout))
        return self._waited

    def outcome(self) -> Any:
        """What the coroutine returned or raised (asyncio.CancelledError if it was cancelled
        or never started); call once :meth:`wait` said it ended."""
        if self._task is None:
            raise asyncio.CancelledError()
        return self._task.result()

    def cancel(self) -> None:
        """Cancel the coroutine (from any thread); it may have ended already."""
        self._cancelled = True
        try:
            self._loop.call_soon_threadsafe(self._cancel_on_loop)
        except RuntimeError:
            pass  # the loop is closed: its stop ended (or cancelled) everything

    def start(self) -> None:
        coro, self._coro = self._coro, None
        if coro is None:
            return
        if self._cancelled:
            coro.close()
            self._ended.release()
            return
        # A task copies the current context: here the handing thread's (create_task's own
        # context argument needs Python 3.11).
        self._task = self._context.run(self._loop.create_task, coro)
        self._task.add_done_callback(self._end)

    def _end(self, _task: "asyncio.Task[Any]") -> None:
        self._ended.release()

    def _cancel_on_loop(self) -> None:
        if self._task is None:
            self.start()  # not started yet: now it never will be
        elif not self._task.done():
            self._task.cancel()


class PerProcess(Generic[T]):
    """A value that belongs to the process that made it; see the module's docstring.

    :meth:`get` returns it in that process only. Make and :meth:`set` it while holding
    :attr:`lock`, which a forked child gets anew.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._value: T | None = None
        self._pid = 0
        _ALL.add(self)

    def get(self) -> T | None:
        """This process's value, or None (never made, popped, or the parent's)."""
        if self._pid != os.getpid():
            if self._value is not None:  # a fork that bypassed the hook
                self._forget()
            return None
        return self._value

    def set(self, value: T) -> None:
        self._value, self._pid = value, os.getpid()

    def pop(self) -> T | None:
        """Take this process's value away (to close it); None if there is none."""
        value = self.get()
        self._value = None
        return value

    def _forget(self) -> None:
        """In a forked child: drop the parent's value without touching it."""
        self.lock = threading.Lock()
        if self._value is not None:
            _INHERITED.append(self._value)
        self._value, self._pid = None, 0


_ALL: "weakref.WeakSet[PerProcess[Any]]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for holder in list(_ALL):
        holder._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)
