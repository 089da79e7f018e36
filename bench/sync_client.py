"""crew sync: ``crew.SyncClient`` (issue 17) calling the echo task of a ``crew.Worker``
(the worker of ``bench/crew_rpc.py``, concurrency 64), transient calls, as "crew transient"
does with the asyncio ``crew.Client``: the two rows compare the synchronous client with the
asyncio one in the same run.

- sequential: one thread calls, one call at a time (in turns with the other systems, see
  common.Turns);
- "64 in flight": 64 threads call at once, each one call at a time, as a WSGI server's
  threads would (the asyncio client's row has 64 coroutines instead).

``python bench/sync_client.py worker|caller|turns '<orders as JSON>'`` (``bench/run.py``
does it). ``python bench/sync_client.py hop`` (no broker) measures the thread hop alone: a
coroutine that returns at once, handed to a loop thread and waited for, from 1 and from 64
threads, by ``asyncio.run_coroutine_threadsafe`` and a concurrent future against
``crew.loopthread.LoopThread`` (in turns, 5 rounds, medians).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time
from typing import Any, Callable

from common import PREFETCH, SMALL_BYTES, URL, Recorder, Turns, orders, plan_calls, random_bytes
from crew_rpc import serve

import crew  # this checkout's: importing common put it on sys.path
from crew.loopthread import LoopThread

#: Threads calling at once in the in-flight workload.
THREADS = PREFETCH


def sequential(client: crew.SyncClient, task: str, data: Any, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        client.call(task, data, persistent=False)
        samples.append(time.perf_counter() - started)
    return samples


def threads_calling(client: crew.SyncClient, task: str, data: Any, calls: int) -> None:
    """``calls`` calls from :data:`THREADS` threads at once, each one call at a time; a
    failed call fails the workload."""
    failures: list[BaseException] = []

    def loop(count: int) -> None:
        try:
            for _ in range(count):
                client.call(task, data, persistent=False)
        except Exception as exc:  # noqa: BLE001 - reported by the workload
            failures.append(exc)

    threads = [threading.Thread(target=loop, args=(n,)) for n in plan_calls(calls, THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} thread(s) failed, the first with {failures[0]!r}")


def warm_up(client: crew.SyncClient, task: str, data: Any, calls: int) -> None:
    threads_calling(client, task, data, calls)
    sequential(client, task, data, calls)


def call_all(spec: dict[str, Any]) -> Recorder:
    rec = Recorder(spec.get("worker_pid"))
    task, small = spec["task"], random_bytes(SMALL_BYTES)
    client = crew.SyncClient(URL)
    try:
        warm_up(client, task, small, spec["warmup"])
        mark, started = rec.cpu_mark(), time.perf_counter()
        threads_calling(client, task, small, spec["inflight_calls"])
        rec.throughput("64 in flight 100 B", started, spec["inflight_calls"])
        rec.cpu("64 in flight 100 B", mark, spec["inflight_calls"])
    finally:
        client.close()
    return rec


def take_turns(spec: dict[str, Any]) -> None:
    """The sequential workload, in the turns ``bench/run.py`` gives (common.Turns)."""
    rec = Recorder(spec["worker_pid"])
    task, small = spec["task"], random_bytes(SMALL_BYTES)
    client = crew.SyncClient(URL)
    try:
        warm_up(client, task, small, spec["warmup"])
        turns = Turns(rec)
        while (calls := turns.block()) is not None:  # the client's own thread keeps the
            turns.done(sequential(client, task, small, calls))  # heartbeats going meanwhile
    finally:
        client.close()
    turns.record()
    rec.emit()


def hops() -> None:
    """Hops/s through each way of handing a coroutine to a loop thread (no broker)."""
    thread = LoopThread("hop")

    async def nothing() -> None:
        return None

    def standard() -> None:
        asyncio.run_coroutine_threadsafe(nothing(), thread.loop).result(10)

    def crews() -> None:
        work = thread.submit(nothing())
        work.wait(10)
        work.outcome()

    def rate(hop: Callable[[], None], threads: int, total: int = 6400) -> float:
        def loop() -> None:
            for _ in range(total // threads):
                hop()
        callers = [threading.Thread(target=loop) for _ in range(threads)]
        started = time.perf_counter()
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        return total / (time.perf_counter() - started)

    for threads in (1, 64):
        rates: dict[str, list[float]] = {"run_coroutine_threadsafe": [], "LoopThread": []}
        for _ in range(5):
            rates["run_coroutine_threadsafe"].append(rate(standard, threads))
            rates["LoopThread"].append(rate(crews, threads))
        medians = {name: statistics.median(values) for name, values in rates.items()}
        print(f"{threads:2} thread(s): " + ", ".join(
            f"{name} {value:.0f} hops/s" for name, value in medians.items())
            + f"; ratio {medians['LoopThread'] / medians['run_coroutine_threadsafe']:.2f}")
    thread.stop(10)


if __name__ == "__main__":
    if sys.argv[1] == "hop":
        hops()
        sys.exit(0)
    spec = orders()
    if sys.argv[1] == "worker":
        asyncio.run(serve(spec))
    elif sys.argv[1] == "turns":
        take_turns(spec)
    else:
        call_all(spec).emit()
