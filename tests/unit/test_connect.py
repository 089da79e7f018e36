"""``thread_loop`` and ``connect()`` where no broker answers (against RabbitMQ:
tests/broker/test_connect.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
from tornado.ioloop import IOLoop

from crew import Client, ConnectionLostError
from crew.loops import thread_loop
from tests.support.connect import in_thread, refused_port
from tests.support.processes import ROOT


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
