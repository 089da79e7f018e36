"""Task queues for tests: :func:`idle_task` makes one exist with no worker behind it."""

from __future__ import annotations

from typing import Any

from crew.worker import Worker, serve_in_thread


def idle_task(broker_url: str, task: str, **worker: Any) -> None:
    """Make ``task``'s queue exist with no worker behind it (a worker with ``worker``'s
    options declares it, then stops)."""
    starter = Worker({task: lambda x: x}, broker=broker_url, **worker)
    thread = serve_in_thread(starter)
    starter.request_stop(grace=0)
    thread.join(30)
