"""The worker's memory ceiling: crew.memory.MemoryGate and crew.codec.decode_memory (no
broker), then a worker whose ceiling makes calls wait, refuses what cannot fit, and expires
what waited too long."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import msgpack
import pika
import pytest

from crew import ExpirationError, RemoteError, codec
from crew.protocol import MSGPACK
from crew.worker import MIN_MAX_MEMORY
from tests.support.broker import rabbitmqctl_command


MiB = 1024 * 1024


@pytest.mark.gen_test(timeout=60)
async def test_calls_over_the_ceiling_wait_their_turn_and_one_too_big_is_refused(
        make_worker, client, uid):
    """Ceiling 128 MiB; a call of 3 MB of small ints may take about 100 MiB to decode (the
    bound of a body with a list at the top): one at a time, though the worker has four job
    slots. A 6 MB body of empty lists (about 200 MiB) cannot fit at all: refused at once."""
    task = f"hold.{uid}"
    running, most, lock = [0], [0], threading.Lock()
    pause = threading.Event()

    def hold(x: Any) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        pause.wait(0.3)  # long enough for the other calls to be delivered meanwhile
        with lock:
            running[0] -= 1
        return len(x)

    make_worker({task: hold}, concurrency=4, max_memory=MIN_MAX_MEMORY)
    value = [1] * 3_000_000
    assert codec.decode_memory(msgpack.packb(value), MSGPACK) > MIN_MAX_MEMORY // 2
    results = await asyncio.gather(*(client.call(task, value, gzip=False, expiration=30)
                                     for _ in range(4)))
    assert results == [3_000_000] * 4
    assert most[0] == 1, "calls that did not fit the ceiling together ran at once"
    with pytest.raises(RemoteError) as info:
        await client.call(task, [[]] * 6_000_000, gzip=False, expiration=30)
    assert info.value.type == "MessageTooLargeError"
    assert "memory ceiling of 128 MiB" in info.value.message


@pytest.mark.gen_test(timeout=60)
async def test_a_call_waiting_for_memory_expires_at_its_deadline(make_worker, client, uid):
    task = f"hold.{uid}"
    started, release = threading.Event(), threading.Event()

    def hold(x: Any) -> int:
        started.set()
        release.wait(20)
        return len(x)

    make_worker({task: hold}, concurrency=2, max_memory=MIN_MAX_MEMORY)
    value = [1] * 3_000_000  # about 100 MiB reserved each: the second must wait
    first = asyncio.ensure_future(client.call(task, value, gzip=False, expiration=30))
    assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    try:
        with pytest.raises(ExpirationError, match="before memory was free"):
            await client.call(task, value, gzip=False, expiration=2)
    finally:
        release.set()
    assert await first == 3_000_000


def _worker_prefetch(broker_url: str) -> list[int]:
    """The global prefetch of every consuming channel with one, on the test's vhost: a
    crew worker's task channel (rabbitmqctl lists the channels of every vhost)."""
    vhost = unquote(urlsplit(broker_url).path[1:]) or "/"
    rabbitmqctl = rabbitmqctl_command()
    assert rabbitmqctl, "set CREW_TEST_RABBITMQCTL for the broker of CREW_TEST_URL"
    done = subprocess.run(
        [*rabbitmqctl, "-q", "list_channels", "--formatter", "json", "vhost",
         "global_prefetch_count", "consumer_count"],
        check=True, capture_output=True, text=True, timeout=60)
    return [int(row["global_prefetch_count"]) for row in json.loads(done.stdout or "[]")
            if row["vhost"] == vhost and row["consumer_count"] and row["global_prefetch_count"]]


def _prefetch_becomes(broker_url: str, expected: list[int], timeout: float = 20.0) -> list[int]:
    """Ask rabbitmqctl (which cannot notify) until the worker's prefetch is ``expected``."""
    end = time.monotonic() + timeout
    while (seen := _worker_prefetch(broker_url)) != expected and time.monotonic() < end:
        time.sleep(0.2)
    return seen


def _broker_major(broker_url: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        version = connection._impl.server_properties.get("version", b"0")
    finally:
        connection.close()
    text = version.decode() if isinstance(version, bytes) else str(version)
    return int(text.split(".")[0])


@pytest.mark.gen_test(timeout=90)
async def test_while_calls_wait_for_memory_the_broker_keeps_the_next_ones(
        make_worker, client, broker_url, uid):
    """A call waits for memory: the worker's prefetch drops to the calls running (1), so
    the broker keeps the next calls for other workers; once nothing waits, it is back to
    the concurrency (4)."""
    if _broker_major(broker_url) >= 4:
        # Not silent: listed in the summary (-ra). The worker lowers a global prefetch,
        # which RabbitMQ 4.x no longer permits by default (it applies it per consumer, to
        # new consumers only) and whose count 4.x's rabbitmqctl does not list: issue 16
        # replaces global prefetch, and this test with it.
        pytest.skip("RabbitMQ 4.x: no global prefetch to lower (issue 16)")
    task = f"hold.{uid}"
    started, release = threading.Semaphore(0), threading.Semaphore(0)

    def hold(x: Any) -> int:
        started.release()
        release.acquire(timeout=30)
        return len(x)

    make_worker({task: hold}, concurrency=4, max_memory=MIN_MAX_MEMORY)
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, _prefetch_becomes, broker_url, [4]) == [4]
    value = [1] * 3_000_000  # about 100 MiB reserved each: the second must wait
    calls = [asyncio.ensure_future(client.call(task, value, gzip=False, expiration=60))
             for _ in range(2)]
    try:
        assert await loop.run_in_executor(None, started.acquire, True, 10)
        assert await loop.run_in_executor(None, _prefetch_becomes, broker_url, [1]) == [1]
    finally:
        release.release()
        release.release()
    assert await asyncio.gather(*calls) == [3_000_000, 3_000_000]
    assert await loop.run_in_executor(None, _prefetch_becomes, broker_url, [4]) == [4]
