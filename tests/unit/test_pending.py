"""The client's pending-call table (crew.pending) and subscriptions (crew.pubsub), with no
broker: what settles a call, and what a subscription does before any connection."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest
from pika.spec import BasicProperties

from crew import codec, protocol
from crew.exceptions import (CallError, ConnectionLostError, ExpirationError, TimeoutError,
                             UnknownTaskError)
from crew import Client
from crew.pending import Call, Messages, Pending, Resend
from crew.pubsub import Subscriptions


def table_with(loop: asyncio.AbstractEventLoop, *calls: tuple[str, bool]) -> Pending:
    table = Pending()
    for correlation_id, retry in calls:
        table.calls[correlation_id] = Call("echo", loop.create_future(), 0, retry)
    return table


@pytest.mark.gen_test
async def test_a_reply_settles_its_call_and_one_for_no_call_is_dropped(caplog):
    table = table_with(asyncio.get_running_loop(), ("a", False))
    body, _ = codec.encode({"x": 1})
    props = BasicProperties(correlation_id="a", content_type=protocol.MSGPACK,
                            headers={protocol.STATUS_HEADER: protocol.STATUS_OK})
    with caplog.at_level(logging.INFO, logger="crew.client"):
        table.on_reply("", BasicProperties(correlation_id="forged"), b"")
    assert "matches no pending call" in caplog.text
    table.on_reply("", props, body)
    assert table.calls["a"].future.result() == ({"x": 1}, {})
    table.on_reply(protocol.EXPIRED_EXCHANGE, props, body)  # ended already: no change
    assert table.calls["a"].future.result() == ({"x": 1}, {})


@pytest.mark.gen_test
async def test_dead_letters_returns_and_deadlines_settle_with_their_errors():
    table = table_with(asyncio.get_running_loop(), ("a", False), ("b", False), ("c", False),
                       ("d", False))
    table.on_reply(protocol.EXPIRED_EXCHANGE, BasicProperties(correlation_id="a"), b"")
    table.on_return(None, SimpleNamespace(reply_code=312, reply_text="NO_ROUTE"),
                    BasicProperties(correlation_id="b"), b"")
    table.on_return(None, SimpleNamespace(reply_code=313, reply_text="NO_CONSUMERS"),
                    BasicProperties(correlation_id="c"), b"")
    table.on_deadline("d", blocked=True)
    table.on_deadline("gone", blocked=False)  # a call that ended meanwhile: nothing to do
    kinds = [type(table.calls[c].future.exception()) for c in "abcd"]
    assert kinds == [ExpirationError, UnknownTaskError, CallError, TimeoutError]
    assert "blocking publishers" in str(table.calls["d"].future.exception())


@pytest.mark.gen_test
async def test_a_lost_connection_resends_retry_calls_and_fails_the_others():
    table = table_with(asyncio.get_running_loop(), ("once", False), ("again", True))
    table.connection_lost()
    assert isinstance(table.calls["once"].future.exception(), ConnectionLostError)
    assert isinstance(table.calls["again"].future.exception(), Resend)
    table.fail_all(RuntimeError("later errors do not replace the first"))
    assert isinstance(table.calls["once"].future.exception(), ConnectionLostError)


@pytest.mark.gen_test
async def test_subscriptions_before_a_connection_are_kept_and_publish_fails():
    spawned: list[str] = []
    subscriptions = Subscriptions(lambda coro, describe: spawned.append(describe) or coro.close())
    await subscriptions.subscribe("orders.*", print)
    await subscriptions.unsubscribe("nothing")
    with pytest.raises(ConnectionLostError):
        await subscriptions.publish("orders.new", 1)
    got: list[object] = []
    subscriptions.subscribe("orders.#", got.append)
    body, encoding = codec.encode("hi")
    subscriptions.on_message("orders.new.eu", BasicProperties(
        content_type=protocol.MSGPACK, content_encoding=encoding), body)
    assert got == ["hi"] and spawned == []


def test_messages_check_the_arguments_and_build_each_call_with_a_new_id():
    messages = Messages()
    with pytest.raises(ValueError, match="priority"):
        messages.check("echo", 256, 5.0, None)
    with pytest.raises(ValueError):
        messages.check("bad name!", 0, 5.0, None)
    given = {"x-a": "b"}
    seconds, headers = messages.check("echo", 3, 5.0, given)
    assert seconds == 5.0 and headers == given and headers is not given
    before = protocol.now_ms()
    first = messages.properties("echo", seconds, headers, protocol.JSON, None, priority=3,
                                persistent=False, gzip=False)
    assert first.headers[protocol.TASK_HEADER] == "echo"
    assert first.headers[protocol.GZIP_HEADER] is False and first.headers["x-a"] == "b"
    assert before + 5000 <= first.headers[protocol.DEADLINE_HEADER] <= protocol.now_ms() + 5000
    assert (first.content_type, first.priority, first.delivery_mode) == (protocol.JSON, 3, 1)
    second = messages.properties("echo", 1.0, {}, protocol.MSGPACK, protocol.GZIP, priority=0,
                                 persistent=True, gzip=None)
    assert protocol.GZIP_HEADER not in second.headers and second.delivery_mode == 2
    prefix, number = first.correlation_id.split(".")
    assert second.correlation_id == f"{prefix}.{int(number) + 1}"
    assert Messages().properties("echo", 1.0, {}, protocol.JSON, None, priority=0,
                                 persistent=True, gzip=None).correlation_id[:16] != prefix


def test_a_client_not_connected_leaves_a_threads_call_to_the_loop():
    client = Client("amqp://guest:guest@127.0.0.1:1/", metrics=False, traces=False)
    assert client.channel_now() is None and not client.blocked
    assert client.pending.calls == {} and client.observer is None
