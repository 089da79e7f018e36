"""Quorum task queues (``queue_type="quorum"``) on the broker under test: the shared
RabbitMQ 3.10 by default, where quorum queues exist but ignore priorities and have no delivery
limit of their own. RabbitMQ 4.x-only facts are in tests/nodes/test_quorum_4x.py."""

from __future__ import annotations

import subprocess
from urllib.parse import unquote, urlsplit

import pytest

from crew import BrokerError, DeliveryLimitError, ExpirationError, Worker, protocol
from crew.worker import serve_in_thread
from tests.support.broker import rabbitmqctl_command
from tests.support.quorum import call_poison, ready_calls, served_order, server_version


def _declare(broker_url, task, **kwargs):
    """Make the task's queue exist, with no worker behind it."""
    worker = Worker({task: lambda x: x}, broker=broker_url, **kwargs)
    thread = serve_in_thread(worker)
    worker.request_stop(grace=0)
    thread.join(30)


@pytest.mark.gen_test(timeout=60)
async def test_a_quorum_worker_serves_calls(make_worker, client, uid):
    task = f"q.echo.{uid}"
    worker = make_worker({task: lambda x: {"got": x}}, queue_type="quorum")
    assert worker.queue_type == "quorum"
    assert await client.call(task, [1, "a"], priority=200) == {"got": [1, "a"]}


@pytest.mark.gen_test(timeout=60)
async def test_an_expired_call_in_a_quorum_queue_comes_back_as_expiration_error(
        broker_url, client, uid):
    task = f"q.idle.{uid}"
    _declare(broker_url, task, queue_type="quorum")
    with pytest.raises(ExpirationError, match="before its deadline"):
        await client.call(task, None, expiration=0.5)
    assert ready_calls(broker_url, protocol.task_queue(task)) == 0


@pytest.mark.parametrize("existing, declared", [("classic", "quorum"), ("quorum", "classic")])
def test_a_worker_meeting_a_queue_of_the_other_type_is_told_what_to_do(
        broker_url, uid, existing, declared):
    task = f"q.mixed.{uid}"
    _declare(broker_url, task, queue_type=existing)
    worker = Worker({task: lambda x: x}, broker=broker_url, queue_type=declared)
    with pytest.raises(BrokerError) as raised:
        serve_in_thread(worker)
    message = str(raised.value)
    assert raised.value.code == 406
    assert f"It is a {existing} queue and this worker declares {declared} ones" in message
    assert f"--queue-type {existing}" in message
    assert "README" in message


@pytest.mark.gen_test(timeout=90)
async def test_priorities_on_quorum_queues_follow_the_broker_version(broker_url, client, uid):
    published = [0, 3, 9, 200, 5, 31, 32, 1]
    order = await served_order(client, broker_url, f"q.prio.{uid}", published,
                               queue_type="quorum")
    version = server_version(broker_url)
    if version < (4,):  # 3.x quorum queues have no priorities: first in, first out
        assert order == published
    elif version < (4, 3):  # 4.0-4.2: two levels, 0-4 normal and 5 up high, not strict
        assert sorted(order) == sorted(published)  # (documented there, not checked here)
    else:  # 4.3: 0-31 strictly, above 31 counts as 31
        assert order == [200, 31, 32, 9, 5, 3, 1, 0]


@pytest.mark.gen_test(timeout=90)
async def test_classic_queues_keep_their_priorities(broker_url, client, uid):
    order = await served_order(client, broker_url, f"c.prio.{uid}", [0, 3, 9, 200, 5, 10, 1],
                               queue_type="classic")  # also when $CREW_QUEUE_TYPE says quorum
    assert order == [200, 10, 9, 5, 3, 1, 0]  # x-max-priority 10: 200 counts as 10


@pytest.mark.gen_test(timeout=180)
async def test_a_poison_call_ends_with_delivery_limit_error(broker_url, client, uid, tmp_path):
    task = f"q.poison.{uid}"
    outcome, deaths = await call_poison(client, broker_url, task, tmp_path, expiration=120)
    assert isinstance(outcome, DeliveryLimitError), outcome
    assert outcome.deliveries == protocol.DELIVERY_LIMIT + 1 == deaths
    assert f"delivered {deaths} times" in str(outcome)
    assert ready_calls(broker_url, protocol.task_queue(task)) == 0


@pytest.mark.gen_test(timeout=120)
async def test_moving_a_task_from_classic_to_quorum_as_the_readme_says(
        broker_url, client, uid):
    """README, "Moving a task to quorum queues": stop the classic workers, delete the queue
    with rabbitmqctl, start the workers with --queue-type quorum."""
    task = f"move.{uid}"
    _declare(broker_url, task)  # a classic task queue whose workers have stopped
    rabbitmqctl = rabbitmqctl_command()
    assert rabbitmqctl, "set CREW_TEST_RABBITMQCTL with CREW_TEST_URL: this test deletes a queue"
    vhost = unquote(urlsplit(broker_url).path[1:]) or "/"
    subprocess.run([*rabbitmqctl, "-q", "-p", vhost, "delete_queue", protocol.task_queue(task)],
                   check=True, capture_output=True, timeout=60)
    worker = Worker({task: lambda x: x + 1}, broker=broker_url, queue_type="quorum")
    thread = serve_in_thread(worker)
    try:
        assert await client.call(task, 1) == 2
    finally:
        worker.request_stop(grace=0)
        thread.join(30)
