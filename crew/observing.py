"""The one interface through which clients and workers report their calls to metrics and
traces (:mod:`crew.metrics`, :mod:`crew.tracing`), each optional.

:func:`for_client` and :func:`for_worker` return None when neither is on, so that a client
or worker without them pays one attribute check per call. Each is on when its library is
installed, unless turned off: ``metrics=False``/``traces=False`` on the client or worker,
or ``CREW_METRICS=0``/``CREW_TRACES=0`` in the environment (also ``false``, ``no``,
``off``). ``True`` insists (a ``ValueError`` says which extra to install); ``traces`` may
also be an OpenTelemetry ``TracerProvider`` to use instead of the global one.

A worker's observer wraps its task functions (the registry keeps the originals): the
wrapper runs in the job's thread or asyncio task, where it notes the start, the time the
call waited since it was published, and makes the job's span current. The end of every
served call reaches :meth:`WorkerObserver.job_ended` once, from :mod:`crew.replies`.
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from typing import Any, Awaitable, Callable, Mapping, TypeVar

from . import metrics as _metrics
from . import outcomes
from . import tracing as _tracing
from .figures import queue_wait
from .jobs import Job, current_job
from .metrics import ClientMetrics, WorkerMetrics
from .tracing import Tracing

__all__ = ["METRICS_ENV", "TRACES_ENV", "ClientObserver", "WorkerObserver", "for_client",
           "for_worker"]

METRICS_ENV = "CREW_METRICS"
TRACES_ENV = "CREW_TRACES"
_OFF = frozenset({"0", "false", "no", "off"})

T = TypeVar("T")
TaskFunction = Callable[[Any], Any]


def _wanted(choice: object, available: bool, env: str, what: str, extra: str) -> bool:
    """Whether ``what`` is on: ``choice`` None follows the library and ``env``."""
    if not (choice is None or isinstance(choice, bool) or hasattr(choice, "get_tracer")):
        raise TypeError(f"{what}= takes None, True or False, not {type(choice).__name__}")
    if choice is None:
        return available and os.environ.get(env, "").strip().lower() not in _OFF
    if choice is False:
        return False
    if not available:
        raise ValueError(f"{what} need the crew[{extra}] extra: pip install 'crew[{extra}]'")
    return True


def _tracing_for(traces: object) -> Tracing | None:
    if not _wanted(traces, _tracing.AVAILABLE, TRACES_ENV, "traces", "otel"):
        return None
    return Tracing(None if traces is None or traces is True else traces)


class ClientObserver:
    """Records a client's calls: :meth:`call` wraps each."""

    __slots__ = ("_metrics", "_tracing")

    def __init__(self, metrics: ClientMetrics | None, tracing: Tracing | None) -> None:
        self._metrics = metrics
        self._tracing = tracing

    async def call(self, run: Awaitable[T], task: str, started: float, correlation_id: str,
                   headers: dict[str, Any]) -> T:
        """Await ``run``, the call, in its span; ``headers`` (not sent yet) get its context."""
        span = self.start(task, correlation_id, headers)
        try:
            result = await run
        except BaseException as exc:
            self.ended(task, started, exc, span)
            raise
        self.ended(task, started, None, span)
        return result

    def start(self, task: str, correlation_id: str, headers: dict[str, Any]) -> Any:
        """A call begins (its span, if traced, in the current context); ``headers`` (not
        sent yet) get its context. What :meth:`call` does for a call made without a
        coroutine (:mod:`crew.synccall`), with :meth:`ended`."""
        tracing = self._tracing
        return None if tracing is None else tracing.start_call(task, correlation_id, headers)

    def ended(self, task: str, started: float, exc: BaseException | None, span: Any) -> None:
        """The call begun with :meth:`start` (its span ``span``) ended, raising ``exc``."""
        outcome = outcomes.of_exception(exc)
        if self._metrics is not None:
            self._metrics.call_ended(task, outcome, time.monotonic() - started)
        if span is not None:
            Tracing.end(span, outcome, exc)


