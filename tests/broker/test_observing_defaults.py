"""What a user gets without writing any code for metrics or traces, in processes of their
own: without prometheus_client and OpenTelemetry (an import hook makes them unimportable)
crew imports and calls as before; with OpenTelemetry's SDK set up globally by the
application, a call made inside a span links client and worker spans by itself."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.support.processes import ROOT, python_env

WITHOUT_EXTRAS = textwrap.dedent('''
    import asyncio, importlib.abc, os, sys

    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("prometheus_client", "opentelemetry"):
                raise ImportError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, Missing())
    import crew
    from crew import Client, RemoteError, metrics, tracing
    from crew.worker import Worker, serve_in_thread

    def fail(_):
        raise ValueError("boom")

    async def main():
        uid = os.environ["TEST_UID"]
        worker = Worker({f"echo.{uid}": lambda x: x, f"fail.{uid}": fail})
        thread = serve_in_thread(worker)
        client = Client()
        await client.connect()
        result = await client.call(f"echo.{uid}", [1, 2])
        try:
            await client.call(f"fail.{uid}")
        except RemoteError as exc:
            error = exc.type
        refused = []
        for kwargs in ({"metrics": True}, {"traces": True}):
            try:
                Client(**kwargs)
            except ValueError as exc:
                refused.append(str(exc))
        await client.close()
        worker.request_stop(grace=0)
        thread.join(10)
        print(repr((result, error, metrics.AVAILABLE, tracing.AVAILABLE,
                    client.observer, worker._calls.replies.observer, refused,
                    [name for name in sys.modules if name.startswith(("prometheus", "opentel"))])))

    asyncio.run(main())
''')

GLOBAL_PROVIDER = textwrap.dedent('''
    import asyncio, json, os
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # what an application's OpenTelemetry set-up does

    from crew import Client
    from crew.worker import Worker, serve_in_thread

    async def main():
        uid = os.environ["TEST_UID"]
        worker = Worker({f"echo.{uid}": lambda x: x})
        thread = serve_in_thread(worker)
        client = Client()
        await client.connect()
        with trace.get_tracer("app").start_as_current_span("request"):
            await client.call(f"echo.{uid}", 1)
        await client.close()
        worker.request_stop(grace=0)
        thread.join(10)
        print(json.dumps([[s.name, s.context.span_id, s.parent.span_id if s.parent else None,
                           s.context.trace_id] for s in exporter.get_finished_spans()]))

    asyncio.run(main())
''')


def run(script: str, broker_url: str, uid: str) -> str:
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**python_env(broker_url), "TEST_UID": uid})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_crew_calls_without_prometheus_client_and_opentelemetry(broker_url, uid):
    result, error, metrics_on, traces_on, client_observer, worker_observer, refused, loaded = (
        eval(run(WITHOUT_EXTRAS, broker_url, uid)))
    assert (result, error) == ([1, 2], "ValueError")
    assert (metrics_on, traces_on, client_observer, worker_observer) == (False, False, None, None)
    assert refused == ["metrics need the crew[metrics] extra: pip install 'crew[metrics]'",
                       "traces need the crew[otel] extra: pip install 'crew[otel]'"]
    assert loaded == []


def test_a_globally_set_provider_links_caller_client_and_worker(broker_url, uid):
    spans = {name: (span_id, parent, trace_id) for name, span_id, parent, trace_id in
             json.loads(run(GLOBAL_PROVIDER, broker_url, uid))}
    request, call, job = (spans["request"], spans[f"call echo.{uid}"],
                          spans[f"process echo.{uid}"])
    assert call[1] == request[0] and job[1] == call[0]
    assert request[2] == call[2] == job[2]
