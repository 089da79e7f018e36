"""crew sync: ``crew.SyncClient`` (issue 17) calling the echo task of a ``crew.Worker``
(the worker of ``bench/crew_rpc.py``, concurrency 64), transient calls, as "crew transient"
does with the asyncio ``crew.Client``: the two rows compare the synchronous client with the
asyncio one in the same run.

- sequential: one thread calls, one call at a time (in turns with the other systems, see
  common.Turns);
- "64 in flight": 64 threads call at once, each one call at a time, as a WSGI server's
  threads would (the asyncio client's row has 64 coroutines instead).

``python bench/sync_client.py worker|caller|turns '<orders as JSON>'`` (``bench/run.py``
does it).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

from common import PREFETCH, SMALL_BYTES, URL, Recorder, Turns, orders, plan_calls, random_bytes
from crew_rpc import serve

import crew  # this checkout's: importing common put it on sys.path

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


if __name__ == "__main__":
    spec = orders()
    if sys.argv[1] == "worker":
        asyncio.run(serve(spec))
    elif sys.argv[1] == "turns":
        take_turns(spec)
    else:
        call_all(spec).emit()