def for_client(metrics: bool | None, traces: object) -> ClientObserver | None:
    """A client's observer, or None if neither metrics nor traces are on."""
    recorder = ClientMetrics() if _wanted(
        metrics, _metrics.AVAILABLE, METRICS_ENV, "metrics", "metrics") else None
    tracing = _tracing_for(traces)
    if recorder is None and tracing is None:
        return None
    return ClientObserver(recorder, tracing)


class WorkerObserver:
    """Records a worker's jobs: wraps its tasks, hears how each call ended."""

    def __init__(self, metrics: WorkerMetrics | None, tracing: Tracing | None) -> None:
        self._metrics = metrics
        self._tracing = tracing

    def wrap(self, tasks: Mapping[str, TaskFunction]) -> dict[str, TaskFunction]:
        """``tasks`` with each function wrapped to note its job's start and span."""
        return {name: self._wrap(func) for name, func in tasks.items()}

    def _wrap(self, func: TaskFunction) -> TaskFunction:
        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def observed_coroutine(argument: Any) -> Any:
                job = current_job.get()
                span = None if job is None else self._begin(job)
                if span is None:
                    return await func(argument)
                with Tracing.current(span):
                    try:
                        return await func(argument)
                    except Exception as exc:
                        Tracing.task_raised(span, exc)
                        raise
            return observed_coroutine

        @functools.wraps(func)
        def observed(argument: Any) -> Any:
            job = current_job.get()
            span = None if job is None else self._begin(job)
            if span is None:
                return func(argument)
            with Tracing.current(span):
                try:
                    return func(argument)
                except Exception as exc:  # not JobKilled: job_ended says "killed"
                    Tracing.task_raised(span, exc)
                    raise
        return observed

    def _begin(self, job: Job) -> Any:
        """Note that ``job`` starts now; return its span to make current while the task runs
        (None without traces, or with a span that carries no trace context)."""
        now = time.monotonic()
        span = None
        if self._tracing is not None:
            span = self._tracing.start_job(job.task, job.correlation_id, job.headers)
        job.observed = (now, span)
        if self._metrics is not None:
            self._metrics.job_started(job.task, queue_wait(job, now))
        return span if span is not None and Tracing.carries_context(span) else None

    def job_ended(self, job: Job, status: str) -> None:
        """``job``'s call ended with a reply of ``status`` (or was dropped: ``cancelled``;
        handed back to its queue: ``requeued``).

        Called once per call, on the worker's loop or in the job's thread; never raises
        what the loop would have to handle.
        """
        outcome = outcomes.of_status(status)
        started, span = job.observed or (None, None)
        if self._metrics is not None:
            self._metrics.job_ended(
                job.task, outcome, None if started is None else time.monotonic() - started)
        if self._tracing is not None:
            if span is None:  # it never ran: expired, refused or cancelled while waiting
                span = self._tracing.start_job(job.task, job.correlation_id, dict(job.headers))
            Tracing.end(span, outcome)

    def channel_lost(self) -> None:
        """The worker lost its connection or task channel, and connects again."""
        if self._metrics is not None:
            self._metrics.reconnecting()


def for_worker(metrics: bool | None, traces: object,
               gauges: Callable[[], tuple[int, int, bool]], slots: int) -> WorkerObserver | None:
    """A worker's observer, or None if neither metrics nor traces are on. ``gauges()``:
    (calls being served, stuck job threads, stopping), from any thread; ``slots``: its
    concurrency."""
    recorder = WorkerMetrics(gauges, slots) if _wanted(
        metrics, _metrics.AVAILABLE, METRICS_ENV, "metrics", "metrics") else None
    tracing = _tracing_for(traces)
    if recorder is None and tracing is None:
        return None
    return WorkerObserver(recorder, tracing)

