"""crew: a ``crew.Worker`` serving an echo task (worker_example style, a plain ``def``) and a
``crew.Client`` calling it, transient (``persistent=False``) or with crew's defaults.

The worker also serves ``spin`` (``while True: pass``), which the deadline workload calls
with a short expiration to see how late :class:`crew.TimeoutError` comes; calls to a task
whose queue has no consumer show how late :class:`crew.ExpirationError` comes.

With ``"url"`` in their orders, worker and caller connect there instead of ``$BENCH_URL``
(a rate-limited link, bench/link.py); with ``"link"``, the caller runs the 1 MB workloads
of the link only.

``python bench/crew_rpc.py worker|caller|turns '<orders as JSON>'`` (``bench/run.py`` does it;
``turns``: the sequential workload, in turns with the other systems, see common.Turns).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import common  # puts the repository on sys.path
import experiments
import pika
from common import (LARGE_BYTES, PREFETCH, SMALL_BYTES, URL, Recorder, Turns,
                    ready_until_signal, compressible_text, link_workload, orders, plan_calls,
                    random_bytes, rss_mib)
from raw_rpc import record_memory

import crew
from crew import protocol

#: Expiration of the calls whose lateness the deadline workload measures.
DEADLINE_S = 0.2


def echo(data: Any) -> Any:
    return data


async def async_echo(data: Any) -> Any:
    return data


def spin(_data: Any) -> None:
    while True:
        pass


async def serve(spec: dict[str, Any]) -> None:
    task = async_echo if "asyncecho" in spec.get("patches", []) else echo
    worker = crew.Worker({spec["task"]: task, spec["spin"]: spin}, broker=spec.get("url", URL),
                         concurrency=spec["concurrency"])
    await worker.start()
    await ready_until_signal()
    await worker.stop(grace=0)


async def sequential(client: crew.Client, task: str, data: Any, calls: int,
                     persistent: bool) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await client.call(task, data, persistent=persistent)
        samples.append(time.perf_counter() - started)
    return samples


async def in_flight(client: crew.Client, task: str, data: Any, calls: int,
                    persistent: bool) -> None:
    async def loop(count: int) -> None:
        for _ in range(count):
            await client.call(task, data, persistent=persistent)

    await asyncio.gather(*(loop(n) for n in plan_calls(calls, PREFETCH)))


async def lateness(client: crew.Client, task: str, calls: int,
                   error: type[BaseException]) -> list[float]:
    """Seconds between each call's deadline and the moment its ``error`` arrived."""
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        try:
            await client.call(task, None, expiration=DEADLINE_S, persistent=False)
        except error:
            samples.append(time.perf_counter() - (started + DEADLINE_S))
        else:
            raise RuntimeError(f"a call to {task} did not fail with {error.__name__}")
    return samples


async def one_workload(client: crew.Client, task: str, workload: str, calls: int,
                       persistent: bool) -> None:
    if workload == "inflight":
        await in_flight(client, task, random_bytes(SMALL_BYTES), calls, persistent)
        return
    data = {"seq": lambda: random_bytes(SMALL_BYTES), "random": lambda: random_bytes(LARGE_BYTES),
            "text": lambda: compressible_text(LARGE_BYTES)}[workload]()
    await sequential(client, task, data, calls, persistent)


def declare_idle_queue(task: str) -> None:
    """The queue of a task that no worker serves, declared as crew's workers declare it."""
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    connection.channel().queue_declare(
        protocol.task_queue(task), durable=True,
        arguments=protocol.task_queue_arguments(protocol.DEFAULT_QUEUE_MAX_PRIORITY))
    connection.close()


async def link_workloads(client: crew.Client, task: str, persistent: bool, rec: Recorder,
                         link: dict[str, Any]) -> None:
    """1 MB of random bytes, then of text, through the link: one call to warm up, then
    ``link["calls"]`` measured."""
    for kind, data in (("random", random_bytes(LARGE_BYTES)),
                       ("text", compressible_text(LARGE_BYTES))):
        workload = link_workload(kind, link["mbit"])
        await sequential(client, task, data, 1, persistent)
        mark, started = rec.cpu_mark(), time.perf_counter()
        await sequential(client, task, data, link["calls"], persistent)
        rec.throughput(workload, started, link["calls"])
        rec.cpu(workload, mark, link["calls"])


