"""Quorum against classic task queues, crew against raw pika, one broker against another
(issue 16): ``python bench/queue_types.py [--url URL] [--compare URL2]``.

For each broker (``--url``, default ``$BENCH_URL`` else guest on 127.0.0.1:5672; and
``--compare``'s, if given) and each queue type, two systems serve an echo task:

- crew: a crew worker in a child process (concurrency 64, so prefetch 64), called by a crew
  ``Client`` in this process with crew's defaults (persistent calls);
- raw: the minimal pika loop of ``bench/raw_rpc.py`` (``BlockingConnection`` both sides) on
  a queue declared with crew's arguments for that type, carrying crew's headers, a TTL and
  a priority, published persistent and ``mandatory``: what crew asks of the broker, without
  crew.

Workloads: sequential calls of 100 bytes (1000 a round, in blocks of 100 taking turns
between all the systems, so background load hits them alike) and calls with 64 in flight
(3000 a round). Each figure is the median of ``--rounds`` rounds (5). Printed: calls/s of
each, then the ratios taken in the same run: quorum/classic for each system and broker
(what a quorum queue costs; crew's share of that cost is the difference between crew's
ratio and raw's), crew/raw for each queue type, and the second broker against the first.

Each system connects to the first URL of a comma-separated list (a cluster's nodes: the
quorum queue is declared there, so its leader sits on that node and its replicas on the
others). Queues get a run id in their names and are deleted at the end. Figures in
docs/BENCHMARKS.md.
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
from typing import Any

import common
import pika
from raw_rpc import Caller

import crew
from crew import protocol

TYPES = ("classic", "quorum")
BODY = b"x" * 100
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


def start_child(*args: str) -> subprocess.Popen[str]:
    """``python ARGS`` with this checkout's crew, once it has printed that it is ready."""
    proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(common.ROOT)))
    assert proc.stdout is not None
    if proc.stdout.readline().strip() not in ("ready", common.READY):
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start")
    return proc


def first_url(url: str) -> str:
    return crew.settings.split_urls(url)[0]


def broker_version(url: str) -> str:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    version = connection._impl.server_properties["version"]
    connection.close()
    return version.decode() if isinstance(version, bytes) else str(version)


class CrewSystem:
    """A crew worker process and a crew client on ``loop``, for one broker and queue type."""

    def __init__(self, loop: asyncio.AbstractEventLoop, url: str, queue_type: str,
                 run_id: str) -> None:
        self.loop, self.url = loop, url
        self.task = f"bench.crew.{queue_type}.{run_id}"
        self.queue = protocol.task_queue(self.task)
        self.worker = start_child("-c", WORKER, self.task, url, queue_type)
        self.client = crew.Client(url)

        async def connect() -> None:  # on ``loop``, not the thread's default one
            await self.client.connect()
        loop.run_until_complete(connect())

    def sequential(self, calls: int) -> list[float]:
        async def run() -> list[float]:
            samples = []
            for _ in range(calls):
                started = time.perf_counter()
                await self.client.call(self.task, BODY)
                samples.append(time.perf_counter() - started)
            return samples
        return self.loop.run_until_complete(run())

    def in_flight(self, calls: int) -> None:
        async def loop(count: int) -> None:
            for _ in range(count):
                await self.client.call(self.task, BODY)

        async def run() -> None:
            await asyncio.gather(*(loop(n) for n in common.plan_calls(calls, common.PREFETCH)))
        self.loop.run_until_complete(run())

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.worker.communicate("", timeout=60)


class RawSystem:
    """bench/raw_rpc.py's worker process and caller, on a queue with crew's arguments."""

    def __init__(self, url: str, queue_type: str, run_id: str) -> None:
        self.url = url
        self.queue = protocol.task_queue(f"bench.raw.{queue_type}.{run_id}")
        spec = {"queue": self.queue, "url": url, "crew_queue": True, "queue_type": queue_type}
        self.worker = start_child(str(common.BENCH / "raw_rpc.py"), "worker", json.dumps(spec))
        self.caller = Caller(self.queue, crew_queue=True, url=url, persistent=True)

    def sequential(self, calls: int) -> list[float]:
        return self.caller.sequential(BODY, calls)

    def in_flight(self, calls: int) -> None:
        self.caller.in_flight(BODY, calls, common.PREFETCH)

    def close(self) -> None:
        self.caller.connection.close()
        self.worker.terminate()
        self.worker.wait(60)


