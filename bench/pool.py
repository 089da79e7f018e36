"""The job-thread pool alone, no broker: crew's pool against the two it replaced, side by side.

``python bench/pool.py`` runs rounds of each pool, interleaved (the order rotates every
round), and prints the median of each figure over the rounds. One round of a pool: a fresh
pool of ``--size`` threads; an asyncio loop submits bursts of ``--burst`` trivial jobs (the
real :class:`crew.jobs.Job`, an echo task) and waits for each burst; before that,
``--sequential`` jobs one at a time. Finished jobs are handed back to the loop as the
worker does (``crew.replies.Replies.job_done``: batched, one ``call_soon_threadsafe`` per
batch).
``--block 5`` makes each job block for 5 ms (``time.sleep``): a burst then needs a thread
per job, and its wall time shows how fast the pool provides them.

Figures per job: CPU of the whole process (``time.process_time``), wall time, voluntary
context switches (about one per thread put to sleep, so a count of wake-ups). And threads:
spawned by the round in all, and by its first 50 sequential jobs. On a machine with few
noisy cores, trust the ratios of pools measured in the same run, not the absolute figures.

Pools: ``new`` is ``crew.pool.JobThreads``; ``lifo`` each job to the most recently idle
thread's own inbox (crew 0b0c752 to 0534235); ``shared`` one ``SimpleQueue`` that every
thread blocks on, a thread per slot spawned as jobs arrive (before 0b0c752).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import queue
import resource
import statistics
import threading
import time
from collections import deque
from typing import Any, Callable

import common  # noqa: F401  (puts the repository on sys.path)

from crew import JobKilled, codec, protocol
from crew.jobs import Job, Reply
from crew.pool import JobThreads


class LifoThreads:
    """crew's pool from 0b0c752 to 0534235 (copied, trimmed of comments)."""

    def __init__(self, size: int, name: str, on_done: Callable[[Job, Reply], None]) -> None:
        self._size, self._name, self._on_done = size, name, on_done
        self._lock = threading.Lock()
        self._pending: deque[Job] = deque()
        self._idle: list[queue.SimpleQueue[Job | None]] = []
        self._threads: set[threading.Thread] = set()
        self.stuck: set[threading.Thread] = set()
        self._serial = 0
        self._closed = False

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._idle:
                self._idle.pop().put(job)
                return
            self._pending.append(job)
            if len(self._threads) < self._size:
                self._spawn()

    def _spawn(self) -> None:
        self._serial += 1
        inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        thread = threading.Thread(target=self._serve, args=(inbox,), daemon=True,
                                  name=f"{self._name}-{self._serial}")
        self._threads.add(thread)
        thread.start()

    def _serve(self, inbox: queue.SimpleQueue[Job | None]) -> None:
        me = threading.current_thread()
        try:
            self._ready(inbox)
            while (job := inbox.get()) is not None:
                job.thread = me
                reply, abandoned = JobThreads._run(job)  # unchanged by proposal 10
                if abandoned:
                    break
                self._ready(inbox)
                if reply is not None:
                    self._on_done(job, reply)
        finally:
            with self._lock:
                self._threads.discard(me)

    def _ready(self, inbox: queue.SimpleQueue[Job | None]) -> None:
        with self._lock:
            if self._pending:
                inbox.put(self._pending.popleft())
            elif self._closed:
                inbox.put(None)
            else:
                self._idle.append(inbox)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for inbox in self._idle:
                inbox.put(None)
            self._idle.clear()


class SharedThreads:
    """crew's pool before 0b0c752 (copied, trimmed of comments and of replace())."""

    def __init__(self, size: int, name: str, on_done: Callable[[Job, Reply], None]) -> None:
        self._size, self._name, self._on_done = size, name, on_done
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._serial = 0

    def submit(self, job: Job) -> None:
        with self._lock:
            if len(self._threads) < self._size:
                self._spawn()
        self._queue.put(job)

    def _spawn(self) -> None:
        self._serial += 1
        thread = threading.Thread(target=self._serve, name=f"{self._name}-{self._serial}",
                                  daemon=True)
        self._threads.add(thread)
        thread.start()

    def _serve(self) -> None:
        me = threading.current_thread()
        while (job := self._queue.get()) is not None:
            job.thread = me
            if not job.watch.begin():
                continue
            try:
                try:
                    reply = job.run_sync()
                except JobKilled as exc:
                    reply = job.error_reply(exc, with_traceback=False)
                abandoned = job.watch.end(JobKilled)
            except JobKilled as exc:
                reply, abandoned = job.error_reply(exc, with_traceback=False), \
                    job.watch.end(JobKilled)
            if abandoned:
                break
            self._on_done(job, reply)
        with self._lock:
            self._threads.discard(me)

    def close(self) -> None:
        with self._lock:
            count = len(self._threads)
        for _ in range(count):
            self._queue.put(None)


POOLS: dict[str, Callable[..., Any]] = {
    "new": JobThreads, "lifo": LifoThreads, "shared": SharedThreads}
_BODY, _ = codec.encode(None)


