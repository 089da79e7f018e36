"""crew's fast path under pika (crew/transport.py, crew/frames.py): frames split anywhere
parse as pika parses them, writes leave in one sendmsg per loop iteration, a full socket or
a dead peer is handled, and calls work both with these and with pika's own code (the public
path). Every test here takes the fast path whatever CREW_PIKA_PATH says, except where
``io_path`` runs it on both."""

from __future__ import annotations

import asyncio
import os
import threading

import pika.exceptions
import pika.frame
import pika.spec
import pytest
from pika.adapters.utils import io_services_utils

from crew import seam
from crew.transport import CoalescingTransport, FrameReadingConnection, PublicConnection


@pytest.fixture(autouse=True)
def _fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(seam.ENV, "fast")


@pytest.fixture(params=["crew", "pika"])
def io_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with crew's reads and writes, and again with pika's own (the fallback)."""
    if request.param == "pika":
        monkeypatch.setenv(seam.ENV, "public")
    return request.param


@pytest.mark.gen_test(timeout=60)
async def test_calls_work_on_both_paths(io_path, make_worker, client, uid):
    make_worker({f"echo.{uid}": lambda x: x}, concurrency=16)
    pika_connection = client._connection._connection
    expected = ((FrameReadingConnection, CoalescingTransport) if io_path == "crew"
                else (PublicConnection, io_services_utils._AsyncPlaintextTransport))
    assert (type(pika_connection), type(pika_connection._transport)) == expected
    big = os.urandom(3 * 1024 * 1024 + 17)  # many frames, not a multiple of the frame size
    assert await client.call(f"echo.{uid}", big, persistent=False) == big
    small = await asyncio.gather(*(client.call(f"echo.{uid}", n, persistent=False)
                                   for n in range(300)))
    assert small == list(range(300))


@pytest.mark.gen_test(timeout=60)
async def test_a_lone_call_leaves_at_once_and_concurrent_calls_together(make_worker, client,
                                                                         uid):
    gate = threading.Event()
    make_worker({f"echo.{uid}": lambda x: x, f"wait.{uid}": lambda _: gate.wait(30)},
                concurrency=2)
    await client.call(f"echo.{uid}", 0)
    tx = client._connection._connection._transport
    sent: list[int] = []
    produce = tx._produce
    tx._produce = lambda: (sent.append(1), produce())[1]
    waiting = asyncio.ensure_future(client.call(f"wait.{uid}", None, persistent=False))
    await asyncio.sleep(0)  # the call's first step (up to its publish) runs, then this
    assert sent == [1] and not tx._tx_buffers  # alone: flushed in the call's own step
    second = asyncio.ensure_future(client.call(f"echo.{uid}", 1, persistent=False))
    await asyncio.sleep(0)
    try:
        assert sent == [1] and tx._tx_buffers  # another is under way: it waits for the end
        await asyncio.sleep(0)  # of the loop iteration, with whatever else is written
        assert sent == [1, 1] and not tx._tx_buffers
        assert await second == 1
    finally:
        gate.set()
    assert await waiting is True


@pytest.mark.gen_test(timeout=60)
async def test_a_workers_replies_leave_with_the_batch_that_answers_them(make_worker, client,
                                                                         uid):
    worker = make_worker({f"echo.{uid}": lambda x: x}, concurrency=4)
    await client.call(f"echo.{uid}", 0)
    handler = worker._calls.replies
    answer_finished = handler._answer_finished
    left_unsent: list[int] = []

    def watched() -> None:
        answer_finished()
        left_unsent.append(len(handler.channel._channel.connection._transport._tx_buffers))

    handler._answer_finished = watched
    assert await asyncio.gather(*(client.call(f"echo.{uid}", n) for n in range(20))) == \
        list(range(20))
    assert left_unsent and not any(left_unsent)


@pytest.mark.gen_test(timeout=30)
async def test_the_loop_writes_and_processes_frames_under_the_send_lock(client, uid):
    connection = client._connection._connection
    lock, tx = connection._crew_send_lock, connection._transport
    held: list[bool] = []
    write, process = tx.write, connection._process_frame
    tx.write = lambda data: (held.append(lock._is_owned()), write(data))[1]
    connection._process_frame = lambda value: (held.append(lock._is_owned()), process(value))[1]
    try:
        await client.subscribe(f"locked.{uid}", lambda data: None)
        await client.publish(f"locked.{uid}", "x")
    finally:
        tx.write, connection._process_frame = write, process
    # A thread's frames can then never land inside a message, nor between pika's CloseOk
    # and the moment pika marks the channel closed.
    assert len(held) >= 4 and all(held)


@pytest.mark.gen_test(timeout=30)
async def test_a_connection_sends_a_threads_frames_only_while_the_channel_is_open(client):
    connection = client._connection._connection
    heartbeat = [pika.frame.Heartbeat().marshal()]  # harmless to send to the broker
    sent_before = connection.bytes_sent
    assert not await asyncio.to_thread(connection.send_now, heartbeat, lambda: False)
    assert connection.bytes_sent == sent_before
    assert await asyncio.to_thread(connection.send_now, heartbeat, lambda: True)
    assert connection.bytes_sent == sent_before + len(heartbeat[0])


@pytest.mark.gen_test(timeout=60)
async def test_on_pikas_own_transport_the_worker_loop_sends_every_reply(
        io_path, make_worker, client, uid, monkeypatch):
    from crew.amqp import Channel

    answered: list[bool] = []
    send = Channel.publish_and_ack_now
    monkeypatch.setattr(Channel, "publish_and_ack_now",
                        lambda self, *a, **k: (answered.append(send(self, *a, **k)),
                                               answered[-1])[1])
    make_worker({f"echo.{uid}": lambda x: x})
    for n in range(3):
        assert await client.call(f"echo.{uid}", n) == n
    # Sequential calls are answered by their job thread on crew's transport; on pika's
    # own (as on TLS) the thread's send is refused and the loop answers. (A call that
    # arrives before the loop forgot the previous one, which its thread answered, is not
    # alone and goes the loop's way from the start: on a loaded machine, one of three.)
    assert answered and (all(answered) if io_path == "crew" else not any(answered))
