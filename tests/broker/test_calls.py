"""Calls end to end against the real broker: results, errors, headers, parallel, payloads."""

from __future__ import annotations

import asyncio
import os
import random
import threading

import pytest

import crew
from crew import Client, RemoteError, UnknownTaskError, codec
from crew.worker import context
from tests.support.rawamqp import raw_channel


@pytest.mark.gen_test(timeout=30)
async def test_call_returns_the_task_result(make_worker, client, uid):
    make_worker({f"echo.{uid}": lambda x: x})
    payload = {"text": "Wake up Neo.", "bytes": b"\x00\xff", "list": [1, 2.5, None, True]}
    assert await client.call(f"echo.{uid}", payload) == payload
    assert await client.call(f"echo.{uid}") is None


@pytest.mark.gen_test(timeout=30)
async def test_task_exception_becomes_remote_error_with_type_message_traceback(
        make_worker, client, uid):
    def explode(x):
        raise KeyError(f"no such thing: {x}")

    make_worker({f"boom.{uid}": explode})
    with pytest.raises(RemoteError) as info:
        await client.call(f"boom.{uid}", "spoon")
    error = info.value
    assert isinstance(error, crew.CrewError)
    assert error.type == "KeyError"
    assert "no such thing: spoon" in error.message
    assert "explode" in error.traceback and "Traceback" in error.traceback


@pytest.mark.gen_test(timeout=30)
async def test_headers_reach_the_task_and_come_back(make_worker, client, uid):
    def stat(_):
        seen = dict(context.headers)
        context.headers["x_served_by"] = "stat"
        return seen

    make_worker({f"stat.{uid}": stat})
    result, headers = await client.call(f"stat.{uid}", None, headers={"request": "abc"},
                                        return_headers=True)
    assert result == {"request": "abc"}
    assert headers == {"request": "abc", "x_served_by": "stat"}


@pytest.mark.gen_test(timeout=30)
async def test_x_headers_travel_both_ways_and_reserved_names_do_not(make_worker, client, uid,
                                                                    broker_url, caplog):
    # The README's own example: x- names are the commonest custom headers there are.
    decoy = f"crew.test.decoy.{uid}"
    with raw_channel(broker_url) as channel:
        channel.queue_declare(decoy, durable=True)  # RabbitMQ 4.3 refuses transient ones

    def stat(_):
        seen = dict(context.headers)
        context.headers["x-answer"] = 42
        context.headers["CC"] = [decoy]  # the broker would copy the reply there
        context.headers["crew-status"] = "forged"
        return seen

    make_worker({f"stat.{uid}": stat})
    try:
        result, headers = await client.call(f"stat.{uid}", None, return_headers=True,
                                            headers={"x-request": "abc", "x-request-id": "r1"})
        assert result == {"x-request": "abc", "x-request-id": "r1"}
        assert headers == {"x-request": "abc", "x-request-id": "r1", "x-answer": 42}
        assert "reserved header(s) ['CC', 'crew-status'] set by task" in caplog.text
        with raw_channel(broker_url) as channel:
            assert channel.queue_declare(decoy, passive=True).method.message_count == 0
    finally:
        with raw_channel(broker_url) as channel:
            channel.queue_delete(decoy)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("gzip", [None, True, False])
