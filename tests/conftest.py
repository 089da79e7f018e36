"""Fixtures: a private vhost on the real RabbitMQ for each test run, workers and clients.

Every run gets a vhost of its own (``crew-test-<random>``), deleted at the end, so no
message or queue can leak between runs; inside a run, tests use task names with a per-test
suffix. Set ``CREW_TEST_URL`` to test against another broker (then the vhost in that URL is
used as it is and nothing is created).

Some tests read queue counts with ``rabbitmqctl`` (see :mod:`tests.support.broker`).
Helpers that tests import live in :mod:`tests.support`, never here.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from typing import Any, Callable, Iterator
from urllib.parse import quote

import pytest

# The helpers in tests.support assert too (the fault harness is a plugin of its own): have
# pytest rewrite their asserts, which it does only for modules named before their import.
pytest.register_assert_rewrite("tests.support")
# The `browser` fixture (headless chromium for the dashboard's page).
pytest_plugins = ["tests.support.browser"]

from crew import Client  # noqa: E402
from crew.worker import Worker, serve_in_thread  # noqa: E402
from tests.support.bombs import MiB, gzip_bomb  # noqa: E402
from tests.support.broker import broker_answers, rabbitmqctl  # noqa: E402


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """amqp:// URL of a vhost that exists only for this test run."""
    if os.environ.get("CREW_TEST_URL"):
        yield os.environ["CREW_TEST_URL"]
        return
    if not broker_answers():
        pytest.exit("RabbitMQ does not answer on 127.0.0.1:5672: start it with "
                    "`rabbitmq-server -detached` (scripts/test does)", returncode=3)
    if shutil.which("rabbitmqctl") is None:
        pytest.exit("rabbitmqctl is needed to make the test vhost (or set CREW_TEST_URL)",
                    returncode=3)
    vhost = f"crew-test-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{quote(vhost, safe='')}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="session")
def crew_broker_url(broker_url: str) -> str:
    """The vhost of crew's pytest plugin (``crew.testing``, whose fixtures some tests use):
    this run's, rather than one more made for it."""
    return broker_url


@pytest.fixture
def uid(request: pytest.FixtureRequest) -> str:
    """A suffix unique to this test, for task and channel names."""
    return f"{request.node.name[:40]}.{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_worker(broker_url: str) -> Iterator[Callable[..., Worker]]:
    """Start in-process workers (each on its own loop and thread); stopped after the test."""
    running: list[tuple[Worker, threading.Thread]] = []

    def start(tasks: dict[str, Callable[[Any], Any]], **kwargs: Any) -> Worker:
        kwargs.setdefault("broker", broker_url)
        kwargs.setdefault("grace", 5.0)
        worker = Worker(tasks, **kwargs)
        running.append((worker, serve_in_thread(worker)))
        return worker

    yield start
    for worker, thread in running:
        if thread.is_alive():
            worker.request_stop(grace=0)
        thread.join(30)
        assert not thread.is_alive(), "a worker did not stop"


@pytest.fixture
def client(io_loop: Any, broker_url: str) -> Iterator[Client]:
    """A connected client on the test's Tornado IOLoop."""
    c = Client(broker_url)
    io_loop.run_sync(c.connect)
    yield c
    io_loop.run_sync(c.close)


@pytest.fixture
def make_client(io_loop: Any, broker_url: str) -> Iterator[Callable[..., Any]]:
    """``await make_client(**kwargs)``: more connected clients, closed after the test."""
    made: list[Client] = []

    async def make(**kwargs: Any) -> Client:
        c = Client(broker_url, **kwargs)
        await c.connect()
        made.append(c)
        return c

    yield make
    for c in made:
        io_loop.run_sync(c.close)


@pytest.fixture(scope="session")
def bomb() -> bytes:
    """A gzip body of 1 GiB of zeros, about 1 MiB on the wire."""
    return gzip_bomb(1024 * MiB)
