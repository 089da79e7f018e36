"""What metrics and traces cost a call: crew's echo with each observer set-up, side by side.

One worker process per set-up (concurrency 64) and one caller process that alternates
between set-ups in rounds, so every set-up meets the same machine and broker state:

- ``off``: ``metrics=False, traces=False`` on both sides: the code path of a crew without the
  extras installed (one attribute check per call);
- ``metrics``: prometheus_client on both sides;
- ``metrics+otel api``: and OpenTelemetry's API with no SDK configured (non-recording spans:
  what ``pip install crew[metrics,otel]`` costs before the application sets up tracing);
- ``metrics+otel sdk``: and an SDK tracer provider that records every span (and hands it to
  an exporter that drops it: the cost of crew's spans, not of shipping them).

Figures, medians over rounds: calls/s of 100-byte echo calls made one after another
(``sequential``) and with 64 in flight (``64 in flight``), each as a ratio to ``off``; and
the CPU time per call of the caller and of the worker (µs, from /proc), which other load on
the machine disturbs far less than calls/s: the difference to ``off`` is the set-up's cost.

``--micro`` measures instead what the observers alone add to a call, in this process and
without a broker: the client's around a call that is already answered, the worker's around
a job of a task that returns at once (its wrapper and the end of the call), in µs per call.
At a few µs this is below the noise of a loaded machine's calls/s, so both are printed.

``python3 bench/observing.py [--rounds N] [--calls N] [--micro]`` (``$BENCH_URL``, else the
local broker's default vhost).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any, Sequence

import common  # noqa: F401 - puts the repository on sys.path
from common import URL, cpu_seconds, plan_calls, ready_until_signal

import crew

SETUPS = ("off", "metrics", "metrics+otel api", "metrics+otel sdk")
IN_FLIGHT = 64


def observers(setup: str) -> dict[str, Any]:
    """The ``metrics=`` and ``traces=`` of a client or worker for ``setup``."""
    if setup == "off":
        return {"metrics": False, "traces": False}
    if setup == "metrics":
        return {"metrics": True, "traces": False}
    if setup == "metrics+otel api":
        return {"metrics": True, "traces": True}
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Drop()))
    return {"metrics": True, "traces": provider}


def echo(data: Any) -> Any:
    return data


async def serve(setup: str, task: str) -> None:
    worker = crew.Worker({task: echo}, broker=URL, concurrency=IN_FLIGHT, **observers(setup))
    await worker.start()
    await ready_until_signal()
    await worker.stop(grace=0)


async def sequential(client: crew.Client, task: str, calls: int) -> float:
    data = b"x" * 100
    started = time.perf_counter()
    for _ in range(calls):
        await client.call(task, data, persistent=False)
    return calls / (time.perf_counter() - started)


async def in_flight(client: crew.Client, task: str, calls: int) -> float:
    data = b"x" * 100

    async def loop(count: int) -> None:
        for _ in range(count):
            await client.call(task, data, persistent=False)

    started = time.perf_counter()
    await asyncio.gather(*(loop(n) for n in plan_calls(calls, IN_FLIGHT)))
    return calls / (time.perf_counter() - started)


FIGURES = ("sequential", "sequential client us", "sequential worker us", "64 in flight",
           "64 in flight client us", "64 in flight worker us")


async def measure(tasks: dict[str, str], pids: dict[str, int], rounds: int,
                  calls: int) -> dict[str, Any]:
    clients = {setup: crew.Client(URL, **observers(setup)) for setup in SETUPS}
    for client in clients.values():
        await client.connect()
    figures: dict[str, dict[str, list[float]]] = {
        setup: {figure: [] for figure in FIGURES} for setup in SETUPS}
    try:
        for setup in SETUPS:  # warm up every path once
            await in_flight(clients[setup], tasks[setup], IN_FLIGHT * 4)
        for round_ in range(rounds):
            order = SETUPS[round_ % len(SETUPS):] + SETUPS[:round_ % len(SETUPS)]
            for setup in order:
                for workload, run, count in (("sequential", sequential, calls),
                                             ("64 in flight", in_flight, calls * 4)):
                    got = figures[setup]
                    worker, me = cpu_seconds(pids[setup]), cpu_seconds(os.getpid())
                    got[workload].append(await run(clients[setup], tasks[setup], count))
                    got[f"{workload} client us"].append(
                        1e6 * (cpu_seconds(os.getpid()) - me) / count)
                    got[f"{workload} worker us"].append(
                        1e6 * (cpu_seconds(pids[setup]) - worker) / count)
    finally:
        for client in clients.values():
            await client.close()
    return {setup: {figure: statistics.median(values) for figure, values in done.items()}
            for setup, done in figures.items()}


def table(medians: dict[str, Any]) -> str:
    lines = []
    for workload in ("sequential", "64 in flight"):
        lines += [f"| {workload} | calls/s | ratio | client CPU us/call | worker CPU us/call |",
                  "|---|---|---|---|---|"]
        base = medians["off"]
        for setup, got in medians.items():
            lines.append(f"| {setup} | {got[workload]:.0f} | "
                         f"{got[workload] / base[workload]:.2f} | "
                         f"{got[f'{workload} client us']:.0f} | "
                         f"{got[f'{workload} worker us']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def micro(calls: int, rounds: int) -> None:
    """What each set-up's observers add to a call, in µs: the median of ``rounds``."""
    from crew import observing, protocol
    from crew.jobs import Job, current_job

    async def answered() -> tuple[Any, dict[str, Any]]:
        return None, {}

    async def client_side(observer: Any) -> float:
        started = time.perf_counter()
        for _ in range(calls):
            run = answered()
            if observer is not None:  # as Client.call does
                run = observer.call(run, "task", time.monotonic(), "c.1", {})
            await run
        return (time.perf_counter() - started) / calls * 1e6

    def worker_side(observer: Any) -> float:
        task = observer.wrap({"task": echo})["task"] if observer else echo
        job = Job(None, "task", task, 1, "c.1", "reply", None, None, b"", {},
                  time.monotonic() + 60)
        job.ttl = "60000"
        token = current_job.set(job)
        started = time.perf_counter()
        for _ in range(calls):
            job.observed = None
            task(None)
            if observer is not None:  # as Replies does
                observer.job_ended(job, protocol.STATUS_OK)
        current_job.reset(token)
        return (time.perf_counter() - started) / calls * 1e6

    print("| set-up | client observer us/call | worker observer us/call |\n|---|---|---|")
    for setup in SETUPS:
        kwargs = observers(setup)
        client = observing.for_client(kwargs["metrics"], kwargs["traces"])
        worker = observing.for_worker(kwargs["metrics"], kwargs["traces"],
                                      lambda: (0, 0, False), 1)
        client_us = statistics.median(asyncio.run(client_side(client)) for _ in range(rounds))
        worker_us = statistics.median(worker_side(worker) for _ in range(rounds))
        print(f"| {setup} | {client_us:.1f} | {worker_us:.1f} |")


