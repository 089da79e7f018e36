"""``SyncClient`` against the real broker: many threads at once, every error kind, deadlines,
a fork after use, pubsub, interpreter exit (without a broker: tests/unit/test_sync_client.py;
a broker restart: tests/nodes/test_sync_faults.py; gunicorn: test_wsgi_example.py)."""

from __future__ import annotations

import json
import os
import textwrap
import threading
import time
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest

import crew
from crew import SyncClient, protocol
from crew.syncruntime import HOP_MARGIN
from crew.worker import context
from tests.support.processes import spawn_python
from tests.support.queues import idle_task

#: What a busy 2-core machine may add to a bound measured here.
SLACK = 3.0


@pytest.fixture
def sync_client(broker_url: str) -> Iterator[SyncClient]:
    client = SyncClient(broker_url)
    yield client
    client.close()


def sleep_in_slices(seconds: float) -> float:
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # slices, so that the worker's interruption lands
        time.sleep(0.02)
    return seconds


def test_many_threads_calling_at_once_each_get_their_own_answer(make_worker, sync_client, uid):
    make_worker({f"echo.{uid}": lambda x: x}, concurrency=16)
    answers: dict[int, list[Any]] = {}
    errors: list[BaseException] = []

    def caller(number: int) -> None:
        try:
            answers[number] = [sync_client.call(f"echo.{uid}", [number, i, "x" * (number * i)])
                               for i in range(20)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert answers == {n: [[n, i, "x" * (n * i)] for i in range(20)] for n in range(32)}


def test_headers_and_parallel_calls_in_call_order(make_worker, sync_client, uid):
    def stat(_: Any) -> dict[str, Any]:
        context.headers["x-served-by"] = "stat"
        return dict(context.headers)

    make_worker({f"stat.{uid}": stat, f"echo.{uid}": lambda x: x})
    result, headers = sync_client.call(f"stat.{uid}", None, headers={"x-request-id": "a1"},
                                       return_headers=True)
    assert result == {"x-request-id": "a1", "x-served-by": "stat"} == headers
    with sync_client.parallel() as mc:
        mc.call(f"echo.{uid}", 1)
        mc.call(f"nothing.{uid}")
        mc.call(f"echo.{uid}", 3, priority=9, persistent=False)
    one, unknown, three = mc.result()  # after the block, as in the issue
    assert (one, three) == (1, 3)
    assert isinstance(unknown, crew.UnknownTaskError)


# --- every error kind ---------------------------------------------------------------------

def test_the_errors_of_a_call_are_the_clients_own(make_worker, broker_url, sync_client, uid):
    def explode(x: Any) -> None:
        raise KeyError(f"no such thing: {x}")

    make_worker({f"boom.{uid}": explode, f"spin.{uid}": sleep_in_slices})
    with pytest.raises(crew.RemoteError) as raised:
        sync_client.call(f"boom.{uid}", "spoon")
    assert raised.value.type == "KeyError" and "explode" in raised.value.traceback
    with pytest.raises(crew.TimeoutError, match="past its deadline"):
        sync_client.call(f"spin.{uid}", 30, expiration=1)
    idle_task(broker_url, f"idle.{uid}")
    with pytest.raises(crew.ExpirationError):
        sync_client.call(f"idle.{uid}", expiration=1)
    with pytest.raises(crew.UnknownTaskError):
        sync_client.call(f"nothing.{uid}")
    with pytest.raises(crew.EncodeError):
        sync_client.call(f"boom.{uid}", object())
    with pytest.raises(ValueError, match="priority"):
        sync_client.call(f"boom.{uid}", priority=256)


def test_a_refused_login_raises_authentication_error_at_once(broker_url):
    parts = urlsplit(broker_url)
    wrong = urlunsplit(parts._replace(netloc=f"guest:wrong@{parts.hostname}:{parts.port}"))
    client = SyncClient(wrong)
    started = time.monotonic()
    try:
        with pytest.raises(crew.AuthenticationError):
            client.call("test", expiration=30)
    finally:
        client.close()
    assert time.monotonic() - started < 10


def test_calls_waiting_when_the_client_closes_raise_connection_lost(make_worker, broker_url,
                                                                   uid):
    make_worker({f"sleep.{uid}": sleep_in_slices})
    client = SyncClient(broker_url)
    outcome: list[BaseException] = []

    def waiting() -> None:
        try:
            client.call(f"sleep.{uid}", 10)
        except crew.CrewError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=waiting)
    thread.start()
    time.sleep(0.5)
    client.close()
    thread.join(10)
    assert [type(exc) for exc in outcome] == [crew.ConnectionLostError]


