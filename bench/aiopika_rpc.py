"""aio-pika's ``patterns.RPC``, the fastest peer of the notes' table: transient calls (its
default), no publisher confirms, prefetch 64, an ``async def`` echo.

A dependency of the benchmark only (``pip install -r bench/requirements.txt``); without it
``bench/run.py`` skips these rows and says so.

``python bench/aiopika_rpc.py worker|caller|turns '<orders as JSON>'`` (``bench/run.py`` does
it; ``turns``: the sequential workload, in turns with the other systems, see common.Turns).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import common  # noqa: F401  (puts the repository on sys.path)
from common import (LARGE_BYTES, PREFETCH, SMALL_BYTES, URL, Recorder, Turns,
                    ready_until_signal, compressible_text, orders, percentile, plan_calls,
                    random_bytes, rss_mib)
from raw_rpc import record_memory

import aio_pika
from aio_pika.patterns import RPC

DEADLINE_S = 0.2


async def echo(*, data: Any) -> Any:
    return data


async def open_rpc() -> tuple[aio_pika.abc.AbstractConnection, RPC]:
    connection = await aio_pika.connect(URL)
    channel = await connection.channel(publisher_confirms=False)
    await channel.set_qos(prefetch_count=PREFETCH)
    return connection, await RPC.create(channel)


async def serve(spec: dict[str, Any]) -> None:
    connection, rpc = await open_rpc()
    await rpc.register(spec["queue"], echo, auto_delete=False)
    await ready_until_signal()
    await connection.close()


async def sequential(rpc: RPC, queue: str, data: Any, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await rpc.call(queue, {"data": data})
        samples.append(time.perf_counter() - started)
    return samples


async def in_flight(rpc: RPC, queue: str, data: Any, calls: int) -> None:
    async def loop(count: int) -> None:
        for _ in range(count):
            await rpc.call(queue, {"data": data})

    await asyncio.gather(*(loop(n) for n in plan_calls(calls, PREFETCH)))


async def expiration_lateness(rpc: RPC, queue: str, calls: int) -> list[float]:
    """A queue without consumer dead-letters the call back: aio-pika's timeout error."""
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        try:
            await rpc.call(queue, {"data": None}, expiration=DEADLINE_S)
        except asyncio.TimeoutError:
            samples.append(time.perf_counter() - (started + DEADLINE_S))
        else:
            raise RuntimeError("a call to a queue without consumer returned")
    return samples


async def call_all(spec: dict[str, Any]) -> Recorder:
    rec = Recorder(spec["worker_pid"])
    queue, warmup = spec["queue"], spec["warmup"]
    small = random_bytes(SMALL_BYTES)
    connection, rpc = await open_rpc()
    try:
        if spec.get("memory"):
            mem = spec["memory"]
            await in_flight(rpc, queue, small, mem["warmup"])
            before = rss_mib(rec.worker_pid), rss_mib(os.getpid())
            await in_flight(rpc, queue, small, mem["calls"])
            after = rss_mib(rec.worker_pid), rss_mib(os.getpid())
            record_memory(rec, mem["calls"], before, after)
            return rec
        await in_flight(rpc, queue, small, warmup)
        await sequential(rpc, queue, small, warmup)
        mark, started = rec.cpu_mark(), time.perf_counter()
        await in_flight(rpc, queue, small, spec["inflight_calls"])
        rec.throughput("64 in flight 100 B", started, spec["inflight_calls"])
        rec.cpu("64 in flight 100 B", mark, spec["inflight_calls"])
        for workload, data in (("1 MB random", random_bytes(LARGE_BYTES)),
                               ("1 MB text", compressible_text(LARGE_BYTES))):
            await sequential(rpc, queue, data, max(1, warmup // 20))
            mark, started = rec.cpu_mark(), time.perf_counter()
            await sequential(rpc, queue, data, spec["large"])
            rec.throughput(workload, started, spec["large"])
            rec.cpu(workload, mark, spec["large"])
        if spec.get("deadline"):
            await rpc.channel.declare_queue(
                spec["idle"], arguments={"x-dead-letter-exchange": RPC.DLX_NAME})
            samples = await expiration_lateness(rpc, spec["idle"], spec["deadline"])
            rec.add("ExpirationError late", "p50 ms", 1000 * percentile(samples, 50))
            rec.add("ExpirationError late", "p99 ms", 1000 * percentile(samples, 99))
    finally:
        await connection.close()
    return rec


async def take_turns(spec: dict[str, Any]) -> None:
    """The sequential workload, in the turns ``bench/run.py`` gives (common.Turns)."""
    rec = Recorder(spec["worker_pid"])
    queue, warmup = spec["queue"], spec["warmup"]
    small = random_bytes(SMALL_BYTES)
    connection, rpc = await open_rpc()
    try:
        await in_flight(rpc, queue, small, warmup)
        await sequential(rpc, queue, small, warmup)
        turns = Turns(rec)
        while (calls := await asyncio.to_thread(turns.block)) is not None:
            turns.done(await sequential(rpc, queue, small, calls))
    finally:
        await connection.close()
    turns.record()
    rec.emit()


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        asyncio.run(serve(orders()))
    elif sys.argv[1] == "turns":
        asyncio.run(take_turns(orders()))
    else:
        asyncio.run(call_all(orders())).emit()
