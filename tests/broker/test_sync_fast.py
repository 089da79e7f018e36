"""``SyncClient.call``'s fast path (crew/synccall.py): a call sent from its caller's own
thread gives what the loop's path gives, and hands the call to the loop whenever it cannot
send it itself (tests/broker/test_sync_client.py runs both paths through SyncClient).

Sending from a thread needs crew's fast path to pika (crew/transport.py): these tests
connect with ``CREW_PIKA_PATH=auto`` whatever the run's setting, so that a run on the
public path (scripts/test-pika-range) tests this code too, and the last test shows that on
the public path every call is left to the loop."""

from __future__ import annotations

import re
import socket
import threading
import time
from typing import Any, Iterator

import pika
import pytest

import crew
from crew import SyncClient, protocol, seam
from crew.synccall import ON_LOOP, call_now
from crew.syncruntime import Runtime
from tests.support.queues import idle_task

#: What a busy 2-core machine may add to a bound measured here.
SLACK = 3.0
OPTIONS = {"priority": 0, "expiration": 5.0, "persistent": True, "gzip": None,
           "headers": None, "return_headers": False, "retry": False}


@pytest.fixture(autouse=True)
def fast_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(seam.ENV, "auto")  # the fast path, on the pika versions crew tested


@pytest.fixture
def runtime(broker_url: str) -> Iterator[Runtime]:
    """A connected sync client's runtime."""
    client = SyncClient(broker_url)
    client.connect()
    yield client._runtime()
    client.close()


def fast(runtime: Runtime, task: str, data: Any = None, **options: Any) -> Any:
    return call_now(runtime.client, runtime.thread.loop, task, data, {**OPTIONS, **options})


def test_the_fast_path_gives_every_outcome_of_the_clients_call(make_worker, broker_url,
                                                                runtime, uid):
    def explode(x: Any) -> None:
        raise KeyError(x)

    make_worker({f"echo.{uid}": lambda x: x, f"boom.{uid}": explode})
    idle_task(broker_url, f"idle.{uid}")
    assert fast(runtime, f"echo.{uid}", [1, "x" * 300_000], gzip=True) == [1, "x" * 300_000]
    assert fast(runtime, f"echo.{uid}", 2, headers={"x-a": "b"}, return_headers=True) == (
        2, {"x-a": "b"})
    with pytest.raises(crew.RemoteError, match="KeyError"):
        fast(runtime, f"boom.{uid}", "spoon")
    with pytest.raises(crew.UnknownTaskError):
        fast(runtime, f"nothing.{uid}")
    with pytest.raises(crew.ExpirationError):
        fast(runtime, f"idle.{uid}", expiration=0.5)
    with pytest.raises(crew.EncodeError):
        fast(runtime, f"echo.{uid}", object())
    with pytest.raises(ValueError, match="priority"):
        fast(runtime, f"echo.{uid}", priority=256)
    assert runtime.client.pending.calls == {}


def test_a_call_nobody_answers_times_out_in_its_callers_thread(broker_url, runtime, uid):
    task = f"held.{uid}"
    idle_task(broker_url, task)
    outcome: list[BaseException] = []
    grace = runtime.client.deadline_grace

    def call() -> None:
        try:
            fast(runtime, task, expiration=1)
        except crew.CrewError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    started = time.monotonic()
    caller.start()
    # A consumer takes the call and holds it, unanswered: no reply, no dead letter.
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        while connection.channel().basic_get(protocol.task_queue(task))[0] is None:
            assert time.monotonic() - started < 10, "the call never reached its queue"
            connection.sleep(0.01)
        caller.join(30)
    finally:
        connection.close()
    assert 1 + grace - 0.05 <= time.monotonic() - started < 1 + grace + SLACK
    assert [type(exc) for exc in outcome] == [crew.TimeoutError]
    assert re.fullmatch(rf"no answer from task '{re.escape(task)}' by its deadline "
                        r"\(\d\.\d{3} s after the call\); it may or may not have run",
                        str(outcome[0]))
    assert runtime.client.pending.calls == {}


def test_what_the_fast_path_cannot_send_is_left_to_the_loop(make_worker, runtime, uid):
    make_worker({f"echo.{uid}": lambda x: x})
    assert fast(runtime, f"echo.{uid}", 1, retry=True) is ON_LOOP
    link = runtime.client._link
    runtime.thread.loop.call_soon_threadsafe(link.ready.clear)  # as while reconnecting
    deadline = time.monotonic() + 10
    while link.ready.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert fast(runtime, f"echo.{uid}", 1) is ON_LOOP
    finally:
        runtime.thread.loop.call_soon_threadsafe(link.ready.set)
    assert runtime.client.pending.calls == {}


def test_a_connection_lost_between_entering_and_sending_the_call(make_worker, broker_url,
                                                                  uid):
    make_worker({f"echo.{uid}": lambda x: x})
    client = SyncClient(broker_url)
    try:
        client.connect()
        client.call(f"echo.{uid}", 0)
        pika_connection = client._runtime().client._connection._connection
        outcome: list[Any] = []
        with pika_connection._crew_send_lock:  # the caller enters its call, then waits here
            caller = threading.Thread(
                target=lambda: outcome.append(client.call(f"echo.{uid}", 1, expiration=30)))
            caller.start()
            wait_for(lambda: len(client._runtime().client.pending.calls) == 1)
            pika_connection._transport._sock.shutdown(socket.SHUT_RDWR)
            # Not `not client.connected`: the client may connect again within milliseconds,
            # between two looks.
            wait_for(lambda: pika_connection.is_closed)
        caller.join(30)
        # Not sent on the lost connection: the loop sent it on the next one.
        assert outcome == [1]
        assert client.call(f"echo.{uid}", 2) == 2
    finally:
        client.close()


def test_a_call_made_while_others_are_pending_is_left_to_the_loop(make_worker, runtime, uid):
    make_worker({f"echo.{uid}": lambda x: x, f"sleep.{uid}": time.sleep})
    client = runtime.client
    slow = threading.Thread(target=fast, args=(runtime, f"sleep.{uid}", 1))
    slow.start()
    wait_for(lambda: len(client.pending.calls) == 1)
    assert fast(runtime, f"echo.{uid}", 1) is ON_LOOP
    slow.join(30)
    assert fast(runtime, f"echo.{uid}", 2) == 2


def test_many_threads_calling_through_both_paths(make_worker, broker_url, uid):
    """Threads that find other calls pending hand theirs to the loop; a lone one sends it."""
    make_worker({f"echo.{uid}": lambda x: x}, concurrency=8)
    client = SyncClient(broker_url)
    client.connect()
    answers: dict[int, list[Any]] = {}

    def caller(number: int) -> None:
        answers[number] = [client.call(f"echo.{uid}", [number, i]) for i in range(50)]

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert answers == {n: [[n, i] for i in range(50)] for n in range(16)}
        assert client._runtime().client.pending.calls == {}
    finally:
        client.close()


def wait_for(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_on_pikas_public_path_every_call_is_left_to_the_loop(make_worker, broker_url, uid,
                                                             monkeypatch):
    monkeypatch.setenv(seam.ENV, "public")
    make_worker({f"echo.{uid}": lambda x: x})
    client = SyncClient(broker_url)
    try:
        client.connect()
        runtime = client._runtime()
        assert fast(runtime, f"echo.{uid}", 1) is ON_LOOP
        assert client.call(f"echo.{uid}", 2) == 2
        assert runtime.client.pending.calls == {}
    finally:
        client.close()