class Round:
    """One pool driven from one asyncio loop, its replies handed back as the worker does."""

    def __init__(self, kind: str, size: int, serial: int, block: float = 0) -> None:
        self.block = block
        self.name = f"bench-pool-{kind}-{serial}"
        self.pool = POOLS[kind](size, self.name, self._job_done)
        self._loop = asyncio.get_running_loop()
        self._finished: list[tuple[Job, Reply]] = []
        self._finished_lock = threading.Lock()
        self._finished_scheduled = False
        self._waiting = 0
        self._all_done: asyncio.Future[None] | None = None

    def _job_done(self, job: Job, reply: Reply) -> None:  # as Replies.job_done
        with self._finished_lock:
            self._finished.append((job, reply))
            if self._finished_scheduled:
                return
            self._finished_scheduled = True
        self._loop.call_soon_threadsafe(self._answer_finished)

    def _answer_finished(self) -> None:
        with self._finished_lock:
            batch, self._finished = self._finished, []
            self._finished_scheduled = False
        self._waiting -= len(batch)
        if self._waiting == 0 and self._all_done is not None:
            self._all_done.set_result(None)

    async def run(self, jobs: list[Job]) -> None:
        """Submit ``jobs`` at once and wait until every reply is back on the loop."""
        self._waiting = len(jobs)
        self._all_done = self._loop.create_future()
        for job in jobs:
            self.pool.submit(job)
        await self._all_done

    async def measure(self, count: int, burst: int) -> dict[str, float]:
        """Per-job figures of ``count`` jobs submitted ``burst`` at a time."""
        cpu = wall = switches = 0.0
        for _ in range(count // burst):
            jobs = [self._job(i) for i in range(burst)]
            switched, cpu0, wall0 = _switches(), time.process_time(), time.perf_counter()
            await self.run(jobs)
            cpu += time.process_time() - cpu0
            wall += time.perf_counter() - wall0
            switches += _switches() - switched
        jobs_run = count // burst * burst
        return {"cpu": cpu / jobs_run * 1e6, "wall": wall / jobs_run * 1e6,
                "switches": switches / jobs_run}

    def _job(self, i: int) -> Job:
        task = _echo if not self.block else functools.partial(_blocking_echo, self.block)
        return Job(None, "echo", task, 1, str(i), "reply",
                   protocol.MSGPACK, None, _BODY, {}, time.monotonic() + 60)

    def close(self) -> None:
        self.pool.close()
        for thread in threading.enumerate():
            if thread.name.startswith(self.name + "-"):
                thread.join(10)


def _echo(argument: Any) -> Any:
    return argument


def _blocking_echo(seconds: float, argument: Any) -> Any:
    time.sleep(seconds)
    return argument


def _switches() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


async def one_round(kind: str, serial: int, args: argparse.Namespace) -> dict[str, float]:
    bench = Round(kind, args.size, serial, args.block / 1000)
    try:
        await bench.measure(50, 1)  # first, on the fresh pool: the threads one at a time needs
        seq_threads = bench.pool._serial
        sequential = await bench.measure(args.sequential, 1)
        await bench.measure(args.burst * 5, args.burst)  # warm-up: the threads a burst needs
        burst = await bench.measure(args.jobs, args.burst)
    finally:
        bench.close()
    return {"burst cpu": burst["cpu"], "burst wall": burst["wall"],
            "burst switches": burst["switches"], "threads": bench.pool._serial,
            "seq cpu": sequential["cpu"], "seq wall": sequential["wall"],
            "seq switches": sequential["switches"], "seq threads": seq_threads}


async def main(args: argparse.Namespace) -> None:
    kinds = args.pools.split(",")
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for r in range(args.rounds):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for kind in order:
            results[kind].append(await one_round(kind, r, args))
    print(f"{args.rounds} rounds per pool, interleaved; medians. Bursts of {args.burst} jobs "
          f"({args.jobs} per round) on pools of {args.size}; {args.sequential} sequential "
          f"jobs; each job blocks {args.block} ms. Per job: CPU and wall in us, voluntary "
          "context switches.")
    figures = list(results[kinds[0]][0])
    print(f"{'pool':8}" + "".join(f"{f:>15}" for f in figures))
    medians = {kind: {f: statistics.median(r[f] for r in rounds) for f in figures}
               for kind, rounds in results.items()}
    for kind in kinds:
        print(f"{kind:8}" + "".join(f"{medians[kind][f]:15.2f}" for f in figures))
    for kind in kinds[1:]:  # per-round ratios, so that the rounds' noise cancels
        ratios = {f: statistics.median(a[f] / b[f] if b[f] else float("nan") for a, b in
                                       zip(results[kinds[0]], results[kind], strict=True))
                  for f in ("burst cpu", "burst wall", "seq cpu", "seq wall")}
        print(f"{kinds[0]}/{kind}: " + ", ".join(f"{f} {v:.2f}x" for f, v in ratios.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", default="new,lifo,shared",
                        help="comma-separated, the first compared with the others")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--size", type=int, default=64, help="the pool's threads at most")
    parser.add_argument("--burst", type=int, default=64, help="jobs submitted at once")
    parser.add_argument("--jobs", type=int, default=64 * 100, help="burst jobs per round")
    parser.add_argument("--sequential", type=int, default=2000, help="jobs one at a time")
    parser.add_argument("--block", type=float, default=0, help="ms each job blocks (sleeps)")
    asyncio.run(main(parser.parse_args()))