async def call_all(spec: dict[str, Any]) -> Recorder:
    rec = Recorder(spec.get("worker_pid"), spec.get("link", {}).get("pid"))
    task, persistent, warmup = spec["task"], spec["persistent"], spec["warmup"]
    small = random_bytes(SMALL_BYTES)
    client = crew.Client(spec.get("url", URL))
    await client.connect()
    try:
        if spec.get("link"):
            await link_workloads(client, task, persistent, rec, spec["link"])
            return rec
        if spec.get("memory"):
            mem = spec["memory"]
            await in_flight(client, task, small, mem["warmup"], persistent)
            before = rss_mib(rec.worker_pid), rss_mib(os.getpid())
            await in_flight(client, task, small, mem["calls"], persistent)
            after = rss_mib(rec.worker_pid), rss_mib(os.getpid())
            record_memory(rec, mem["calls"], before, after)
            return rec
        await in_flight(client, task, small, warmup, persistent)
        await sequential(client, task, small, warmup, persistent)
        if spec.get("workload"):  # bench/profile_crew.py: one workload, nothing measured
            await one_workload(client, task, spec["workload"], spec["calls"], persistent)
            return rec
        mark, started = rec.cpu_mark(), time.perf_counter()
        await in_flight(client, task, small, spec["inflight_calls"], persistent)
        rec.throughput("64 in flight 100 B", started, spec["inflight_calls"])
        rec.cpu("64 in flight 100 B", mark, spec["inflight_calls"])
        for workload, data in (("1 MB random", random_bytes(LARGE_BYTES)),
                               ("1 MB text", compressible_text(LARGE_BYTES))):
            await sequential(client, task, data, max(1, warmup // 20), persistent)
            mark, started = rec.cpu_mark(), time.perf_counter()
            await sequential(client, task, data, spec["large"], persistent)
            rec.throughput(workload, started, spec["large"])
            rec.cpu(workload, mark, spec["large"])
        if spec.get("deadline"):
            for workload, name, error in (
                    ("TimeoutError late", spec["spin"], crew.TimeoutError),
                    ("ExpirationError late", spec["idle"], crew.ExpirationError)):
                samples = await lateness(client, name, spec["deadline"], error)
                rec.add(workload, "p50 ms", 1000 * common.percentile(samples, 50))
                rec.add(workload, "p99 ms", 1000 * common.percentile(samples, 99))
    finally:
        await client.close()
    return rec


async def take_turns(spec: dict[str, Any]) -> None:
    """The sequential workload, in the turns ``bench/run.py`` gives (common.Turns)."""
    rec = Recorder(spec["worker_pid"])
    task, persistent, warmup = spec["task"], spec["persistent"], spec["warmup"]
    small = random_bytes(SMALL_BYTES)
    client = crew.Client(URL)
    await client.connect()
    try:
        await in_flight(client, task, small, warmup, persistent)
        await sequential(client, task, small, warmup, persistent)
        turns = Turns(rec)
        # Read in a thread: the loop keeps the connection's heartbeats going meanwhile.
        while (calls := await asyncio.to_thread(turns.block)) is not None:
            turns.done(await sequential(client, task, small, calls, persistent))
    finally:
        await client.close()
    turns.record()
    rec.emit()


def caller(spec: dict[str, Any]) -> None:
    if spec.get("deadline"):
        declare_idle_queue(spec["idle"])
    asyncio.run(call_all(spec)).emit()


if __name__ == "__main__":
    spec = orders()
    experiments.apply(spec.get("patches", []))
    if sys.argv[1] == "worker":
        asyncio.run(serve(spec))
    elif sys.argv[1] == "turns":
        asyncio.run(take_turns(spec))
    else:
        caller(spec)
