"""Every call ends with one clear answer by its deadline (the deadline issue), on the real
broker."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pika
import pytest

import crew
from crew import ExpirationError, JobKilled, TimeoutError, protocol
from crew.amqp import Connection
from crew.settings import BrokerSettings
from crew.worker import Worker, serve_in_thread


def _declare_queues(make_worker, tasks):
    """Make the task queues exist with no worker behind them."""
    worker = make_worker(tasks)
    worker.request_stop(grace=0)


async def _elapsed(coro):
    started = time.monotonic()
    try:
        await coro
    except Exception as exc:  # noqa: BLE001 - the failure is what is measured
        return exc, time.monotonic() - started
    raise AssertionError("the call did not fail")


@pytest.mark.gen_test(timeout=60)
async def test_no_worker_at_all_gives_expiration_error_from_the_dead_letter(
        make_worker, make_client, uid):
    task = f"idle.{uid}"
    _declare_queues(make_worker, {task: lambda x: x})
    # A long grace: only the dead letter, not the client's own timer, can answer in time.
    first, second = await make_client(deadline_grace=20), await make_client(deadline_grace=20)
    (error1, took1), (error2, took2) = await asyncio.gather(
        _elapsed(first.call(task, expiration=1)), _elapsed(second.call(task, expiration=1)))
    # Each client got its own dead letter: none went to the other client and was lost.
    assert isinstance(error1, ExpirationError) and isinstance(error2, ExpirationError)
    assert took1 < 10 and took2 < 10


@pytest.mark.gen_test(timeout=60)
async def test_calls_waiting_when_the_worker_stops_expire(make_worker, client, uid):
    busy, release = threading.Event(), threading.Event()

    def work(x):
        busy.set()
        release.wait(30)
        return x

    worker = make_worker({f"stop.{uid}": work}, concurrency=1)
    consumers_cancelled = threading.Event()
    cancel_consumers = worker._cancel_consumers

    async def cancelling() -> None:
        await cancel_consumers()
        consumers_cancelled.set()

    worker._cancel_consumers = cancelling
    running = asyncio.ensure_future(client.call(f"stop.{uid}", "running", expiration=20))
    assert await asyncio.to_thread(busy.wait, 10)
    waiting = asyncio.ensure_future(client.call(f"stop.{uid}", "waiting", expiration=2))
    await asyncio.sleep(0.2)
    worker.request_stop(grace=10)
    # Released only once the worker takes no more calls: a job that ended before the stop
    # began would free its slot for "waiting" (on RabbitMQ 4.3 under load, 1 run in 4).
    assert await asyncio.to_thread(consumers_cancelled.wait, 10)
    release.set()  # within the grace: answered, so "waiting" is first in the queue
    assert await running == "running"
    with pytest.raises(ExpirationError):
        await waiting


@pytest.mark.gen_test(timeout=60)
async def test_endless_loop_is_killed_at_the_deadline_and_the_worker_goes_on(
        make_worker, client, uid):
    seen: list[type] = []

    def dead(_):
        try:
            while True:
                pass
        except BaseException as exc:
            seen.append(type(exc))
            raise

    make_worker({f"dead.{uid}": dead, f"echo.{uid}": lambda x: x}, concurrency=1)
    error, took = await _elapsed(client.call(f"dead.{uid}", expiration=1))
    assert isinstance(error, TimeoutError) and isinstance(error, builtins_timeout())
    assert 0.9 < took < 5
    assert await client.call(f"echo.{uid}", "next") == "next"
    assert seen == [JobKilled] and issubclass(JobKilled, SystemExit)


def builtins_timeout():
    import builtins
    return builtins.TimeoutError


@pytest.mark.gen_test(timeout=60)
async def test_uninterruptible_sleep_is_answered_at_the_deadline_and_the_slot_is_replaced(
        make_worker, client, uid):
    def nap(_):
        time.sleep(3600)  # C-level sleep: the kill cannot land

    worker = make_worker({f"nap.{uid}": nap, f"echo.{uid}": lambda x: x}, concurrency=1)
    error, took = await _elapsed(client.call(f"nap.{uid}", expiration=1))
    assert isinstance(error, TimeoutError)
    assert took < 5
    # Same worker, concurrency 1: the stuck thread no longer holds the only slot.
    assert await client.call(f"echo.{uid}", "next", expiration=10) == "next"
    assert len(worker._calls.threads.stuck) == 1


@pytest.mark.gen_test(timeout=60)
async def test_too_many_stuck_threads_make_the_worker_drain_and_exit(
        make_worker, client, broker_url, uid):
    def nap(_):
        time.sleep(3600)

    tasks = {f"nap.{uid}": nap, f"echo.{uid}": lambda x: x}
    worker = Worker(tasks, broker=broker_url, concurrency=1, max_stuck=1, grace=5)
    thread = serve_in_thread(worker)
    for _ in range(2):
        with pytest.raises(TimeoutError):
            await client.call(f"nap.{uid}", expiration=0.5)
    await asyncio.to_thread(thread.join, 20)
    assert not thread.is_alive() and worker.exit_reason == "stuck"
    # The calls it did not take are still in the broker for a fresh worker.
    waiting = asyncio.ensure_future(client.call(f"echo.{uid}", "kept", expiration=20))
    await asyncio.sleep(0.3)
    make_worker(tasks)
    assert await waiting == "kept"


@pytest.mark.gen_test(timeout=60)
async def test_expired_high_priority_call_behind_a_long_call_never_runs(
        make_worker, broker_url, make_client, uid):
    """RabbitMQ may deliver an expired message from a priority queue and never dead-letter
    it; the worker checks the deadline itself and answers it as expired."""
    ran: list[str] = []
    task = f"prio.{uid}"
    _declare_queues(make_worker, {task: lambda x: x})
    caller = await make_client(deadline_grace=30)
    slow = asyncio.ensure_future(caller.call(task, "low", priority=0, expiration=60))
    urgent = asyncio.ensure_future(caller.call(task, "high", priority=9, expiration=0.5))
    await asyncio.sleep(1.5)  # "high" expires while nobody consumes
    make_worker({task: lambda x: ran.append(x) or x})
    assert await slow == "low"
    with pytest.raises(ExpirationError):
        await urgent
    assert ran == ["low"]


@pytest.mark.gen_test(timeout=60)
async def test_client_answers_by_itself_when_no_answer_can_come(client, broker_url, uid):
    """A consumer holds the call without answering: a held (prefetched) message never
    expires, so no dead letter comes; the client's own timer ends the call."""
    task = f"held.{uid}"
    holder = await Connection.open(BrokerSettings.from_url(broker_url))
    try:
        channel = await holder.channel()
        await channel.declare_queue(protocol.task_queue(task), durable=True,
                                    arguments=protocol.task_queue_arguments(10))
        await channel.consume(protocol.task_queue(task), lambda *args: None)
        client.deadline_grace = 0.2
        error, took = await _elapsed(client.call(task, expiration=0.5))
        assert isinstance(error, TimeoutError) and "may or may not have run" in str(error)
        assert took < 5
        assert client._pending == {}
    finally:
        await holder.close()


