"""The article's master and worker (``article/``), run as printed, as real processes.

The worker is started the article's way (``python article/worker.py -H 127.0.0.1``), the
master with ``python article/master.py --port=N``; both find the test vhost in
``$CREW_URL``. Every endpoint is then checked over HTTP.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
from typing import Callable, Iterator

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.tcpclient import TCPClient

from tests.support.processes import STAT, Output, spawn_python, stop


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def start(broker_url: str) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """``start('article/worker.py', ...)``: a child process, stopped after the test however
    it ends (a timed-out test does not run its own ``finally`` blocks to the end)."""
    started: list[subprocess.Popen[str]] = []

    def spawn(*args: str) -> subprocess.Popen[str]:
        proc = spawn_python(list(args), broker_url)
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
    for proc in started:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def long_poll(port: int) -> "asyncio.Future[bytes]":
    """Send ``GET /subscribe`` and return a future of the whole response.

    The request is written before this returns, so that a request sent afterwards on
    another connection reaches the master's single loop after it.
    """
    stream = await TCPClient().connect("127.0.0.1", port)
    await stream.write(b"GET /subscribe HTTP/1.0\r\nHost: localhost\r\n\r\n")
    return asyncio.ensure_future(stream.read_until_close())


def body_of(response: bytes) -> bytes:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200"), head
    return body


@pytest.mark.gen_test(timeout=120)
async def test_the_articles_master_and_worker_answer_every_endpoint(start):
    port = free_port()
    worker = start("article/worker.py", "-H", "127.0.0.1")
    master = start("article/master.py", f"--port={port}")
    worker_output, master_output = Output(worker), Output(master)
    try:
        await worker_output.wait_for("serving", timeout=30)
        # The article calls connect() plainly, before the loop runs; the client logs this
        # once the loop has connected it.
        await master_output.wait_for("client connected", timeout=30)
        base = f"http://127.0.0.1:{port}"
        http = AsyncHTTPClient()

        async def get(path: str) -> str:
            return (await http.fetch(base + path, request_timeout=60)).body.decode()

        assert await get("/") == "str: Wake up Neo.\n"
        counts = []
        for path in ("/stat", "/stat2"):
            match = re.fullmatch(f"str: {STAT}", await get(path))
            assert match, path
            counts.append(int(match.group(2)))
        assert counts == [2, 3]  # `test` counts too, and one worker serves one call at a time

        parallel = await http.fetch(f"{base}/parallel")
        assert parallel.headers["Content-Type"].startswith("text/plain")
        match = re.fullmatch(f"Test result: Wake up Neo.\n\nStat result: {STAT}",
                             parallel.body.decode())
        assert match and int(match.group(2)) in (4, 5)  # the two calls run in either order

        for path, text, answer in (("/publish", b"via the worker", b"None"),
                                   ("/publish2", b"from the master", b"")):
            polls = [await long_poll(port) for _ in range(2)]
            # The master says nothing when a long poll starts: an answered request sent
            # after the polls is the sign that its loop has taken them.
            barrier = await http.fetch(f"{base}/nowhere", raise_error=False)
            assert barrier.code == 404
            published = await http.fetch(base + path, method="POST", body=text)
            assert published.body == answer  # `publish` returns None; PublishHandler2 nothing
            for poll in polls:
                # The body arrives as bytes, which str() shows as b'...' on Python 3.
                assert body_of(await poll) == b"b'%s'" % text

        assert await get("/fast") == "Timeout"
    finally:
        await stop(master, master_output)
        await stop(worker, worker_output)
        # Shown by pytest when the test fails.
        print(f"master:\n{master_output.everything()}\nworker:\n{worker_output.everything()}")
    assert not re.search(r"\] 500 ", master_output.everything())

