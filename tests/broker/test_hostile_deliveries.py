"""Hostile input to crew's other listeners: what anyone who may publish to the vhost can send
to a worker's cancel notices and presence requests, a client's reply queue and pubsub
channels, and a dashboard's figures, and to the frames under all of them. Each test
publishes the forged messages with plain pika, then checks that legitimate traffic sent
after them is still served on the same connection (pika closes the connection of a callback
that raises). Calls to a worker's task queues: tests/broker/test_hostile.py.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
from typing import Any

import msgpack
import pika
import pytest

from crew import RemoteError, protocol
from crew.amqp import Connection
from crew.settings import BrokerSettings
from tests.support.tasks import holding
from tests.support.hostile import (
    MSGPACK,
    RawField,
    RawPublisher,
    crew_log_lines,
    decode_reply,
    raw_fields,
)


def _nested_arrays(depth: int) -> RawField:
    """A header value of ``depth`` arrays, one inside the other, around a void: valid AMQP,
    which the broker passes through and pika's recursive reader cannot read."""
    value = b"V"
    for _ in range(depth):
        value = b"A" + struct.pack(">L", len(value)) + value
    return RawField(value)


@pytest.mark.gen_test(timeout=60)
async def test_headers_nested_thousands_deep_close_no_connection(make_worker, client,
                                                                 broker_url, caplog, uid):
    """A call, a cancel notice (kept by the stream, read again by every worker that
    connects) and a message on a client's reply queue, each with a header 3000 arrays deep:
    pika's reader raised RecursionError, which closed the connection, again at each
    redelivery or reconnection."""
    caplog.set_level(logging.INFO, logger="crew")
    task = f"echo.{uid}"
    make_worker({task: lambda x: {"got": x}})
    deep = {"deep": _nested_arrays(3000)}
    publisher = RawPublisher(broker_url)
    try:
        with raw_fields():
            publisher.send("", b"", exchange=protocol.CONTROL_EXCHANGE,
                           type=protocol.CANCEL_TYPE, correlation_id="forged",
                           reply_to="nobody", headers=deep)
            publisher.send(client._reply_queue, b"\xc0", correlation_id="forged",
                           content_type=MSGPACK, headers=deep)
            cid = publisher.call(task, b'"deep"', headers=deep)
        reply = publisher.wait(cid)
        assert reply is not None, "the worker did not answer the call"
        assert decode_reply(reply) == ("ok", {"got": "deep"})
        publisher.normal_call(task)
    finally:
        publisher.close()
    assert await client.call(task, "after", expiration=10) == {"got": "after"}
    lost = [line for line in crew_log_lines(caplog) if "lost its broker" in line]
    assert lost == []


@pytest.mark.gen_test(timeout=30)
async def test_pubsub_channel_name_not_utf8_is_dropped_and_the_subscription_goes_on(
        client, broker_url, caplog, uid):
    """The broker routes a routing key that is not UTF-8 to a wildcard binding; pika gives
    it as bytes, which crew's topic matching could not split: TypeError in pika's callback,
    and the client's connection closed (every pending call lost with it)."""
    caplog.set_level(logging.INFO, logger="crew")
    got: list[Any] = []
    done = asyncio.Event()

    def on_news(data: Any) -> None:
        got.append(data)
        done.set()

    await client.subscribe(f"news.{uid}.*", on_news)
    publisher = RawPublisher(broker_url)
    try:
        for key, data in ((f"news.{uid}.".encode() + b"\xff", "forged"),
                          (f"news.{uid}.fine", "fine")):
            publisher.send(key, msgpack.packb(data), exchange=protocol.PUBSUB_EXCHANGE,
                           content_type=MSGPACK)
    finally:
        publisher.close()
    await asyncio.wait_for(done.wait(), 10)
    assert got == ["fine"]
    lines = crew_log_lines(caplog)
    assert len(lines) == 1 and "not UTF-8" in lines[0], lines


@pytest.mark.gen_test(timeout=60)
async def test_error_reply_nested_past_the_stack_does_not_cut_the_client(
        make_worker, client, broker_url, caplog, uid):
    """Whoever knows a pending call's id (crew inspect and the dashboard's figures list
    them) may answer it first; an error envelope 990 lists deep raised RecursionError in
    the reply callback, and pika closed the client's connection."""
    caplog.set_level(logging.INFO, logger="crew")
    task = f"hold.{uid}"
    started, release = threading.Event(), threading.Event()
    make_worker({task: holding(started, release)})
    call = asyncio.ensure_future(client.call(task, "real", expiration=20))
    assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    (cid,) = client._pending
    publisher = RawPublisher(broker_url)
    try:
        publisher.send(client._reply_queue, b"\x91" * 990 + b"\xc0", correlation_id=cid,
                       content_type=MSGPACK, headers={protocol.STATUS_HEADER: "error"})
    finally:
        publisher.close()
    with pytest.raises(RemoteError) as info:
        await call
    assert info.value.message == "<list nested too deep to show>"
    release.set()
    assert await client.call(task, "after", expiration=10) == "after"
    assert not [line for line in crew_log_lines(caplog) if "lost its broker" in line]


@pytest.mark.gen_test(timeout=30)
async def test_a_listener_that_raises_costs_its_message_not_the_connection(broker_url, caplog):
    """Every no-ack consumer of crew's (replies, presence, figures, dead letters, live cancel
    notices) is guarded: what a callback raises on a message, forged or met by a bug, is
    logged and the message dropped; pika would close the connection, failing every pending
    call on it."""
    connection = await Connection.open(BrokerSettings.from_url(broker_url))
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        got: list[bytes] = []
        done = asyncio.Event()

        def on_message(_channel: Any, _method: Any, _props: Any, body: bytes) -> None:
            if body == b"bad":
                raise RuntimeError("a bug, or a message nobody foresaw")
            got.append(body)
            done.set()

        await channel.consume(queue, on_message, auto_ack=True)
        for body in (b"bad", b"good"):
            channel.publish("", queue, body, pika.BasicProperties())
        channel.flush()
        await asyncio.wait_for(done.wait(), 10)
        assert got == [b"good"] and connection.is_open and channel.is_open
        assert f"a message from queue {queue!r} could not be handled; dropped" in caplog.text
    finally:
        await connection.close()
