"""``client.connect()`` awaited, and called plainly as the article does, with or without a
running event loop; what calls made meanwhile get; ``close()`` during a connect.

The loop tests need no broker: they check that the loop a plain ``connect()`` schedules on
is the one Tornado's ``IOLoop.current()`` runs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref

import pytest
from tornado.ioloop import IOLoop

from crew import AuthenticationError, Client, ConnectionLostError
from tests.support.connect import in_thread, refused_port


def ours(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    """crew's log records and asyncio's ("Task exception was never retrieved"); pika logs
    errors of its own for every failed or aborted connection."""
    return [r for r in records if r.name.split(".")[0] in ("crew", "asyncio")]


# --- connect() with the broker --------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_awaited_connect_connects(make_worker, broker_url, uid):
    make_worker({f"echo.{uid}": lambda x: x})
    client = Client(broker_url)
    try:
        assert await client.connect(timeout=10) is None
        assert client.connected
        await client.connect()  # connected already: done at once
        assert await client.call(f"echo.{uid}", "hi") == "hi"
    finally:
        await client.close()


@pytest.mark.gen_test(timeout=30)
async def test_plain_connect_then_a_call_at_once(make_worker, broker_url, uid):
    make_worker({f"echo.{uid}": lambda x: x})
    client = Client(broker_url)
    try:
        connecting = client.connect()  # not awaited, as in the article
        assert not client.connected
        assert await client.call(f"echo.{uid}", "hi") == "hi"  # waited for the connection
        assert connecting.done() and client.connected
        assert client.connect() is connecting
    finally:
        await client.close()


def test_plain_connect_before_the_loop_runs(make_worker, broker_url, uid):
    """The article's order: connect() with no loop running, then IOLoop.current() runs."""
    make_worker({f"echo.{uid}": lambda x: x})

    def article() -> tuple[bool, str]:
        client = Client(broker_url)
        connecting = client.connect()  # this thread has no loop yet
        io_loop = IOLoop.current()
        try:
            same = io_loop.asyncio_loop is connecting.get_loop()
            result = io_loop.run_sync(lambda: client.call(f"echo.{uid}", "hi"), timeout=20)
            io_loop.run_sync(client.close)
            return same, result
        finally:
            asyncio.set_event_loop(None)
            io_loop.close()

    assert in_thread(article) == (True, "hi")


@pytest.mark.gen_test(timeout=30)
async def test_refused_login_fails_the_waiting_call_at_once(broker_url, uid, caplog):
    caplog.set_level(logging.INFO)
    client = Client(broker_url, password="not-the-password")
    connecting = weakref.ref(client.connect())
    began = time.monotonic()
    with pytest.raises(AuthenticationError):
        await client.call(f"echo.{uid}", "hi", expiration=30)
    assert time.monotonic() - began < 10  # not at the call's deadline
    assert not client.connected
    with pytest.raises(ConnectionLostError, match="call connect"):
        await client.call(f"echo.{uid}", "hi")  # a call made after the failure
    gc.collect()
    assert connecting() is None  # collected, so asyncio would have said it if it had to
    failures = [r.getMessage() for r in ours(caplog.records) if r.levelno >= logging.ERROR]
    assert len(failures) == 1 and "could not connect" in failures[0], failures
    assert "not-the-password" not in caplog.text


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("where", ["broker", "refused"])
async def test_close_stops_a_plain_connect(broker_url, uid, where, caplog):
    caplog.set_level(logging.INFO)
    client = (Client(broker_url) if where == "broker"
              else Client(host="127.0.0.1", port=refused_port()))
    connecting = client.connect()
    call = asyncio.ensure_future(client.call(f"echo.{uid}", "hi", expiration=30))
    await asyncio.sleep(0)  # the connect and the call are under way
    assert not connecting.done() and not call.done()
    await client.close()
    with pytest.raises(ConnectionLostError, match="closed"):
        await asyncio.wait_for(call, 5)
    with pytest.raises(ConnectionLostError, match="closed before it connected"):
        await asyncio.wait_for(connecting, 5)
    assert not client.connected
    assert not [r for r in ours(caplog.records) if r.levelno >= logging.ERROR]
