"""A worker's intake on quorum task queues (crew.intake, ``returns=False``): a full worker
never hands a call back, because every return counts against the call's delivery limit and
would end calls that never ran as ``DeliveryLimitError``; the calls past its concurrency
wait for a job slot."""

from __future__ import annotations

import asyncio
import threading

import pytest

from crew import protocol


@pytest.mark.gen_test(timeout=90)
async def test_a_full_quorum_worker_turns_no_call_back_and_serves_them_all(
        make_worker, client, uid):
    started, release = threading.Event(), threading.Event()

    def hold(_: object) -> bool:
        started.set()
        return release.wait(30)

    slow, quick = f"slow.{uid}", f"quick.{uid}"
    worker = make_worker({slow: hold, quick: lambda x: x},
                         concurrency=1, queue_type=protocol.QUORUM)
    busy = asyncio.ensure_future(client.call(slow, expiration=60))
    assert await asyncio.to_thread(started.wait, 30)  # it holds the only job slot
    # More calls than the delivery limit allows returns: each turned back would count.
    calls = [asyncio.ensure_future(client.call(quick, n, expiration=60))
             for n in range(protocol.DELIVERY_LIMIT + 3)]
    await asyncio.sleep(2)  # the quick calls are delivered while the worker is full
    release.set()
    assert await asyncio.gather(*calls) == list(range(protocol.DELIVERY_LIMIT + 3))
    assert await busy is True
    intake = worker._calls.intake
    assert (intake.rejects, intake.cancels) == (0, 0)
