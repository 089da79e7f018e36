"""``context``: what a running job can see of its worker and of the call it serves.

- ``context.settings``: the worker's settings (``run()``'s keyword arguments plus ``uuid``
  and ``options``), one object shared by every job of the process; changes persist.
- ``context.headers``: the headers of the call being served, a dict of its own for each
  job; what the task adds travels back with its reply.
- ``context.pubsub.publish(channel, data)``: publish to the subscribers of a channel (a
  :class:`Publisher`, which hands the message to the worker's loop).
- ``context.deadline``: seconds left before the job is interrupted.

Jobs find their own call through :data:`crew.jobs.current_job`, a
:class:`contextvars.ContextVar`, so concurrent jobs (in threads or as coroutines) never see
each other's headers; a job holds the :class:`~crew.jobs.Scope` (settings and publisher) of
the worker serving it, never the worker itself. Outside a job, ``settings`` and ``pubsub``
refer to the scope of the worker most recently started in this process: module state, set
by :meth:`Context._bind` when a worker starts.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from . import codec, validation
from .jobs import Publishes, Scope, current_job

__all__ = ["Context", "Publisher", "context"]


class Context:
    """The documented per-process and per-job state; use the ``context`` instance."""

    #: The scope of the worker most recently started in this process (None before any).
    _scope: Scope | None = None

    def _bind(self, scope: Scope) -> None:
        """Make ``scope`` what ``settings`` and ``pubsub`` mean outside a job."""
        Context._scope = scope

    def _current_scope(self) -> Scope:
        job = current_job.get()
        scope = job.scope if job is not None else Context._scope
        if scope is None:
            raise RuntimeError("crew.worker.context is only available once a worker has started")
        return scope

    @property
    def settings(self) -> Any:
        return self._current_scope().settings

    @property
    def pubsub(self) -> Publishes:
        return self._current_scope().pubsub

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


class Publisher:
    """``context.pubsub``: publishes to pubsub channels from any thread of the worker."""

    def __init__(self, send: Callable[[str, bytes, str | None], None]) -> None:
        #: ``send(channel, body, encoding)``: hands an encoded message to the worker's loop.
        self._send = send

    def publish(self, channel: str, data: Any = None) -> None:
        """Send ``data`` to every client subscribed to ``channel`` (fire and forget).

        Safe from job threads and ``async`` tasks alike: the message is encoded here and
        handed to the worker's loop, which owns the connection, so it goes out before the
        reply of the job that published it. Raises :class:`~crew.EncodeError` for data
        that cannot be sent and :class:`~crew.ConnectionLostError` once the worker stopped;
        a message published while the connection is down is dropped (and logged).
        """
        validation.validate_channel(channel)
        body, encoding = codec.encode(data)
        self._send(channel, body, encoding)


context = Context()
