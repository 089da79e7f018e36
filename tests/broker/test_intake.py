"""A worker's intake on the broker (crew.intake): per-consumer prefetch, never more calls held
than the worker can start across its task queues, nothing consumed while calls wait for
memory, and a task queue deleted under a running worker consumed again."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pytest

from crew import CrewError
from crew.protocol import task_queue
from crew.worker import MIN_MAX_MEMORY
from tests.support.broker import rabbitmqctl_command


def _queues(broker_url: str) -> dict[str, dict[str, int]]:
    """``rabbitmqctl list_queues`` of the test's vhost: consumers, ready, unacknowledged."""
    rabbitmqctl = rabbitmqctl_command()
    assert rabbitmqctl, "set CREW_TEST_RABBITMQCTL for the broker of CREW_TEST_URL"
    vhost = unquote(urlsplit(broker_url).path[1:]) or "/"
    done = subprocess.run(
        [*rabbitmqctl, "-q", "list_queues", "-p", vhost, "--formatter", "json", "name",
         "consumers", "messages_ready", "messages_unacknowledged"],
        check=True, capture_output=True, text=True, timeout=60)
    return {row["name"]: {key: int(row[key] or 0) for key in
                          ("consumers", "messages_ready", "messages_unacknowledged")}
            for row in json.loads(done.stdout or "[]")}


def _until(check: Any, timeout: float = 20.0) -> Any:
    """Ask rabbitmqctl (which cannot notify) until ``check()`` is true; return its last."""
    end = time.monotonic() + timeout
    while not (seen := check()) and time.monotonic() < end:
        time.sleep(0.2)
    return seen


@pytest.mark.gen_test(timeout=90)
async def test_a_busy_worker_leaves_the_calls_of_its_other_queues_to_an_idle_one(
        make_worker, client, uid):
    """Worker A (concurrency 1) runs a long call of task a; the calls to its other tasks b
    and c must go to idle worker B, not wait in A's prefetch until a ends."""
    a, b, c = f"a.{uid}", f"b.{uid}", f"c.{uid}"
    started, release = threading.Event(), threading.Event()

    def long(_: Any) -> str:
        started.set()
        release.wait(60)
        return "A"

    make_worker({a: long, b: lambda _: "A", c: lambda _: "A"}, concurrency=1)
    first = asyncio.ensure_future(client.call(a, None, expiration=90))
    loop = asyncio.get_running_loop()
    try:
        assert await loop.run_in_executor(None, started.wait, 20)
        make_worker({b: lambda _: "B", c: lambda _: "B"}, concurrency=1)
        results = await asyncio.wait_for(asyncio.gather(*(
            client.call(task, None, expiration=30) for task in [b, c] * 5)), 20)
    finally:
        release.set()
    assert results == ["B"] * 10, "the busy worker held (and ran) calls an idle one could start"
    assert await first == "A"


