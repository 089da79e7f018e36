"""The event loop that will run what a thread schedules before any loop runs (internal).

The article calls ``client.connect()`` at the top level of a script, then
``IOLoop.instance().start()``: the connect must be scheduled on the loop that ``start()``
will run. Tornado 6's ``IOLoop.current()`` wraps the thread's current asyncio loop, made and
set when there is none; :func:`thread_loop` finds the same loop, in plain asyncio terms.

Not for code that runs its loop with ``asyncio.run()``, which makes a loop of its own:
call from inside that loop instead.
"""

from __future__ import annotations

import asyncio
import warnings

__all__ = ["thread_loop"]


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