def measure(systems: dict[str, Any], rounds: int, seq_calls: int,
            flight_calls: int) -> dict[str, dict[str, float]]:
    """Medians of each system's calls/s, sequential (``seq``) and 64 in flight (``flight``)."""
    figures: dict[str, dict[str, list[float]]] = {k: {"seq": [], "flight": []}
                                                  for k in systems}
    for system in systems.values():  # warm-up
        system.sequential(200)
        system.in_flight(640)
    for _ in range(rounds):
        samples: dict[str, list[float]] = {k: [] for k in systems}
        for _block in range(max(1, seq_calls // 100)):
            for key, system in systems.items():
                samples[key] += system.sequential(100)
        for key, system in systems.items():
            figures[key]["seq"].append(len(samples[key]) / sum(samples[key]))
            started = time.perf_counter()
            system.in_flight(flight_calls)
            figures[key]["flight"].append(flight_calls / (time.perf_counter() - started))
    return {k: {f: statistics.median(v) for f, v in figs.items()} for k, figs in figures.items()}


def delete_queues(urls: list[str], run_id: str) -> None:
    """Every queue this run may have declared, whichever systems started."""
    for url in urls:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        for system in ("crew", "raw"):
            for kind in TYPES:
                channel.queue_delete(protocol.task_queue(f"bench.{system}.{kind}.{run_id}"))
        connection.close()


def report(brokers: list[tuple[str, str]], med: dict[str, dict[str, float]],
           rounds: int) -> None:
    print(f"{rounds} rounds (medians); crew defaults (persistent calls), prefetch 64")
    for label, version in brokers:
        print(f"  {label}: RabbitMQ {version}")
    print(f"\n{'calls/s':34}" + "".join(f"{k:>24}" for k in ("sequential", "64 in flight")))
    for key, figs in med.items():
        print(f"{key:34}" + "".join(f"{figs[f]:24.0f}" for f in ("seq", "flight")))
    print(f"\n{'ratio, same run':34}" + "".join(f"{k:>24}" for k in ("sequential",
                                                                     "64 in flight")))

    def ratio(label: str, a: str, b: str) -> None:
        print(f"{label:34}" + "".join(f"{med[a][f] / med[b][f]:24.2f}"
                                      for f in ("seq", "flight")))
    for label, _ in brokers:
        for system in ("crew", "raw"):
            ratio(f"{label} {system} quorum/classic", f"{label} {system} quorum",
                  f"{label} {system} classic")
        for kind in TYPES:
            ratio(f"{label} {kind} crew/raw", f"{label} crew {kind}", f"{label} raw {kind}")
    if len(brokers) == 2:
        (first, _), (second, _) = brokers
        for system in ("crew", "raw"):
            for kind in TYPES:
                ratio(f"{system} {kind} {second}/{first}", f"{second} {system} {kind}",
                      f"{first} {system} {kind}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=common.URL)
    parser.add_argument("--compare", default=None, metavar="URL2",
                        help="a second broker, measured in the same rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=3000)
    options = parser.parse_args()
    urls = [first_url(u) for u in (options.url, options.compare) if u]
    brokers = [(f"broker{i + 1}", broker_version(url)) for i, url in enumerate(urls)]
    run_id = uuid.uuid4().hex[:8]
    loop = asyncio.new_event_loop()
    systems: dict[str, Any] = {}
    try:
        for (label, _), url in zip(brokers, urls, strict=True):
            for kind in TYPES:
                systems[f"{label} crew {kind}"] = CrewSystem(loop, url, kind, run_id)
                systems[f"{label} raw {kind}"] = RawSystem(url, kind, run_id)
        med = measure(systems, options.rounds, options.sequential, options.in_flight)
    finally:
        for system in systems.values():
            system.close()
        delete_queues(urls, run_id)
        loop.close()
    report(brokers, med, options.rounds)


if __name__ == "__main__":
    main()