async def test_the_callers_gzip_choice_holds_for_the_call_and_its_reply(
        make_worker, client, uid, monkeypatch, gzip):
    decoded: list[tuple[int, str | None]] = []  # (body size, content encoding), both ends
    real_decode = codec.decode

    def recording_decode(body, content_type, content_encoding=None):
        decoded.append((len(body), content_encoding))
        return real_decode(body, content_type, content_encoding)

    monkeypatch.setattr(codec, "decode", recording_decode)
    text = "Wake up Neo.\n" * 10_000  # 130 kB of text: automatic gzip compresses it
    make_worker({f"echo.{uid}": lambda x: x})
    assert await client.call(f"echo.{uid}", text, gzip=gzip) == text
    encodings = [encoding for _, encoding in decoded]
    assert len(encodings) == 2  # the call, at the worker; the reply, at the client
    expected = None if gzip is False else "gzip"
    assert encodings == [expected, expected]


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_jobs_never_see_each_others_headers(make_worker, client, uid):
    together = threading.Barrier(4, timeout=10)

    def mine(n):
        context.headers["mine"] = n
        together.wait()  # all four jobs are inside the task at once
        return context.headers["request"], context.headers["mine"]

    make_worker({f"mine.{uid}": mine}, concurrency=4)
    calls = [client.call(f"mine.{uid}", n, headers={"request": n}, return_headers=True)
             for n in range(4)]
    for n, (result, headers) in enumerate(await asyncio.gather(*calls)):
        assert result == [n, n]
        assert headers == {"request": n, "mine": n}


@pytest.mark.gen_test(timeout=30)
async def test_parallel_returns_results_in_call_order_with_errors_in_their_slots(
        make_worker, client, uid):
    def boom(_):
        raise ValueError("nope")

    make_worker({f"echo.{uid}": lambda x: x, f"boom.{uid}": boom}, concurrency=2)
    with client.parallel() as mc:
        mc.call(f"echo.{uid}", 1)
        mc.call(f"boom.{uid}")
        mc.call(f"echo.{uid}", "three")
        first, second, third = await mc.result()
    assert first == 1 and third == "three"
    assert isinstance(second, RemoteError) and second.type == "ValueError"


@pytest.mark.gen_test(timeout=30)
async def test_leaving_parallel_without_awaiting_cancels_the_calls(make_worker, client, uid):
    release = threading.Event()
    make_worker({f"wait.{uid}": lambda _: release.wait(20)})
    with client.parallel() as mc:
        started = mc.call(f"wait.{uid}")
        await asyncio.sleep(0)  # let the call be published
    with pytest.raises(asyncio.CancelledError):
        await started
    assert client._pending == {}
    release.set()


@pytest.mark.gen_test(timeout=30)
async def test_async_task_runs_on_the_worker_loop(make_worker, client, uid):
    async def later(x):
        await asyncio.sleep(0.01)
        return {"later": x, "headers": dict(context.headers)}

    make_worker({f"later.{uid}": later})
    assert await client.call(f"later.{uid}", 5, headers={"h": 1}) == {
        "later": 5, "headers": {"h": 1}}


@pytest.mark.gen_test(timeout=30)
async def test_settings_are_shared_by_jobs_and_persist(make_worker, client, uid):
    def count(_):
        context.settings.counter += 1
        return context.settings.counter, context.settings.uuid

    worker = make_worker({f"count.{uid}": count}, settings={"counter": 0})
    results = [await client.call(f"count.{uid}") for _ in range(3)]
    assert [n for n, _ in results] == [1, 2, 3]
    assert {u for _, u in results} == {worker.uuid}


@pytest.mark.gen_test(timeout=30)
async def test_unknown_task_raises_at_once(client, uid):
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UnknownTaskError) as info:
        await client.call(f"missing.{uid}", expiration=60)
    assert loop.time() - started < 10  # not the 60 s deadline
    assert info.value.task == f"missing.{uid}"
    assert client._pending == {}


@pytest.mark.gen_test(timeout=60)
async def test_jobs_run_in_parallel_up_to_the_concurrency(make_worker, client, uid):
    together = threading.Barrier(3, timeout=10)  # breaks unless three jobs run at once
    make_worker({f"meet.{uid}": lambda _: together.wait()}, concurrency=3)
    results = await asyncio.gather(*[client.call(f"meet.{uid}") for _ in range(3)])
    assert sorted(results) == [0, 1, 2]