@pytest.mark.gen_test(timeout=60)
async def test_cancelling_a_running_call_stops_the_job(make_worker, client, uid):
    started, stopped = threading.Event(), threading.Event()

    def spin(_):
        started.set()
        try:
            while True:
                pass
        except JobKilled:
            stopped.set()
            raise

    make_worker({f"spin.{uid}": spin, f"echo.{uid}": lambda x: x}, concurrency=1)
    call = asyncio.ensure_future(client.call(f"spin.{uid}", expiration=60))
    assert await asyncio.to_thread(started.wait, 10)
    call.cancel()
    assert await asyncio.to_thread(stopped.wait, 10)  # long before the 60 s deadline
    assert await client.call(f"echo.{uid}", "free", expiration=10) == "free"


@pytest.mark.gen_test(timeout=60)
async def test_cancelling_a_queued_call_keeps_it_from_ever_starting(make_worker, client, uid):
    ran: list[str] = []
    busy, release = threading.Event(), threading.Event()

    def work(x):
        if x == "block":
            busy.set()
            release.wait(20)
        ran.append(x)
        return x

    make_worker({f"work.{uid}": work}, concurrency=1)
    blocker = asyncio.ensure_future(client.call(f"work.{uid}", "block", expiration=30))
    assert await asyncio.to_thread(busy.wait, 10)
    queued = asyncio.ensure_future(client.call(f"work.{uid}", "queued", expiration=30))
    await asyncio.sleep(0.2)
    queued.cancel()
    await asyncio.sleep(0.3)  # the cancel notice reaches the worker
    release.set()
    assert await blocker == "block"
    assert await client.call(f"work.{uid}", "after", expiration=10) == "after"
    assert ran == ["block", "after"]


