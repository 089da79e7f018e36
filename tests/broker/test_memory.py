"""The worker's memory ceiling: crew.memory.MemoryGate and crew.codec.decode_memory (no
broker), then a worker whose ceiling makes calls wait, refuses what cannot fit, and expires
what waited too long."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import msgpack
import pytest

from crew import ExpirationError, RemoteError, codec
from crew.protocol import MSGPACK
from crew.worker import MIN_MAX_MEMORY


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


# The broker keeping the next calls while one waits for memory: tests/broker/test_intake.py.
