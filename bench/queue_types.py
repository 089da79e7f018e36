"""Quorum against classic task queues (issue 16): ``python bench/queue_types.py [--url URL]``.

Against the RabbitMQ at ``--url`` (default ``$BENCH_URL``, else guest on 127.0.0.1:5672),
two crew workers run in child processes, one serving a task on a classic queue, one a task on
a quorum queue (both concurrency 64, so prefetch 64), and this process calls them with crew's
defaults (persistent calls): 1000 sequential calls of 100 bytes, and 3000 calls with 64 in
flight. The two queue types take turns in rounds (``--rounds``, 5), each workload in blocks
of 100 calls for the sequential one, so background load hits both alike; each figure is the
median of its rounds, and the ratio quorum/classic is taken in the same run. Queues get a run
id in their names and are deleted at the end. Figures in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid

import pika

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import crew  # noqa: E402  (this checkout's)

TYPES = ("classic", "quorum")
WORKER = """\
import asyncio, sys
import crew
async def main():
    worker = crew.Worker({sys.argv[1]: lambda x: x}, broker=sys.argv[2], concurrency=64,
                         queue_type=sys.argv[3])
    await worker.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await worker.stop(grace=0)
asyncio.run(main())
"""


async def sequential(client: crew.Client, task: str, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await client.call(task, b"x" * 100)
        samples.append(time.perf_counter() - started)
    return samples


async def in_flight(client: crew.Client, task: str, calls: int) -> float:
    async def loop(count: int) -> None:
        for _ in range(count):
            await client.call(task, b"x" * 100)

    started = time.perf_counter()
    await asyncio.gather(*(loop(calls // 64) for _ in range(64)))
    return (calls // 64 * 64) / (time.perf_counter() - started)


async def run(url: str, rounds: int, seq_calls: int, flight_calls: int) -> dict[str, dict]:
    run_id = uuid.uuid4().hex[:8]
    tasks = {kind: f"bench.{kind}.{run_id}" for kind in TYPES}
    env = dict(os.environ, PYTHONPATH=ROOT)
    workers = {kind: subprocess.Popen([sys.executable, "-c", WORKER, tasks[kind], url, kind],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                      text=True) for kind in TYPES}
    figures: dict[str, dict[str, list[float]]] = {k: {"seq": [], "p50": [], "flight": []}
                                                  for k in TYPES}
    try:
        for proc in workers.values():
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        async with crew.Client(url) as client:
            for kind in TYPES:  # warm-up
                await sequential(client, tasks[kind], 200)
            for _ in range(rounds):
                samples: dict[str, list[float]] = {k: [] for k in TYPES}
                for _block in range(seq_calls // 100):
                    for kind in TYPES:
                        samples[kind] += await sequential(client, tasks[kind], 100)
                for kind in TYPES:
                    figures[kind]["seq"].append(len(samples[kind]) / sum(samples[kind]))
                    figures[kind]["p50"].append(statistics.median(samples[kind]) * 1000)
                    figures[kind]["flight"].append(
                        await in_flight(client, tasks[kind], flight_calls))
    finally:
        for proc in workers.values():
            proc.communicate("", timeout=60)
        connection = pika.BlockingConnection(pika.URLParameters(
            crew.settings.split_urls(url)[0]))
        channel = connection.channel()
        for task in tasks.values():
            channel.queue_delete("crew.tasks." + task)
        connection.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get(
        "BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=3000)
    options = parser.parse_args()
    first = crew.settings.split_urls(options.url)[0]  # several URLs: a cluster's nodes
    connection = pika.BlockingConnection(pika.URLParameters(first))
    version = connection._impl.server_properties["version"]
    connection.close()
    version = version.decode() if isinstance(version, bytes) else version
    figures = asyncio.run(run(options.url, options.rounds, options.sequential,
                              options.in_flight))
    med = {k: {f: statistics.median(v) for f, v in figs.items()} for k, figs in figures.items()}
    where = first.split("@")[-1] + (" and its cluster" if first != options.url else "")
    print(f"RabbitMQ {version} at {where}, {options.rounds} rounds "
          f"(medians), crew defaults (persistent calls), worker concurrency 64")
    print(f"{'workload':34} {'classic':>10} {'quorum':>10} {'quorum/classic':>15}")
    rows = (("sequential, calls/s", "seq"), ("sequential, median latency ms", "p50"),
            ("64 in flight, calls/s", "flight"))
    for label, key in rows:
        c, q = med["classic"][key], med["quorum"][key]
        print(f"{label:34} {c:10.1f} {q:10.1f} {q / c:15.2f}")


if __name__ == "__main__":
    main()
