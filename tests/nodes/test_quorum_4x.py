"""Quorum task queues on RabbitMQ 4.x: a private node of the newest RabbitMQ Debian packages
(``scripts/rabbitmq-cluster``, base port 5750: AMQP on 127.0.0.1:5750), started for this
module and stopped after it, also when a test fails. The facts the shared 3.10 cannot show:
priorities 0-31 on quorum queues, the delivery limit, x-max-priority refused, and 4.3's
consumer timeout, which cancels a quorum queue's consumer instead of closing its channel.

Needs root and the script's cached Debian root (``scripts/rabbitmq-cluster prepare``): the
module fails, saying so, without them; it never skips.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from typing import Iterator

import pika
import pytest

from crew import BrokerError, Client, DeliveryLimitError, ExpirationError, Worker, protocol
from crew.worker import serve_in_thread
from tests.support.logs import lines, until
from tests.support.processes import ROOT
from tests.support.quorum import call_poison, ready_calls, served_order, server_version

BASE_PORT = "5750"
SCRIPT = [os.path.join(ROOT, "scripts", "rabbitmq-cluster"), "--base-port", BASE_PORT]


def _script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SCRIPT, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def node_url() -> Iterator[str]:
    """The amqp:// URL of a fresh 4.x node (vhost ``crew``)."""
    if os.geteuid() != 0:
        pytest.fail("tests/nodes/test_quorum_4x.py needs root: scripts/rabbitmq-cluster runs "
                    "RabbitMQ 4.x in a chroot")
    try:
        started = _script("start", "--nodes", "1")
        if started.returncode != 0:
            pytest.fail(f"cannot start a RabbitMQ 4.x node on base port {BASE_PORT} (run "
                        f"`scripts/rabbitmq-cluster prepare` first?):\n{started.stderr}")
        url = started.stdout.split()[0]
        yield url
    finally:
        _script("stop")


@pytest.fixture
def node_client(io_loop, node_url) -> Iterator[Client]:
    client = Client(node_url)
    io_loop.run_sync(client.connect)
    yield client
    io_loop.run_sync(client.close)


def test_the_node_runs_rabbitmq_4(node_url):
    assert server_version(node_url) >= (4,)


def test_quorum_queues_refuse_x_max_priority(node_url, uid):
    connection = pika.BlockingConnection(pika.URLParameters(node_url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="x-max-priority"):
            connection.channel().queue_declare(
                f"q.refused.{uid}", durable=True,
                arguments={"x-queue-type": "quorum", "x-max-priority": 10})
    finally:
        connection.close()


@pytest.mark.gen_test(timeout=120)
async def test_quorum_priorities_order_0_to_31_and_above_counts_as_31(
        node_url, node_client, uid):
    published = [0, 3, 9, 200, 5, 31, 32, 1, 255, 10]
    order = await served_order(node_client, node_url, f"q.prio.{uid}", published,
                               queue_type="quorum")
    if server_version(node_url) >= (4, 3):
        assert order == [200, 31, 32, 255, 10, 9, 5, 3, 1, 0]
    else:  # Debian 13's 4.0.5: two levels, not strictly ordered (documented, not checked)
        assert sorted(order) == sorted(published)


@pytest.mark.gen_test(timeout=60)
async def test_an_expired_call_comes_back_as_expiration_error(node_url, node_client, uid):
    task = f"q.idle.{uid}"
    worker = Worker({task: lambda x: x}, broker=node_url, queue_type="quorum")
    thread = serve_in_thread(worker)
    worker.request_stop(grace=0)
    thread.join(30)
    with pytest.raises(ExpirationError):
        await node_client.call(task, None, expiration=0.5)
    assert ready_calls(node_url, protocol.task_queue(task)) == 0


@pytest.mark.gen_test(timeout=180)
async def test_a_poison_call_ends_with_delivery_limit_error(node_url, node_client, uid,
                                                            tmp_path):
    task = f"q.poison.{uid}"
    outcome, deaths = await call_poison(node_client, node_url, task, tmp_path, expiration=120)
    assert isinstance(outcome, DeliveryLimitError), outcome
    assert outcome.deliveries == protocol.DELIVERY_LIMIT + 1 == deaths
    assert f"delivered {deaths} times" in str(outcome)
    assert ready_calls(node_url, protocol.task_queue(task)) == 0


def test_a_classic_worker_meeting_a_quorum_queue_is_told_what_to_do(node_url, uid):
    task = f"q.mixed.{uid}"
    first = Worker({task: lambda x: x}, broker=node_url, queue_type="quorum")
    thread = serve_in_thread(first)
    try:
        with pytest.raises(BrokerError, match="--queue-type quorum"):
            serve_in_thread(Worker({task: lambda x: x}, broker=node_url))
    finally:
        first.request_stop(grace=0)
        thread.join(30)


@pytest.mark.gen_test(timeout=120)
async def test_a_job_past_the_consumer_timeout_is_consumed_again_and_answered_once(
        node_url, node_client, uid, caplog):
    """On 4.3 the consumer timeout cancels the consumer of a quorum queue and returns its
    call to the queue, the channel staying open. The worker consumes again, meets the
    returned call while its first run still runs, acknowledges that copy without running
    it, and the first run's result answers the caller: one run, one answer, nothing left."""
    if server_version(node_url) < (4, 3):
        pytest.fail("this test needs RabbitMQ 4.3 or later (consumer timeout on quorum queues)")
    task = f"q.timeout.{uid}"
    pattern = "^" + re.escape(protocol.task_queue(task)) + "$"
    policy = _script("ctl", "1", "set_policy", "-p", "crew", f"timeout-{uid}", pattern,
                     json.dumps({"consumer-timeout": 1000}), "--apply-to", "queues")
    assert policy.returncode == 0, policy.stderr
    runs: list[float] = []
    lock = threading.Lock()

    def slow(data: object) -> object:
        with lock:
            runs.append(time.monotonic())
        if data == "slow":
            time.sleep(4)  # past the 1 s consumer timeout
        return data

    worker = Worker({task: slow}, broker=node_url, queue_type="quorum", concurrency=1)
    thread = serve_in_thread(worker)
    try:
        assert await node_client.call(task, "slow", expiration=30) == "slow"
        assert len(runs) == 1, f"the call ran {len(runs)} times"
        assert lines(caplog, "the broker cancelled the worker's consumer"), caplog.text
        await until(lambda: bool(lines(caplog, "consuming .* again")), 10,
                    "the worker consumed its queue again")
        assert await node_client.call(task, "fast", expiration=10) == "fast"
        assert len(lines(caplog, "copy of a running call")) == 1, caplog.text
    finally:
        worker.request_stop(grace=0)
        thread.join(30)
        _script("ctl", "1", "clear_policy", "-p", "crew", f"timeout-{uid}")
    assert ready_calls(node_url, protocol.task_queue(task)) == 0
