"""Cancelled calls never start: on the worker that has them, and on workers that connect
after the cancel was sent (the notices are kept in the stream ``crew.cancels``)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable

import pika
import pytest

from crew import protocol
from crew.worker import Worker, serve_in_thread
from tests.support.rawamqp import raw_channel


def serve_once(broker_url: str, tasks: dict[str, Callable[[Any], Any]]) -> None:
    """Run a worker and stop it: its task queues and the stream exist, nobody serves."""
    worker = Worker(tasks, broker=broker_url, grace=0)
    thread = serve_in_thread(worker)
    worker.request_stop(grace=0)
    thread.join(30)
    assert not thread.is_alive()


async def queued(broker_url: str, task: str, count: int, timeout: float = 10.0) -> None:
    """Wait until ``count`` calls are ready in the queue of ``task``. The broker announces
    nothing when a message is enqueued, so this asks it, a bounded number of times."""
    end = time.monotonic() + timeout
    while True:
        with raw_channel(broker_url) as channel:
            declared = channel.queue_declare(protocol.task_queue(task), passive=True)
        if declared.method.message_count == count:
            return
        assert time.monotonic() < end, f"{declared.method.message_count} calls queued"
        await asyncio.sleep(0.05)


def recorder() -> tuple[list[Any], Callable[[Any], Any]]:
    ran: list[Any] = []

    def work(x: Any) -> Any:
        ran.append(x)
        return x

    return ran, work


async def cancel(call: asyncio.Future[Any]) -> None:
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def queue_and_cancel(client: Any, broker_url: str, task: str) -> None:
    """Call ``task`` with "cancelled", wait until the call is in its queue, cancel it."""
    call = asyncio.ensure_future(client.call(task, "cancelled", expiration=60))
    await queued(broker_url, task, 1)
    await cancel(call)
    # The notice leaves at the end of this loop iteration on crew's fast path, at the next
    # poll on pika's public one; a worker started next (serve_in_thread) blocks the loop.
    await asyncio.sleep(0.1)


@pytest.mark.gen_test(timeout=60)
async def test_a_call_cancelled_while_no_worker_runs_never_starts_on_a_later_worker(
        make_worker, client, broker_url, uid):
    task = f"work.{uid}"
    ran, work = recorder()
    serve_once(broker_url, {task: work})
    await queue_and_cancel(client, broker_url, task)  # no worker is there to read the notice
    await asyncio.sleep(5)  # the case of issue 14: a worker starts 5 s later
    make_worker({task: work}, concurrency=1)
    # Queued behind the cancelled call: answered only once that one was dealt with.
    assert await client.call(task, "probe", expiration=10) == "probe"
    assert ran == ["probe"]
    await queued(broker_url, task, 0)


@pytest.mark.gen_test(timeout=60)
async def test_a_starting_worker_reads_every_earlier_notice_before_it_takes_a_call(
        make_worker, client, broker_url, uid):
    # Thousands of notices ahead of the real one: a worker that took calls before it had
    # read the stream up to now would start the cancelled call before reading its notice.
    task = f"work.{uid}"
    ran, work = recorder()
    serve_once(broker_url, {task: work})
    deadline = protocol.now_ms() + 60_000
    with raw_channel(broker_url) as channel:
        for n in range(3000):
            channel.basic_publish(protocol.CONTROL_EXCHANGE, "", b"", pika.BasicProperties(
                type=protocol.CANCEL_TYPE, correlation_id=f"other.{n}", reply_to="nobody",
                headers={protocol.DEADLINE_HEADER: deadline}))
    await queue_and_cancel(client, broker_url, task)
    worker = make_worker({task: work}, concurrency=1)
    assert await client.call(task, "probe", expiration=10) == "probe"
    assert ran == ["probe"]
    assert ("nobody", "other.2999") in worker._calls._cancelled


@pytest.mark.gen_test(timeout=60)
async def test_a_worker_reads_the_stream_again_when_the_broker_cancels_its_reading(
        make_worker, client, broker_url, uid, caplog):
    caplog.set_level(logging.INFO, logger="crew")
    task = f"work.{uid}"
    ran: list[str] = []
    busy, release = threading.Event(), threading.Event()

    def work(x: str) -> str:
        if x == "block":
            busy.set()
            release.wait(20)
        ran.append(x)
        return x

    worker = make_worker({task: work}, concurrency=1)
    assert caplog.text.count("cancel notices read from crew.cancels") == 1
    with raw_channel(broker_url) as channel:
        channel.queue_delete(protocol.CANCEL_STREAM)  # the broker cancels its consumers
    await until(lambda: caplog.text.count("cancel notices read from crew.cancels") == 2,
                "the worker did not read the stream again")
    assert "following them again after the broker cancelled their consumer" in caplog.text
    blocker = asyncio.ensure_future(client.call(task, "block", expiration=30))
    assert await asyncio.to_thread(busy.wait, 10)
    call = asyncio.ensure_future(client.call(task, "cancelled", expiration=30))
    await queued(broker_url, task, 1)
    remembered = worker._calls._cancelled
    before = len(remembered)  # notices of earlier tests in this vhost's stream are there too
    await cancel(call)
    await until(lambda: len(remembered) == before + 1, "the notice did not reach the worker")
    release.set()
    assert await blocker == "block"
    assert await client.call(task, "after", expiration=10) == "after"
    assert ran == ["block", "after"]


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds, asking a bounded number of times."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, what
        await asyncio.sleep(0.02)
