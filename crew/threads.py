"""Raising an exception inside another thread: the one place crew uses ``ctypes``.

CPython checks for an asynchronous exception between bytecodes, so :func:`interrupt` stops
pure-Python code within about a millisecond. It does **not** interrupt a thread blocked in C:
``time.sleep``, socket reads, ``Lock.acquire``, ``Event.wait``, ``subprocess.run``, long C
loops (the exception lands when the call returns, if ever), nor code that catches
``BaseException`` and carries on. The worker therefore never waits for an interrupted job:
it answers the caller at the deadline, frees the slot for a fresh thread, and counts the stuck
thread; past a limit it drains and exits so a supervisor can start a fresh process
(see :mod:`crew.pool`).

An exception sent just as the job returns could land later in the worker's own code
(CPython issue 139622); :class:`Interruptible` sends it only while the job is running, under
a lock, and clears a pending one when the job ends.
"""

from __future__ import annotations

import ctypes
import threading

__all__ = ["Interruptible"]

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int
# The same C function typed to take NULL, which clears a pending exception
# (py_object(None) would pass Py_None, which is not an exception).
_clear_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))


def _send(thread_id: int, exc_type: type[BaseException] | None) -> bool:
    """Set (or with None, clear) the pending async exception of a thread; True if found."""
    # The thread id must go as c_ulong: a plain int is truncated and the call silently misses.
    if exc_type is None:
        return bool(_clear_async_exc(ctypes.c_ulong(thread_id), None) == 1)
    found: int = _set_async_exc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))
    if found > 1:  # cannot happen for a valid id; undo as CPython's docs ask
        _clear_async_exc(ctypes.c_ulong(thread_id), None)
        return False
    return found == 1


class Interruptible:
    """One piece of work, run by one thread, that the loop may give up on at any moment.

    States: ``pending`` -> ``running`` -> ``ended``, and ``abandoned`` from the first two.
    The worker thread calls :meth:`begin` before the work and :meth:`end` right after it;
    the loop calls :meth:`abandon` when the deadline passes or the call is cancelled. The
    lock makes "send the exception" and "the work ended" mutually exclusive.

    The exception can land at any bytecode from the moment :meth:`begin` marked the work
    running (before :meth:`begin` even returns) until :meth:`end` has run, including on the
    call of :meth:`end` itself, before its own ``try``. So the thread calls :meth:`begin`,
    runs the work *and* calls :meth:`end` inside one ``try``, and calls :meth:`end` again in
    its ``except exc_type`` (only one exception is ever sent, so the second call is safe)::

        try:
            if watch.begin():
                try:
                    work()
                except exc_type:
                    ...
                abandoned = watch.end(exc_type)
        except exc_type:
            abandoned = watch.end(exc_type)
    """

    __slots__ = ("_lock", "_thread_id", "state", "interrupted")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread_id: int | None = None
        self.state = "pending"
        #: True once :meth:`abandon` raised the exception in the running thread.
        self.interrupted = False

    def begin(self) -> bool:
        """Mark the work running in this thread; False if it was abandoned before it began."""
        with self._lock:
            if self.state != "pending":
                return False
            self._thread_id = threading.get_ident()
            self.state = "running"
            return True

    def abandon(self, exc_type: type[BaseException]) -> str:
        """Give up on the work; return the state it was in (``pending``, ``running``, ...).

        Running work gets ``exc_type`` raised in its thread. Ended work is left alone: its
        outcome is on its way.
        """
        with self._lock:
            previous = self.state
            if previous == "running" and self._thread_id is not None:
                self.interrupted = _send(self._thread_id, exc_type)
            if previous in ("pending", "running"):
                self.state = "abandoned"
            return previous

    def end(self, exc_type: type[BaseException]) -> bool:
        """Mark the work over; True if it was abandoned meanwhile (drop its outcome).

        Call it in the work's thread right after the work. It absorbs the exception should
        it land here, and clears one still pending, so nothing reaches the code after it.
        """
        while True:
            try:
                with self._lock:
                    abandoned = self.state == "abandoned"
                    if not abandoned:
                        self.state = "ended"
                    elif self.interrupted and self._thread_id is not None:
                        # No new exception can be sent now; drop the one that may be pending.
                        _send(self._thread_id, None)
                return abandoned
            except exc_type:
                continue
