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
from crew.pending import Call, Pending, Resend
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
