"""Fixtures: a private vhost on the real RabbitMQ for each test run, workers and clients.

Every run gets a vhost of its own (``crew-test-<random>``), deleted at the end, so no
message or queue can leak between runs; inside a run, tests use task names with a per-test
suffix. Set ``CREW_TEST_URL`` to test against another broker (then the vhost in that URL is
used as it is and nothing is created).

Some tests read queue counts with ``rabbitmqctl``, the only view of unacknowledged
messages. Against the shared broker that is ``rabbitmqctl`` on the ``PATH``; with
``CREW_TEST_URL``, set ``CREW_TEST_RABBITMQCTL`` to a command line that runs ``rabbitmqctl``
for that broker's node (split like a shell line; the tests add ``-p VHOST`` and the
command), e.g. ``rabbitmqctl -n NODE@localhost``, or a script that runs the ``rabbitmqctl``
of a node installed in a chroot (another RabbitMQ version needs its own ``rabbitmqctl``).
Without it those tests fall back to a passive declare, which sees ready messages only.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from typing import Any, Callable, Iterator
from urllib.parse import quote

import pytest

from crew import Client
from crew.worker import Worker, serve_in_thread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: What the article's ``stat`` task answers: the worker's uuid, the calls it has served.
STAT = r"I'm worker \"([0-9a-f]{32})\"\. And I serve (\d+) tasks"


def _broker_answers(host: str = "127.0.0.1", port: int = 5672) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def rabbitmqctl_command() -> list[str] | None:
    """The command that runs ``rabbitmqctl`` for the broker under test: plain
    ``rabbitmqctl`` for the shared broker; with ``$CREW_TEST_URL``, the command in
    ``$CREW_TEST_RABBITMQCTL``, or None if that is not set."""
    if not os.environ.get("CREW_TEST_URL"):
        return ["rabbitmqctl"]
    command = os.environ.get("CREW_TEST_RABBITMQCTL", "").strip()
    return shlex.split(command) if command else None


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """amqp:// URL of a vhost that exists only for this test run."""
    if os.environ.get("CREW_TEST_URL"):
        yield os.environ["CREW_TEST_URL"]
        return
    if not _broker_answers():
        pytest.exit("RabbitMQ does not answer on 127.0.0.1:5672: start it with "
                    "`rabbitmq-server -detached` (scripts/test does)", returncode=3)
    if shutil.which("rabbitmqctl") is None:
        pytest.exit("rabbitmqctl is needed to make the test vhost (or set CREW_TEST_URL)",
                    returncode=3)
    vhost = f"crew-test-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{quote(vhost, safe='')}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


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


def python_env(broker_url: str) -> dict[str, str]:
    """Environment for a child Python process: this checkout importable, the test vhost."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["CREW_URL"] = broker_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn_python(args: list[str], broker_url: str, **kwargs: Any) -> subprocess.Popen[str]:
    """Start ``python ARGS`` with the test vhost in ``$CREW_URL`` (never on the command line)."""
    return subprocess.Popen([sys.executable, *args], env=python_env(broker_url), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


async def until(condition: Callable[[], bool], changed: asyncio.Event,
                timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds, re-checking each time ``changed`` is set."""
    async def wait() -> None:
        while not condition():
            changed.clear()
            await changed.wait()
    await asyncio.wait_for(wait(), timeout)


class Output:
    """A child's output lines, read by a thread; ``await wait_for(text)`` for the next line
    that contains ``text``."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, line)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)
        except RuntimeError:
            pass  # the test's loop is closed: a fixture stopped the process after the test

    async def wait_for(self, text: str, timeout: float = 20.0) -> str:
        while True:
            try:
                line = await asyncio.wait_for(self.queue.get(), timeout)
            except asyncio.TimeoutError:
                raise AssertionError(f"no new line for {timeout} s, none with {text!r}:\n"
                                     f"{''.join(self.seen)}") from None
            if line is None:
                raise AssertionError(f"exited before printing {text!r}:\n{''.join(self.seen)}")
            self.seen.append(line)
            if text in line:
                return line

    def everything(self) -> str:
        """All the output read so far, once the process has exited."""
        while not self.queue.empty():
            self.seen.append(self.queue.get_nowait() or "")
        return "".join(self.seen)


async def stop(proc: subprocess.Popen[str], output: Output) -> int:
    """SIGTERM ``proc`` and return its exit status (it is killed if it does not exit)."""
    loop = asyncio.get_running_loop()
    proc.send_signal(signal.SIGTERM)
    try:
        code = await loop.run_in_executor(None, proc.wait, 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = await loop.run_in_executor(None, proc.wait)
    await loop.run_in_executor(None, output.thread.join, 10)
    return code