def main() -> None:
    global SETUPS
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        asyncio.run(serve(sys.argv[2], sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000,
                        help="sequential calls per round (four times as many in flight)")
    parser.add_argument("--micro", action="store_true", help="the observers alone, in us")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help="comma-separated, among: %(default)s (off always runs)")
    options = parser.parse_args()
    SETUPS = tuple(s for s in SETUPS if s == "off" or s in options.setups.split(","))
    if options.micro:
        micro(options.calls * 10, options.rounds)
        return
    run_id = uuid.uuid4().hex[:8]
    tasks = {setup: f"bench.observing.{run_id}.{n}" for n, setup in enumerate(SETUPS)}
    workers = [subprocess.Popen([sys.executable, __file__, "worker", setup, tasks[setup]],
                                stdout=subprocess.PIPE, text=True) for setup in SETUPS]
    try:
        for worker in workers:
            assert worker.stdout is not None and "READY" in worker.stdout.readline()
        pids = {setup: worker.pid for setup, worker in zip(SETUPS, workers, strict=True)}
        medians = asyncio.run(measure(tasks, pids, options.rounds, options.calls))
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(30)
        delete_queues(list(tasks.values()))
    print(json.dumps(medians, indent=1))
    print(table(medians))
    print(f"{os.cpu_count()} CPUs, {options.rounds} rounds, python {sys.version.split()[0]}")


def delete_queues(tasks: list[str]) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    for task in tasks:
        channel.queue_delete(crew.protocol.task_queue(task))
    connection.close()


if __name__ == "__main__":
    main()
