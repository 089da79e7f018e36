"""OpenTelemetry spans of crew's calls and jobs: the optional ``crew[otel]`` extra.

Without ``opentelemetry-api`` this module still imports (:data:`AVAILABLE` is False) and
nothing in it may be used. With it, a client makes a ``CLIENT`` span per call, a child of
whatever span is current where ``call()`` is awaited (a request instrumented by
OpenTelemetry: no code of the user's), and writes its context into the call's headers
with the global propagator (W3C ``traceparent``/``tracestate`` by default). The worker
reads them back and makes a ``SERVER`` span per job, a child of the caller's, which is the
current span while the task runs (in its job thread, or its asyncio task), so the task's own
spans nest under it. Both carry the messaging and RPC semantic conventions' attributes.

A failed call or job sets its span's status to ERROR and records an event: the remote
exception (``exception``), or ``crew.<outcome>`` (``crew.killed``, ``crew.expired``, ...).
The API alone records nothing: spans need an SDK's tracer provider, set globally by the
application (or given to the client or worker, as tests do).

The OpenTelemetry API is imported by the first :class:`Tracing` (a client or worker with
traces on), never by ``import crew``: it takes tens of milliseconds, which a process
without traces should not pay. :data:`AVAILABLE` only finds it.
"""

from __future__ import annotations

import importlib.util
import sys
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from . import outcomes, protocol
from .exceptions import RemoteError

if TYPE_CHECKING:  # at run time, the first Tracing imports them: see _import()
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

__all__ = ["AVAILABLE", "Tracing"]


def _installed() -> bool:
    """Whether the OpenTelemetry API is installed: found, not imported (nor is the namespace
    package ``opentelemetry`` that it shares with other distributions)."""
    try:
        namespace = importlib.util.find_spec("opentelemetry")
        places = list(namespace.submodule_search_locations or ()) if namespace else []
        return bool(places) and any(finder.find_spec("opentelemetry.trace", places)
                                    for finder in sys.meta_path)
    except ImportError:  # an import hook refused it
        return False


def _import() -> None:
    """Import the OpenTelemetry API's names that this module uses into its globals."""
    global propagate, trace, SpanKind, Status, StatusCode
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode


AVAILABLE = _installed()
#: Outcomes that are not failures of the call: its span's status stays unset.
_NOT_ERRORS = frozenset({outcomes.OK, outcomes.CANCELLED, outcomes.REQUEUED})


class Tracing:
    """Makes the spans of one client or worker, through ``provider`` (an OpenTelemetry
    ``TracerProvider``; None: the global one, looked up at each span)."""

    def __init__(self, provider: Any = None) -> None:
        _import()  # before any span: the static methods below take spans
        self._tracer = trace.get_tracer("crew", tracer_provider=provider)

    # --- the client --------------------------------------------------------------------

    def start_call(self, task: str, correlation_id: str, headers: dict[str, Any]) -> Any:
        """A call's span, child of the current one; its context goes into ``headers``."""
        span = self._tracer.start_span(f"call {task}", kind=SpanKind.CLIENT)
        if span.is_recording():
            span.set_attributes(_attributes(task, correlation_id, "send", "call"))
        if span.get_span_context().is_valid:  # else there is nothing to pass on
            propagate.inject(headers, context=trace.set_span_in_context(span))
        return span

    # --- the worker --------------------------------------------------------------------

    def start_job(self, task: str, correlation_id: str, headers: dict[str, Any]) -> Any:
        """A job's span, child of the caller's span (from ``headers``, whose trace fields
        are taken out: they are not the task's, and do not go back with the reply)."""
        parent = propagate.extract(headers)
        for field in propagate.get_global_textmap().fields:
            headers.pop(field, None)
        span = self._tracer.start_span(f"process {task}", context=parent, kind=SpanKind.SERVER)
        if span.is_recording():
            span.set_attributes(_attributes(task, correlation_id, "process", "process"))
        return span

    @staticmethod
    def carries_context(span: Any) -> bool:
        """Whether ``span`` has a trace context (not the no-op span of an API without an
        SDK and without a caller's context): only then is it worth making current."""
        return bool(span.get_span_context().is_valid)

    @staticmethod
    def current(span: Any) -> AbstractContextManager[Any]:
        """Makes ``span`` the current span in this thread or task, for the task's code."""
        return trace.use_span(span, end_on_exit=False, record_exception=False,
                              set_status_on_exception=False)

    @staticmethod
    def task_raised(span: Any, exc: BaseException) -> None:
        """The task raised ``exc``: recorded as the span's ``exception`` event."""
        span.record_exception(exc)

    # --- both ----------------------------------------------------------------------------

    @staticmethod
    def end(span: Any, outcome: str, error: BaseException | str | None = None) -> None:
        """End ``span``: status and event by ``outcome``, ``error`` its exception or text."""
        if not span.is_recording():
            return  # a no-op span (no SDK, or not sampled): nothing to write, nothing to end
        span.set_attribute("crew.outcome", outcome)
        if outcome not in _NOT_ERRORS:
            span.set_attribute("error.type", outcome)
            span.set_status(Status(StatusCode.ERROR, str(error or outcome)))
        if isinstance(error, RemoteError):
            span.record_exception(error, attributes={"crew.remote.type": error.type})
        if outcome != outcomes.OK:
            span.add_event(f"crew.{outcome}", {"message": str(error or outcome)})
        span.end()


def _attributes(task: str, correlation_id: str, operation: str,
                name: str) -> dict[str, str]:
    """The messaging (RabbitMQ) and RPC semantic conventions' attributes of a span."""
    queue = protocol.task_queue(task)
    return {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": queue,
        "messaging.rabbitmq.destination.routing_key": queue,
        "messaging.operation.type": operation,
        "messaging.operation.name": name,
        "messaging.message.conversation_id": correlation_id,
        "messaging.message.id": correlation_id,
        "rpc.system": "crew",
        "rpc.method": task,
    }