def _wait_until_gone(broker_url: str, queue: str, timeout: float = 10.0) -> None:
    """Wait until the broker has deleted ``queue``. An exclusive queue goes a moment after
    its connection's close-ok: within 2 ms on RabbitMQ 3.10, up to tens of ms on 4.3
    (measured), and a message sent meanwhile is routed to it, not returned. The broker
    cannot tell another connection, so ask again for a bounded time."""
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    end = time.monotonic() + timeout
    try:
        while True:
            try:
                connection.channel().queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                assert exc.reply_code == 404, exc
                return
            assert time.monotonic() < end, f"{queue} still exists {timeout} s after its owner left"
            time.sleep(0.01)
    finally:
        connection.close()


@pytest.mark.gen_test(timeout=60)
async def test_reply_to_a_caller_that_is_gone_is_dropped_and_logged(
        make_worker, make_client, client, broker_url, uid, caplog):
    started, release = threading.Event(), threading.Event()

    def slow(x):
        started.set()
        release.wait(20)
        return x

    make_worker({f"slow.{uid}": slow}, concurrency=1)
    leaver = await make_client()
    call = asyncio.ensure_future(leaver.call(f"slow.{uid}", "late", expiration=30))
    assert await asyncio.to_thread(started.wait, 10)
    queue = leaver._reply_queue
    with caplog.at_level(logging.WARNING, logger="crew.worker"):
        await leaver.close()  # its reply queue is deleted with its connection
        with pytest.raises(crew.ConnectionLostError):
            await call
        await asyncio.to_thread(_wait_until_gone, broker_url, queue)
        release.set()
        assert await client.call(f"slow.{uid}", "next", expiration=10) == "next"
    assert any("caller's queue" in r.getMessage() for r in caplog.records)


@pytest.mark.gen_test(timeout=60)
async def test_duplicate_and_late_replies_are_ignored(make_worker, client, broker_url, uid):
    release = threading.Event()
    make_worker({f"slow.{uid}": lambda x: release.wait(20) and x})
    call = asyncio.ensure_future(client.call(f"slow.{uid}", "real", expiration=30))
    await asyncio.sleep(0.2)
    (correlation_id,) = client._pending

    def forge_replies():
        connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        channel = connection.channel()
        for text in ("first", "second"):
            channel.basic_publish("", client._reply_queue, b"\xa5" + text.encode()[:5].ljust(5),
                                  pika.BasicProperties(
                                      correlation_id=correlation_id,
                                      content_type="application/msgpack",
                                      headers={"crew-status": "ok"}))
        connection.close()

    await asyncio.to_thread(forge_replies)
    assert await call == "first"  # the first reply settles the call; the rest are dropped
    release.set()
    await asyncio.sleep(0.3)  # the worker's real reply arrives late and is dropped too
    assert client._pending == {}
    assert await client.call(f"slow.{uid}", "again", expiration=10) == "again"
