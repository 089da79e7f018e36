"""Prometheus metrics (crew[metrics]): calls of every outcome, then ``/metrics`` scraped on the
worker's ``--metrics-port`` (two ``--forks``: ports N and N+1), on the gateway, and in the
client's process."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pika
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from crew import (Client, ConnectionLostError, ExpirationError, RemoteError, SyncClient,
                  TimeoutError, UnknownTaskError, gateway, protocol)
from crew.worker import Worker, serve_in_thread
from tests.support.hostile import late_call
from tests.support.processes import Output, python_env, stop

SCRIPT = textwrap.dedent('''
    import os, time
    from crew.worker import run, Task

    uid = os.environ["TEST_UID"]

    @Task(f"ok.{uid}")
    def ok(req):
        return req

    @Task(f"fail.{uid}")
    def fail(req):
        raise ValueError("boom")

    @Task(f"spin.{uid}")
    def spin(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.01)  # the kill lands between two sleeps
        return "done"

    run()
''')


def free_ports(count: int) -> int:
    """A port N such that N .. N+count-1 were free a moment ago."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as other:
                    other.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise AssertionError("no free ports")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, by name and labels."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def total(scrapes: list[dict], name: str, **labels: str) -> float:
    return sum(value(scraped, name, **labels) for scraped in scrapes)


async def scrape(port: int) -> dict:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            return answer.read().decode()
    return samples(await asyncio.to_thread(fetch))


async def until_scraped(ports: list[int], check: Any, timeout: float = 20.0) -> list[dict]:
    """Scrape ``ports`` until ``check(scrapes)`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        scrapes = [await scrape(port) for port in ports]
        if check(scrapes) or time.monotonic() > deadline:
            return scrapes
        await asyncio.sleep(0.1)


async def idle_queue(broker_url: str, task: str) -> None:
    """A task queue that a worker declared and nobody consumes: its calls expire."""
    worker = Worker({task: lambda _: None}, broker=broker_url, metrics=False)
    thread = await asyncio.to_thread(serve_in_thread, worker)
    worker.request_stop(grace=0)
    await asyncio.to_thread(thread.join, 10)


async def silent_queue(broker_url: str, task: str) -> None:
    """A queue for ``task`` without crew's dead-lettering: its calls vanish unanswered."""
    def declare() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        connection.channel().queue_declare(protocol.task_queue(task), durable=True)
        connection.close()
    await asyncio.to_thread(declare)