def test_a_call_given_up_by_a_quorum_queue_raises_delivery_limit_error(broker_url,
                                                                       sync_client, uid):
    task = f"q.poison.{uid}"
    idle_task(broker_url, task, queue_type="quorum")
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            sync_client.call(task, expiration=60)
        except crew.CrewError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    # A consumer that takes the call and drops its connection without acknowledging it, as
    # a worker that dies on it would, until the queue gives the call up.
    lost = 0
    while thread.is_alive() and lost <= protocol.DELIVERY_LIMIT + 2:
        connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        try:
            method, _, _ = connection.channel().basic_get(protocol.task_queue(task))
            if method is None:
                connection.sleep(0.05)  # the call is on its way, or dead-lettered
            else:
                lost += 1
        finally:
            connection.close()  # an unacknowledged call goes back, counted
    thread.join(30)
    assert [type(exc) for exc in outcome] == [crew.DeliveryLimitError]


# --- deadlines ----------------------------------------------------------------------------

def test_no_call_blocks_past_its_deadline_grace_and_margin(make_worker, broker_url,
                                                           sync_client, uid):
    # A job the worker cannot interrupt (one long sleep in C), and a queue nobody serves.
    make_worker({f"stuck.{uid}": time.sleep})
    idle_task(broker_url, f"idle.{uid}")
    bound = 1 + sync_client.deadline_grace + HOP_MARGIN
    for task, error in ((f"stuck.{uid}", crew.TimeoutError),
                        (f"idle.{uid}", crew.ExpirationError)):
        started = time.monotonic()
        with pytest.raises(error):
            sync_client.call(task, 20, expiration=1)
        assert time.monotonic() - started < bound + SLACK


# --- fork ---------------------------------------------------------------------------------

def test_a_process_forked_after_use_connects_anew_and_the_parent_keeps_working(
        make_worker, sync_client, uid):
    make_worker({f"echo.{uid}": lambda x: x}, concurrency=4)
    assert sync_client.call(f"echo.{uid}", "parent") == "parent"
    parent_queue = sync_client._runtime().client._reply_queue
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answers through the pipe, never returns to pytest
        try:
            with sync_client.parallel() as mc:
                mc.call(f"echo.{uid}", "child 1")
                mc.call(f"echo.{uid}", "child 2")
            answers = [sync_client.call(f"echo.{uid}", "child"), *mc.result()]
            queue = sync_client._runtime().client._reply_queue
            os.write(write, json.dumps([answers, queue]).encode())
            sync_client.close()
        finally:
            os._exit(0)
    os.close(write)
    # The parent calls while the child does.
    assert [sync_client.call(f"echo.{uid}", i) for i in range(20)] == list(range(20))
    with os.fdopen(read) as pipe:
        answers, child_queue = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert answers == ["child", "child 1", "child 2"]
    assert child_queue != parent_queue  # a connection of its own
    # The child closed its connection and exited: the parent's is untouched.
    assert sync_client._runtime().client._reply_queue == parent_queue
    assert sync_client.connected
    assert sync_client.call(f"echo.{uid}", "after") == "after"


# --- pubsub -------------------------------------------------------------------------------

def test_subscribers_run_on_crews_callback_thread_and_may_call(make_worker, sync_client, uid):
    make_worker({f"echo.{uid}": lambda x: x})
    got: list[tuple[Any, str, Any]] = []
    done = threading.Event()

    def on_news(data: Any) -> None:
        got.append((data, threading.current_thread().name,
                    sync_client.call(f"echo.{uid}", data["n"])))
        if len(got) == 2:
            done.set()

    channel = f"news.{uid}"
    sync_client.subscribe(channel, on_news)
    sync_client.publish(channel, {"n": 1})
    sync_client.publish(channel, {"n": 2})
    assert done.wait(10)
    assert got == [({"n": 1}, "crew-sync-callbacks", 1), ({"n": 2}, "crew-sync-callbacks", 2)]
    sync_client.unsubscribe(channel, on_news)
    sync_client.publish(channel, {"n": 3})
    assert sync_client.call(f"echo.{uid}", "later") == "later"  # after the publish
    assert len(got) == 2


# --- interpreter exit ---------------------------------------------------------------------

def test_interpreter_exit_with_calls_pending_does_not_hang(make_worker, broker_url, uid):
    make_worker({f"sleep.{uid}": sleep_in_slices}, concurrency=4)
    script = textwrap.dedent(f"""
        import threading, time
        import crew
        client = crew.SyncClient()
        assert client.call("sleep.{uid}", 0) == 0
        started = threading.Barrier(5)
        def call():
            started.wait()
            client.call("sleep.{uid}", 30, expiration=60)
        for _ in range(4):
            threading.Thread(target=call, daemon=True).start()
        started.wait()
        time.sleep(0.5)
        print("exiting", flush=True)
    """)
    began = time.monotonic()
    proc = spawn_python(["-c", script], broker_url)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "exiting" in output
    assert time.monotonic() - began < 15, output