@pytest.mark.gen_test(timeout=60)
async def test_a_busy_worker_does_not_hoard_waiting_calls(make_worker, client, uid):
    """The prefetch follows the concurrency: a second call waits in the broker, where a
    second worker takes it while the first is still busy."""
    release = threading.Event()
    busy = threading.Event()

    def work(x):
        if x == "block":
            busy.set()
            release.wait(20)
        return x

    make_worker({f"work.{uid}": work}, concurrency=1)
    blocked = asyncio.ensure_future(client.call(f"work.{uid}", "block"))
    assert await asyncio.to_thread(busy.wait, 10)
    second = asyncio.ensure_future(client.call(f"work.{uid}", "second"))
    await asyncio.sleep(0.3)  # the second call is published while the first worker is busy
    make_worker({f"work.{uid}": work}, concurrency=1)
    assert await asyncio.wait_for(second, 10) == "second"
    assert not blocked.done()
    release.set()
    assert await blocked == "block"


@pytest.mark.gen_test(timeout=60)
async def test_waiting_calls_are_served_in_priority_order(make_worker, client, uid):
    order: list[str] = []
    release = threading.Event()
    busy = threading.Event()

    def work(x):
        if x == "block":
            busy.set()
            release.wait(20)
        order.append(x)
        return x

    make_worker({f"prio.{uid}": work}, concurrency=1, max_priority=10)
    blocked = asyncio.ensure_future(client.call(f"prio.{uid}", "block"))
    assert await asyncio.to_thread(busy.wait, 10)
    waiting = [asyncio.ensure_future(client.call(f"prio.{uid}", name, priority=priority))
               for name, priority in [("low", 0), ("mid", 5), ("top", 255), ("high", 9)]]
    await asyncio.sleep(0.3)  # all four are queued before the worker is free
    release.set()
    await asyncio.gather(blocked, *waiting)
    # 255 counts as the queue's maximum (10): above 9, served first.
    assert order == ["block", "top", "high", "mid", "low"]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("priority", [-1, 256, 1.5, True])
async def test_priority_outside_0_to_255_is_refused(client, priority):
    with pytest.raises((ValueError, TypeError)):
        await client.call("anything", priority=priority)


@pytest.mark.gen_test(timeout=30)
async def test_json_client_calls_and_reads_json_replies(make_worker, broker_url, io_loop, uid):
    make_worker({f"echo.{uid}": lambda x: {"echo": x}})
    async with Client(broker_url, content_type="application/json") as json_client:
        assert await json_client.call(f"echo.{uid}", [1, "two"]) == {"echo": [1, "two"]}


@pytest.mark.gen_test(timeout=60)
async def test_large_bodies_round_trip_gzipped_or_not(make_worker, client, uid):
    received = []

    def size(x):
        received.append(len(x))
        return x

    make_worker({f"size.{uid}": size})
    text = ("All work and no play makes Jack a dull boy. " * 30000).encode()
    noise = os.urandom(1_000_000)
    assert await client.call(f"size.{uid}", text) == text  # auto: compressed
    assert await client.call(f"size.{uid}", noise) == noise  # auto: sent plain
    assert await client.call(f"size.{uid}", b"small", gzip=True) == b"small"
    assert await client.call(f"size.{uid}", text, gzip=False) == text
    assert received == [len(text), len(noise), 5, len(text)]