@pytest.mark.gen_test(timeout=90)
async def test_every_outcome_is_counted_by_client_and_worker(broker_url, tmp_path, uid):
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    port = free_ports(2)
    proc = subprocess.Popen(
        [sys.executable, str(script), "--forks", "2", "-c", "2", "--metrics-port", str(port)],
        env={**python_env(broker_url), "TEST_UID": uid}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    output = Output(proc)
    try:
        for _ in range(2):
            await output.wait_for("serving")
        await calls_of_every_outcome(broker_url, uid, [port, port + 1])
    finally:
        assert await stop(proc, output) == 0, output.everything()
    assert f"metrics on http://0.0.0.0:{port}/metrics" in output.everything()
    assert f"metrics on http://0.0.0.0:{port + 1}/metrics" in output.everything()


async def calls_of_every_outcome(broker_url: str, uid: str, ports: list[int]) -> None:
    client = Client(broker_url, deadline_grace=0.2)
    await client.connect()
    doomed = Client(broker_url)
    await doomed.connect()
    try:
        for n in range(3):
            assert await client.call(f"ok.{uid}", n) == n
        with pytest.raises(RemoteError):
            await client.call(f"fail.{uid}")
        with pytest.raises(TimeoutError) as killed:
            await client.call(f"spin.{uid}", 5, expiration=0.5)
        assert killed.value.killed
        await cancel_a_running_call(client, uid, ports)
        with pytest.raises(UnknownTaskError):
            await client.call(f"nope.{uid}")
        await idle_queue(broker_url, f"idle.{uid}")
        with pytest.raises(ExpirationError):
            await client.call(f"idle.{uid}", expiration=0.3)
        await silent_queue(broker_url, f"void.{uid}")
        with pytest.raises(TimeoutError) as timeout:
            await client.call(f"void.{uid}", expiration=0.3)
        assert not timeout.value.killed
        lost = asyncio.ensure_future(doomed.call(f"spin.{uid}", 0.5))
        await asyncio.sleep(0.2)
        await doomed.close()
        with pytest.raises(ConnectionLostError):
            await lost
    finally:
        await client.close()
        await doomed.close()
    check_client_metrics(uid)
    await check_worker_metrics(uid, ports)


async def cancel_a_running_call(client: Client, uid: str, ports: list[int]) -> None:
    """Cancel a call once its job runs (the worker's running_jobs gauge says so)."""
    call = asyncio.ensure_future(client.call(f"spin.{uid}", 10))
    scrapes = await until_scraped(ports, lambda s: total(s, "crew_worker_running_jobs") == 1)
    assert total(scrapes, "crew_worker_running_jobs") == 1
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


def check_client_metrics(uid: str) -> None:
    """The client's process: its default registry, as an application's exporter shows it."""
    scraped = samples(generate_latest().decode())
    expected = {("ok", "ok"): 3, ("fail", "remote_error"): 1, ("spin", "killed"): 1,
                ("spin", "cancelled"): 1, ("nope", "unknown_task"): 1,
                ("idle", "expired"): 1, ("void", "timeout"): 1, ("spin", "connection_lost"): 1}
    for (task, outcome), count in expected.items():
        labels = {"task": f"{task}.{uid}", "outcome": outcome}
        assert value(scraped, "crew_client_calls_total", **labels) == count, labels
        assert value(scraped, "crew_client_call_duration_seconds_count", **labels) == count
    killed = {"task": f"spin.{uid}", "outcome": "killed"}
    assert 0.5 <= value(scraped, "crew_client_call_duration_seconds_sum", **killed) < 3
    assert value(scraped, "crew_client_call_duration_seconds_bucket", le="0.25", **killed) == 0
    assert value(scraped, "crew_client_call_duration_seconds_bucket", le="+Inf", **killed) == 1


async def check_worker_metrics(uid: str, ports: list[int]) -> None:
    """The workers' ports, summed over both processes."""
    expected = {("ok", "ok"): 3, ("fail", "remote_error"): 1, ("spin", "killed"): 1,
                ("spin", "cancelled"): 1, ("spin", "ok"): 1}

    def jobs(scrapes: list[dict], task: str, outcome: str) -> float:
        return total(scrapes, "crew_worker_jobs_total", task=f"{task}.{uid}", outcome=outcome)

    # The call whose client closed still runs to its end on the worker (0.5 s).
    scrapes = await until_scraped(ports, lambda s: jobs(s, "spin", "ok") == 1)
    for (task, outcome), count in expected.items():
        assert jobs(scrapes, task, outcome) == count, (task, outcome)
        labels = {"task": f"{task}.{uid}", "outcome": outcome}
        assert total(scrapes, "crew_worker_job_duration_seconds_count", **labels) == count
    for task, started in (("ok", 3), ("fail", 1), ("spin", 3)):
        assert total(scrapes, "crew_worker_queue_wait_seconds_count", task=f"{task}.{uid}") == (
            started)
    waited = total(scrapes, "crew_worker_queue_wait_seconds_sum", task=f"ok.{uid}")
    assert 0 <= waited < 3  # three calls taken at once: milliseconds each, clocks permitting
    assert total(scrapes, "crew_worker_job_slots") == 4  # 2 processes, concurrency 2
    assert total(scrapes, "crew_worker_running_jobs") == 0
    assert total(scrapes, "crew_worker_stuck_threads") == 0
    assert total(scrapes, "crew_worker_reconnections_total") == 0


@pytest.mark.gen_test(timeout=30)
async def test_the_gateway_serves_metrics(make_worker, client, http_client, base_url, app, uid):
    make_worker({f"echo.{uid}": lambda x: x}, concurrency=2)
    for n in range(2):
        answer = await http_client.fetch(f"{base_url}/call/echo.{uid}", method="POST",
                                         body=str(n))
        assert answer.body == str(n).encode()
    missing = await http_client.fetch(f"{base_url}/call/nope.{uid}", method="POST", body="1",
                                      raise_error=False)
    assert missing.code == 404
    answer = await http_client.fetch(f"{base_url}/metrics")
    assert answer.headers["Content-Type"].startswith("text/plain")
    scraped = samples(answer.body.decode())
    echo = {"task": f"echo.{uid}", "outcome": "ok"}
    assert value(scraped, "crew_client_calls_total", **echo) == 2
    assert value(scraped, "crew_client_calls_total", task=f"nope.{uid}",
                 outcome="unknown_task") == 1
    assert value(scraped, "crew_worker_jobs_total", **echo) == 2  # the worker in this process


@pytest.fixture
def app(client: Client) -> Any:
    return gateway.make_app(client)


@pytest.mark.gen_test(timeout=30)
async def test_a_call_past_its_deadline_on_arrival_counts_as_expired_on_the_worker(
        make_worker, broker_url, uid):
    """The worker answers a call whose deadline passed before it arrived (RabbitMQ may
    deliver one from a priority queue) without running it: ``expired``, with no job
    duration and no queue wait."""
    task = f"late.{uid}"
    make_worker({task: lambda x: x})
    assert await asyncio.to_thread(late_call, broker_url, task) == protocol.STATUS_EXPIRED
    scraped = samples(generate_latest().decode())
    labels = {"task": task, "outcome": "expired"}
    assert value(scraped, "crew_worker_jobs_total", **labels) == 1
    assert value(scraped, "crew_worker_job_duration_seconds_count", **labels) == 0
    assert value(scraped, "crew_worker_queue_wait_seconds_count", task=task) == 0


@pytest.mark.gen_test(timeout=30)
async def test_a_call_handed_back_by_a_graceful_stop_counts_as_requeued(
        make_worker, client, uid):
    task, started = f"slow.{uid}", threading.Event()

    def slow(_):
        started.set()
        end = time.monotonic() + 5
        while time.monotonic() < end:
            time.sleep(0.01)

    worker = make_worker({task: slow})
    call = asyncio.ensure_future(client.call(task, expiration=2))
    assert await asyncio.to_thread(started.wait, 10)
    worker.request_stop(grace=0)  # the running job is interrupted and its call requeued
    with pytest.raises(ExpirationError):  # back in its queue, where nobody takes it
        await call
    scraped = samples(generate_latest().decode())
    labels = {"task": task, "outcome": "requeued"}
    assert value(scraped, "crew_worker_jobs_total", **labels) == 1
    assert value(scraped, "crew_worker_job_duration_seconds_count", **labels) == 1


@pytest.mark.gen_test(timeout=30)
async def test_a_sync_clients_calls_are_counted_sent_from_its_thread_or_the_loop(
        make_worker, broker_url, uid):
    """A lone SyncClient call is sent from the caller's thread, concurrent ones by crew's
    loop: both are counted as the asyncio client's are."""
    task, failing = f"sync.{uid}", f"sync.fail.{uid}"
    make_worker({task: lambda x: x, failing: lambda x: 1 / 0}, concurrency=4)
    client = SyncClient(broker_url, metrics=True, traces=False)

    def calls() -> None:
        assert client.call(task, 1) == 1  # lone: from this thread
        with pytest.raises(RemoteError):
            client.call(failing, 1)
        with ThreadPoolExecutor(8) as pool:  # many at once: mostly by the loop
            assert list(pool.map(lambda n: client.call(task, n), range(16))) == list(range(16))

    try:
        await asyncio.to_thread(calls)
    finally:
        await asyncio.to_thread(client.close)
    scraped = samples(generate_latest().decode())
    assert value(scraped, "crew_client_calls_total", task=task, outcome="ok") == 17
    assert value(scraped, "crew_client_calls_total", task=failing, outcome="remote_error") == 1
    assert value(scraped, "crew_client_call_duration_seconds_count", task=task,
                 outcome="ok") == 17