@pytest.mark.gen_test(timeout=120)
async def test_a_worker_never_holds_more_calls_than_its_concurrency(
        make_worker, client, broker_url, uid):
    """Three task queues, each full, concurrency 2: per-consumer prefetch alone would let
    the worker hold 6; the broker counts 2 unacknowledged, 4 at most for a round trip."""
    tasks = [f"t{i}.{uid}" for i in range(3)]

    def slow(x: int) -> int:
        time.sleep(0.2)
        return x

    worker = make_worker({task: slow for task in tasks}, concurrency=2)
    calls = [asyncio.ensure_future(client.call(tasks[i % 3], i, expiration=90))
             for i in range(45)]
    queues = [task_queue(task) for task in tasks]
    loop = asyncio.get_running_loop()
    seen: list[int] = []
    while not all(call.done() for call in calls) and len(seen) < 12:
        listed = await loop.run_in_executor(None, _queues, broker_url)
        seen.append(sum(listed.get(q, {}).get("messages_unacknowledged", 0) for q in queues))
    assert await asyncio.gather(*calls) == list(range(45))
    # The worker runs and holds at most 2; a call delivered past that is in flight (counted
    # unacknowledged by the broker) for one round trip before it goes back: with consumers
    # of 3 queues started with prefetch 1 (one slot free), at most 2 such at once. Without
    # the intake the broker counts 6 (3 queues x prefetch 2) all along.
    assert seen and max(seen) <= 2 + 2, f"unacknowledged calls seen: {seen}"
    assert sorted(seen)[len(seen) // 2] <= 2, f"unacknowledged calls seen: {seen}"
    intake = worker._calls.intake
    print(f"45 calls, 3 queues, concurrency 2: {intake.consumes} consumes, {intake.cancels} "
          f"cancels, {intake.rejects} rejects; unacknowledged seen {seen}")


@pytest.mark.gen_test(timeout=90)
async def test_while_calls_wait_for_memory_the_worker_consumes_nothing(
        make_worker, client, broker_url, uid):
    """A call waits for memory: the worker cancels its consumer, so the broker keeps the next
    calls for other workers; once nothing waits, it consumes again (RabbitMQ 3.x and 4.x:
    no global prefetch)."""
    task = f"hold.{uid}"
    queue = task_queue(task)
    started, release = threading.Semaphore(0), threading.Semaphore(0)

    def hold(x: Any) -> int:
        started.release()
        release.acquire(timeout=30)
        return len(x)

    make_worker({task: hold}, concurrency=4, max_memory=MIN_MAX_MEMORY)
    loop = asyncio.get_running_loop()

    def consumers(count: int) -> Any:
        return lambda: _until(lambda: _queues(broker_url)[queue]["consumers"] == count)

    assert await loop.run_in_executor(None, consumers(1))
    value = [1] * 3_000_000  # about 100 MiB reserved each: the second must wait
    calls = [asyncio.ensure_future(client.call(task, value, gzip=False, expiration=60))
             for _ in range(2)]
    try:
        assert await loop.run_in_executor(None, started.acquire, True, 10)
        assert await loop.run_in_executor(None, consumers(0)), "still consuming"
        third = asyncio.ensure_future(client.call(task, [1], expiration=60))
        assert await loop.run_in_executor(None, lambda: _until(
            lambda: _queues(broker_url)[queue]["messages_ready"] == 1)), "not kept by the broker"
    finally:
        for _ in range(3):
            release.release()
    assert await asyncio.gather(*calls, third) == [3_000_000, 3_000_000, 1]
    # Exactly one: consuming again twice (a check before the first resume's consume ran)
    # left two consumers of this worker on RabbitMQ 4.3, one of them never cancelled.
    assert await loop.run_in_executor(None, consumers(1)), _queues(broker_url)[queue]


@pytest.mark.gen_test(timeout=90)
async def test_a_task_queue_deleted_under_a_running_worker_is_served_again(
        make_worker, client, broker_url, uid, caplog):
    """The broker cancels the consumer of a deleted queue (basic.cancel): the worker logs
    it once, declares the queue again and serves the task, on the same connection."""
    task, other = f"gone.{uid}", f"other.{uid}"
    make_worker({task: lambda x: x + 1, other: lambda x: x}, concurrency=2)
    assert await client.call(task, 1, expiration=10) == 2
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        connection.channel().queue_delete(task_queue(task))
    finally:
        connection.close()
    answer, end = None, time.monotonic() + 30
    while answer is None and time.monotonic() < end:
        try:  # until the queue is back, the call is refused (no queue for the task)
            answer = await client.call(task, 2, expiration=5)
        except CrewError:
            await asyncio.sleep(0.2)
    assert answer == 3
    assert await client.call(other, 7, expiration=10) == 7
    cancelled = [r for r in caplog.records if "the broker cancelled" in r.getMessage()]
    assert len(cancelled) == 1, [r.getMessage() for r in cancelled]
