"""The example's tasks.

A worker module of one's own is the article's three lines: ``@Task('test')`` on each
function and ``run(counter=0)`` at the end. Here each ``@Task`` names a registry of the
package's own instead of crew's default one, so the tasks can be imported without being
served and served beside others.
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

# With --concurrency above 1 several job threads count at once; += is not atomic.
_counter_lock = threading.Lock()


@Task("test", registry=tasks)
def long_task(req: Any) -> str:
    """Count the call and wake Neo up."""
    with _counter_lock:
        context.settings.counter += 1
    return "Wake up Neo.\n"


@Task("stat", registry=tasks)
def get_counter(req: Any) -> dict[str, Any]:
    """Which worker answered, and how many ``test`` calls it has served."""
    return {"worker": context.settings.uuid, "counter": context.settings.counter}


@Task("dead", registry=tasks)
def infinite_loop_task(req: Any) -> None:
    """Never returns by itself: the worker interrupts it at the call's deadline."""
    while True:
        pass


@Task("publish", registry=tasks)
def publish(req: Any) -> str:
    """Publish the argument on :data:`CHANNEL` to every subscribed client."""
    context.pubsub.publish(CHANNEL, req)
    return "published"


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
