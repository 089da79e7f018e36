"""OpenTelemetry traces (crew[otel]): an in-memory exporter sees the client's span per call and
the worker's child span per job, linked through the call's headers, with their attributes,
statuses and events. The provider is given to client and worker rather than set globally,
so that no other test of the run records spans."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from crew import (Client, ExpirationError, RemoteError, SyncClient, TimeoutError, context,
                  protocol)
from crew.worker import Worker, serve_in_thread
from tests.support.hostile import late_call


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


async def spans(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    """The first ``count`` finished spans (the worker's may end just after the reply)."""
    deadline = time.monotonic() + 10
    while len(exporter.get_finished_spans()) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return list(exporter.get_finished_spans())


def named(found: list[ReadableSpan], name: str) -> ReadableSpan:
    matches = [span for span in found if span.name == name]
    assert len(matches) == 1, [span.name for span in found]
    return matches[0]


@pytest.fixture
def traced(make_worker, provider, uid) -> Any:
    """A worker with sync and async tasks, traced through ``provider``."""
    tracer = provider.get_tracer("the-task")

    def work(n):
        with tracer.start_as_current_span("inside the task"):
            return {"n": n, "headers": dict(context.headers)}

    async def work_async(n):
        with tracer.start_as_current_span("inside the async task"):
            await asyncio.sleep(0)
            return n

    def fail(_):
        raise ValueError("boom")

    def spin(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.01)

    make_worker({f"work.{uid}": work, f"async.{uid}": work_async, f"fail.{uid}": fail,
                 f"spin.{uid}": spin}, concurrency=2, traces=provider, metrics=False)
    return tracer


@pytest.mark.gen_test(timeout=30)
async def test_a_caller_in_a_span_links_up_with_client_worker_and_task(
        traced, provider, exporter, broker_url, uid):
    client = Client(broker_url, traces=provider, metrics=False)
    await client.connect()
    try:
        with traced.start_as_current_span("request") as request:
            result, headers = await client.call(
                f"work.{uid}", 7, headers={"x-request-id": "r1"}, return_headers=True)
            assert await client.call(f"async.{uid}", 8) == 8
    finally:
        await client.close()
    # The trace context is crew's to carry: the task does not see it, nor does it come back.
    assert result == {"n": 7, "headers": {"x-request-id": "r1"}}
    assert headers == {"x-request-id": "r1"}
    found = await spans(exporter, 7)
    call, job = named(found, f"call work.{uid}"), named(found, f"process work.{uid}")
    inside = named(found, "inside the task")
    trace_id = request.get_span_context().trace_id
    assert {span.context.trace_id for span in found} == {trace_id}
    assert call.parent.span_id == request.get_span_context().span_id
    assert job.parent.span_id == call.context.span_id
    assert inside.parent.span_id == job.context.span_id  # current in the job thread
    async_job = named(found, f"process async.{uid}")
    assert named(found, "inside the async task").parent.span_id == async_job.context.span_id
    assert (call.kind, job.kind) == (SpanKind.CLIENT, SpanKind.SERVER)
    correlation_id = call.attributes["messaging.message.conversation_id"]
    for span, operation in ((call, "send"), (job, "process")):
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.destination.name"] == f"crew.tasks.work.{uid}"
        assert span.attributes["messaging.operation.type"] == operation
        assert span.attributes["messaging.message.conversation_id"] == correlation_id
        assert span.attributes["rpc.system"] == "crew"
        assert span.attributes["rpc.method"] == f"work.{uid}"
        assert span.attributes["crew.outcome"] == "ok"
        assert span.status.status_code == StatusCode.UNSET


@pytest.mark.gen_test(timeout=30)
async def test_a_sync_caller_in_a_span_links_up_too(traced, provider, exporter, broker_url,
                                                    uid):
    """SyncClient runs its calls on crew's loop thread, each in its caller's context: each
    request's span (a Flask request's, say) is the parent of its calls', also when many
    threads call at once and the loop starts their calls together."""
    client = SyncClient(broker_url, traces=provider, metrics=False)

    def request(n: int) -> tuple[int, list[Any]]:
        with traced.start_as_current_span(f"wsgi request {n}") as span:
            results = [client.call(f"work.{uid}", n) for _ in range(3)]
            return span.get_span_context().span_id, results

    try:
        lone = await asyncio.to_thread(request, 16)  # lone calls: sent from the thread itself
        requests = await asyncio.gather(*(asyncio.to_thread(request, n) for n in range(16)))
    finally:
        await asyncio.to_thread(client.close)
    requests.append(lone)
    found = await spans(exporter, 17 * (1 + 3 * 3))
    calls = {span.context.span_id: span for span in found if span.name == f"call work.{uid}"}
    jobs = [span for span in found if span.name == f"process work.{uid}"]
    assert len(calls) == len(jobs) == 51
    for n, (_, results) in enumerate(requests):
        assert [r["n"] for r in results] == [n] * 3
    by_request = {request_id: n for n, (request_id, _) in enumerate(requests)}
    for job in jobs:
        assert job.parent.span_id in calls  # each job's parent is its call's span
    # Each request's span is the parent of exactly its own three calls' spans.
    assert sorted(by_request[call.parent.span_id] for call in calls.values()) == sorted(
        list(range(17)) * 3)


@pytest.mark.gen_test(timeout=30)
async def test_remote_error_kill_and_expiry_set_status_and_record_an_event(
        traced, provider, exporter, make_worker, broker_url, uid):
    idle = Worker({f"idle.{uid}": lambda _: None}, broker=broker_url, metrics=False)
    thread = await asyncio.to_thread(serve_in_thread, idle)
    idle.request_stop(grace=0)
    await asyncio.to_thread(thread.join, 10)
    client = Client(broker_url, traces=provider, metrics=False)
    await client.connect()
    try:
        with pytest.raises(RemoteError):
            await client.call(f"fail.{uid}")
        with pytest.raises(TimeoutError):
            await client.call(f"spin.{uid}", 5, expiration=0.5)
        with pytest.raises(ExpirationError):
            await client.call(f"idle.{uid}", expiration=0.3)
    finally:
        await client.close()
    found = await spans(exporter, 5)
    for name, outcome in ((f"call fail.{uid}", "remote_error"),
                          (f"process fail.{uid}", "remote_error"),
                          (f"call spin.{uid}", "killed"), (f"process spin.{uid}", "killed"),
                          (f"call idle.{uid}", "expired")):
        span = named(found, name)
        assert span.status.status_code == StatusCode.ERROR, name
        assert span.attributes["crew.outcome"] == outcome
        assert f"crew.{outcome}" in [event.name for event in span.events], name
    for name in (f"call fail.{uid}", f"process fail.{uid}"):
        exception = next(e for e in named(found, name).events if e.name == "exception")
        assert "boom" in exception.attributes["exception.message"]


@pytest.mark.gen_test(timeout=30)
async def test_a_call_the_worker_never_ran_gets_its_span_too(traced, exporter, broker_url, uid):
    status = await asyncio.to_thread(late_call, broker_url, f"work.{uid}")
    assert status == protocol.STATUS_EXPIRED
    span = named(await spans(exporter, 1), f"process work.{uid}")
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["crew.outcome"] == "expired"
    assert [event.name for event in span.events] == ["crew.expired"]
    assert span.parent is None  # the raw caller sent no trace context
