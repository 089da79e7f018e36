"""``context``: what a running job can see of its worker and of the call it serves.

- ``context.settings``: the worker's settings (``run()``'s keyword arguments plus ``uuid``
  and ``options``), one object shared by every job of the process; changes persist.
- ``context.headers``: the headers of the call being served, a dict of its own for each
  job; what the task adds travels back with its reply.
- ``context.pubsub.publish(channel, data)``: publish to the subscribers of a channel.
- ``context.deadline``: seconds left before the job is interrupted.

Jobs find their own call through a :class:`contextvars.ContextVar`, so concurrent jobs (in
threads or as coroutines) never see each other's headers. Outside a job, ``settings`` and
``pubsub`` refer to the worker most recently started in this process.
"""

from __future__ import annotations

import contextvars
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .jobs import Job
    from .worker import Worker

__all__ = ["Context", "context"]

current_job: contextvars.ContextVar["Job | None"] = contextvars.ContextVar(
    "crew_current_job", default=None)


class Context:
    """The documented per-process and per-job state; use the ``context`` instance."""

    _worker: "Worker | None" = None

    def _bind(self, worker: "Worker") -> None:
        Context._worker = worker

    def _current_worker(self) -> "Worker":
        job = current_job.get()
        worker = job.worker if job is not None else Context._worker
        if worker is None:
            raise RuntimeError("crew.worker.context is only available once a worker has started")
        return worker

    @property
    def settings(self) -> Any:
        return self._current_worker().settings

    @property
    def pubsub(self) -> Any:
        return self._current_worker().pubsub

    @property
    def headers(self) -> dict[str, Any]:
        job = current_job.get()
        if job is None:
            raise RuntimeError("context.headers is only available inside a job")
        return job.headers

    @property
    def deadline(self) -> float:
        """Seconds left before the job's deadline (negative once it passed)."""
        job = current_job.get()
        if job is None:
            raise RuntimeError("context.deadline is only available inside a job")
        return job.deadline - time.monotonic()


context = Context()
