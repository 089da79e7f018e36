"""The article's application: master_example's endpoints over worker_example's tasks.

In-process tests serve the master's Tornado app (pytest-tornado's ``app`` fixture) with a
worker serving ``worker_example.tasks``; one test runs both examples as real processes.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.tcpclient import TCPClient

import master_example
import worker_example
from crew.worker import Worker, serve_in_thread
from tests.support.processes import STAT, Output, spawn_python, stop, until


@pytest.fixture
def poll_timeout() -> float:
    return 10.0


@pytest.fixture
def app(client, poll_timeout):
    return master_example.make_app(client, poll_timeout=poll_timeout)


@pytest.fixture
def worker(make_worker):
    return make_worker(worker_example.tasks, settings=worker_example.settings)


async def waiting(app: Any, count: int) -> None:
    listeners = app.settings["listeners"]
    await until(lambda: len(listeners.waiting) == count, listeners.changed)


# --- in-process ---------------------------------------------------------------------

def stat_text(worker: Worker, served: int) -> str:
    return f'I\'m worker "{worker.uuid}". And I serve {served} tasks'


@pytest.mark.gen_test(timeout=30)
async def test_main_stat_and_parallel(worker, http_client, base_url):
    main = await http_client.fetch(f"{base_url}/")
    assert main.body == b"str: Wake up Neo.\n"
    # Both tasks count their calls, as in the article.
    stat = await http_client.fetch(f"{base_url}/stat")
    assert stat.body.decode() == f"str: {stat_text(worker, 2)}"
    stat2 = await http_client.fetch(f"{base_url}/stat2")
    assert stat2.body.decode() == f"str: {stat_text(worker, 3)}"
    parallel = await http_client.fetch(f"{base_url}/parallel")
    assert parallel.headers["Content-Type"].startswith("text/plain")
    # The two calls run in either order.
    assert parallel.body.decode() in (
        f"Test result: Wake up Neo.\n\nStat result: {stat_text(worker, served)}"
        for served in (4, 5))


@pytest.mark.gen_test(timeout=30)
async def test_fast_is_killed_at_its_deadline(worker, http_client, base_url):
    response = await http_client.fetch(f"{base_url}/fast")
    assert response.body == b"Timeout"


@pytest.mark.gen_test(timeout=30)
async def test_fast_without_workers(broker_url, http_client, base_url):
    # The queue of `dead` exists (a worker declared it) but no worker consumes it.
    worker = Worker(worker_example.tasks, broker=broker_url, settings=worker_example.settings)
    loop = asyncio.get_running_loop()
    thread = await loop.run_in_executor(None, serve_in_thread, worker)
    worker.request_stop(grace=0)
    await loop.run_in_executor(None, thread.join, 10)
    response = await http_client.fetch(f"{base_url}/fast")
    assert response.body == b"All workers are gone"


@pytest.mark.gen_test(timeout=30)
async def test_long_poll_gets_what_both_publish_endpoints_send(worker, app, http_client,
                                                               base_url):
    for path, text, answer in (("/publish", "via the worker", b"None"),
                               ("/publish2", "from the master", b"")):
        polls = [http_client.fetch(f"{base_url}/subscribe") for _ in range(2)]
        await waiting(app, 2)
        published = await http_client.fetch(base_url + path, method="POST", body=text)
        assert published.body == answer  # the task returns None; /publish2 says nothing
        for poll in polls:
            assert (await poll).body == text.encode()
        await waiting(app, 0)


@pytest.mark.parametrize("poll_timeout", [0.3])
@pytest.mark.gen_test(timeout=30)
async def test_long_poll_without_a_message_is_204(app, http_client, base_url):
    response = await http_client.fetch(f"{base_url}/subscribe")
    assert (response.code, response.body) == (204, b"")
    await waiting(app, 0)


@pytest.mark.gen_test(timeout=30)
async def test_long_poll_client_that_leaves_stops_waiting(app, http_server, http_port):
    stream = await TCPClient().connect("127.0.0.1", http_port)
    await stream.write(b"GET /subscribe HTTP/1.0\r\n\r\n")
    await waiting(app, 1)
    stream.close()
    await waiting(app, 0)


# --- as processes -------------------------------------------------------------------

@pytest.mark.gen_test(timeout=90)
async def test_worker_and_master_as_processes(broker_url):
    worker = spawn_python(["-m", "worker_example", "-H", "127.0.0.1"], broker_url)
    master = spawn_python(["-m", "master_example", "--port", "0", "--verbose"], broker_url)
    worker_output, master_output = Output(worker), Output(master)
    codes: list[int] = []
    try:
        await worker_output.wait_for("serving")
        listening = await master_output.wait_for("listening on http://")
        port = re.search(r":(\d+)/", listening).group(1)
        base = f"http://127.0.0.1:{port}"
        http = AsyncHTTPClient()

        assert (await http.fetch(f"{base}/")).body == b"str: Wake up Neo.\n"
        stat = (await http.fetch(f"{base}/stat")).body.decode()
        assert re.fullmatch(f"str: {STAT}", stat) and stat.endswith(" 2 tasks")
        parallel = (await http.fetch(f"{base}/parallel")).body.decode()
        assert re.fullmatch(f"Test result: Wake up Neo.\n\nStat result: {STAT}", parallel)
        for path, text, answer in (("/publish", "via the worker", b"None"),
                                   ("/publish2", "from the master", b"")):
            polls = [http.fetch(f"{base}/subscribe") for _ in range(2)]
            await master_output.wait_for("2 request(s) wait")
            published = await http.fetch(base + path, method="POST", body=text)
            assert published.body == answer
            for poll in polls:
                assert (await poll).body == text.encode()
        assert (await http.fetch(f"{base}/fast")).body == b"Timeout"
    finally:
        codes = [await stop(master, master_output), await stop(worker, worker_output)]
        # Shown by pytest when the test fails.
        print(f"master:\n{master_output.everything()}\nworker:\n{worker_output.everything()}")
    assert codes == [0, 0]
