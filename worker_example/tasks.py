"""The example's tasks: the article's four (``article/worker.py``), and ``sleep``.

A worker module of one's own is the article's: ``@Task('test')`` on each function and
``run(counter=0)`` at the end. Here each ``@Task`` names a registry of the package's own
instead of crew's default one, so the tasks can be imported without being served and served
beside others; the functions, their names and texts are the article's.
"""

from __future__ import annotations

import threading
import time
from types import MappingProxyType
from typing import Any, Mapping

from crew.worker import Task, TaskRegistry, context

__all__ = ["CHANNEL", "settings", "tasks"]

#: The example's tasks, by name.
tasks = TaskRegistry()
#: What the worker gets as settings (``run(counter=0)`` in the article).
settings: Mapping[str, Any] = MappingProxyType({"counter": 0})
#: The channel the ``publish`` task publishes on; the master's ``/subscribe`` listens there.
CHANNEL = "test"

# Unlike the article's, the counter is locked: with --concurrency above 1 several job
# threads count at once, and += is not atomic.
_counter_lock = threading.Lock()


def _count() -> int:
    with _counter_lock:
        context.settings.counter += 1
        return context.settings.counter


@Task("test", registry=tasks)
def long_task(req: Any) -> str:
    """Count the call and wake Neo up."""
    _count()
    return "Wake up Neo.\n"


@Task("stat", registry=tasks)
def get_counter(req: Any) -> str:
    """Count the call; say which worker answered and how many calls it has served."""
    return f'I\'m worker "{context.settings.uuid}". And I serve {_count()} tasks'


@Task("dead", registry=tasks)
def infinite_loop_task(req: Any) -> None:
    """Never returns by itself: the worker interrupts it at the call's deadline."""
    while True:
        pass


@Task("publish", registry=tasks)
def publish(req: Any) -> None:
    """Publish the argument on :data:`CHANNEL` to every subscribed client (and return
    nothing, as in the article)."""
    context.pubsub.publish(CHANNEL, req)


@Task("sleep", registry=tasks)
def sleep(req: Any) -> float:
    """Sleep ``req`` seconds (default 1); return the seconds slept."""
    seconds = 1.0 if req is None else float(req)
    started = time.monotonic()
    end = started + seconds
    # Short naps rather than one time.sleep(seconds): the worker interrupts a job by raising
    # JobKilled in its thread, which cannot land inside a sleeping C call, only between two.
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))
    return round(time.monotonic() - started, 3)