@pytest.mark.gen_test(timeout=60)
async def test_a_client_gzips_and_inflates_large_bodies_off_its_loop(make_worker, client, uid,
                                                                     monkeypatch):
    on_the_loop: list[str] = []
    elsewhere: list[str] = []

    def recording(func):
        def wrapper(*args, **kwargs):
            where = on_the_loop if threading.current_thread() is loop_thread else elsewhere
            where.append(func.__name__)
            return func(*args, **kwargs)
        return wrapper

    loop_thread = threading.current_thread()  # the test's loop runs the client
    monkeypatch.setattr(codec, "gzip_compress", recording(codec.gzip_compress))
    monkeypatch.setattr(codec, "gzip_decompress", recording(codec.gzip_decompress))
    make_worker({f"echo.{uid}": lambda x: x})
    words = [f"word{n}" for n in range(2000)]
    rng = random.Random(3)
    text = " ".join(rng.choice(words) for _ in range(300_000))  # ~2.4 MB, ~1 MB gzipped
    assert await client.call(f"echo.{uid}", text) == text
    small = "small " * 100
    assert await client.call(f"echo.{uid}", small, gzip=True) == small
    # Elsewhere: the client's large call and reply, and the worker's job thread inflating
    # both calls and compressing both replies (gzip=True holds for the reply too). The
    # small call's compression and its small reply's inflation stay on the loop (a thread
    # hop would cost more).
    assert on_the_loop == ["gzip_compress", "gzip_decompress"]
    assert sorted(elsewhere) == ["gzip_compress"] * 3 + ["gzip_decompress"] * 3


@pytest.mark.gen_test(timeout=60)
async def test_a_job_longer_than_three_heartbeats_neither_drops_nor_reruns(
        make_worker, client, broker_url, uid):
    runs = []

    def long_job(_):
        runs.append(1)
        threading.Event().wait(3.5)  # blocks its own thread only
        return "done"

    broker = crew.BrokerSettings.from_url(broker_url, heartbeat=1)
    worker = make_worker({f"long.{uid}": long_job}, broker=broker)
    assert await client.call(f"long.{uid}", expiration=30) == "done"
    assert runs == [1]
    assert worker._connection is not None and worker._connection.is_open


@pytest.mark.gen_test(timeout=30)
async def test_a_header_value_amqp_cannot_carry_becomes_an_error_reply(make_worker, client, uid):
    def bad_header(_):
        context.headers["bad"] = {1, 2}  # a set: not an AMQP field type
        return "unreachable"

    make_worker({f"bad.{uid}": bad_header, f"echo.{uid}": lambda x: x})
    with pytest.raises(RemoteError):
        await client.call(f"bad.{uid}", expiration=10)
    assert await client.call(f"echo.{uid}", "fine") == "fine"


@pytest.mark.gen_test(timeout=30)
async def test_connections_read_large_frames_in_one_go(client):
    """pika reads 4 KiB per recv() and copies its buffer on each: crew widens the reads on
    its connections (a 2x speed-up for 1 MB bodies, measured in bench/)."""
    if os.environ.get("CREW_PIKA_PATH", "").strip().lower() == "public":
        pytest.skip("pika's public path keeps pika's reads")
    transport = client._connection._connection._transport
    assert transport._MAX_RECV_BYTES >= 128 * 1024


@pytest.mark.gen_test(timeout=60)
async def test_serve_after_start_serves_the_started_worker(broker_url, client, uid):
    # serve() used to start a started worker again: a second connection consumed the same
    # queue and acked on the wrong channel, so the broker closed it and calls timed out.
    worker = crew.Worker({f"echo.{uid}": lambda x: x}, broker=broker_url, concurrency=8)
    await worker.start()
    with pytest.raises(RuntimeError, match="started before"):
        await worker.start()
    serving = asyncio.ensure_future(worker.serve())
    try:
        together = [client.call(f"echo.{uid}", n, expiration=10) for n in range(40)]
        assert await asyncio.gather(*together) == list(range(40))
        for n in range(10):
            assert await client.call(f"echo.{uid}", n, expiration=10) == n
    finally:
        worker.request_stop(grace=0)
        assert await asyncio.wait_for(serving, 20) == "stopped"


@pytest.mark.gen_test(timeout=30)
async def test_a_worker_that_could_not_connect_may_start_again(broker_url, uid):
    worker = crew.Worker({f"echo.{uid}": lambda x: x},
                         broker="amqp://guest:guest@127.0.0.1:1/%2F")
    with pytest.raises(crew.ConnectionLostError):
        await worker.start(timeout=0.5)
    with pytest.raises(crew.ConnectionLostError):  # not "started before"
        await worker.start(timeout=0.5)
