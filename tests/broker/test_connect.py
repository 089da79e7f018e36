"""``client.connect()`` awaited, and called plainly as the article does, with or without a
running event loop; what calls made meanwhile get; ``close()`` during a connect.

The loop tests need no broker: they check that the loop a plain ``connect()`` schedules on
is the one Tornado's ``IOLoop.current()`` runs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

import pytest
from tornado.ioloop import IOLoop

from crew import AuthenticationError, Client, ConnectionLostError
from crew.loops import thread_loop
from tests.support.processes import ROOT


def refused_port() -> int:
    """A local port where nothing listens (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ours(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    """crew's log records and asyncio's ("Task exception was never retrieved"); pika logs
    errors of its own for every failed or aborted connection."""
    return [r for r in records if r.name.split(".")[0] in ("crew", "asyncio")]


def in_thread(target: Any) -> Any:
    """Run ``target()`` in a fresh thread, which has no event loop; return what it returns."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", target()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            outcome.append(("raised", exc))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the thread did not finish"
    kind, value = outcome[0]
    if kind == "raised":
        raise value
    return value


# --- the loop (no broker) ------------------------------------------------------------

def test_thread_loop_is_the_loop_tornado_runs_in_a_fresh_thread():
    def check() -> bool:
        loop = thread_loop()
        try:
            return IOLoop.current().asyncio_loop is loop and thread_loop() is loop
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    assert in_thread(check)


def test_thread_loop_is_the_running_loop():
    async def check() -> bool:
        return thread_loop() is asyncio.get_running_loop()

    assert in_thread(lambda: asyncio.run(check()))


def test_thread_loop_in_the_main_thread_warns_of_nothing():
    # A process of its own, for a main thread that no test has given a loop; -W error turns
    # any warning (a DeprecationWarning from get_event_loop(), 3.12+) into a failure.
    code = ("import asyncio\n"
            "from tornado.ioloop import IOLoop\n"
            "from crew.loops import thread_loop\n"
            "loop = thread_loop()\n"
            "assert IOLoop.current().asyncio_loop is loop\n"
            "asyncio.run(asyncio.sleep(0))  # leaves no loop set, as it does\n"
            "again = thread_loop()\n"
            "assert again is not loop and IOLoop.current().asyncio_loop is again\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


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
async def test_connect_timeout_bounds_the_wait_for_a_connect_under_way(uid):
    client = Client(host="127.0.0.1", port=refused_port())
    connecting = client.connect()  # no timeout: keeps trying
    try:
        began = time.monotonic()
        with pytest.raises(ConnectionLostError, match=r"within 0\.5 s"):
            await client.connect(timeout=0.5)
        assert time.monotonic() - began < 5
        assert not connecting.done()
    finally:
        await client.close()
    with pytest.raises(ConnectionLostError, match="closed before it connected"):
        await connecting


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
