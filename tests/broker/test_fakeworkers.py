"""The fake workers (tests/support/fakeworkers.py) publish figures messages as the contract
(docs/PROTOCOL.md, section 13) says: read back from a queue of our own bound to the
``crew.figures`` exchange and decoded with crew's codec, they have its properties and
shape, and their cumulative figures grow from one message of a worker to the next."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import pytest

from crew import RemoteError, codec, protocol
from tests.support.fakeworkers import (BUCKETS, FIGURES_EXCHANGE, FIGURES_TYPE, FakeFleet,
                                       shape_problems)
from tests.support.rawamqp import raw_channel

WORKERS, TASKS, PER_TASK, ROUNDS = 3, 7, 2, 4


def calls_done(message: dict[str, Any]) -> int:
    return sum(sum(f["outcomes"].values()) for f in message["figures"].values())


@pytest.fixture(scope="module")
def messages(broker_url: str) -> list[tuple[Any, dict[str, Any]]]:
    """(properties, decoded body) of every message a small fleet published."""
    with raw_channel(broker_url) as channel:
        channel.exchange_declare(FIGURES_EXCHANGE, "fanout", durable=True)
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, FIGURES_EXCHANGE)
        with FakeFleet(broker_url, workers=WORKERS, tasks=TASKS, interval=0.3,
                       workers_per_task=PER_TASK, seed=7) as fleet:
            fleet.wait_published(WORKERS * ROUNDS)
        expected = fleet.published
        got = []
        for _method, props, body in channel.consume(queue, inactivity_timeout=5):
            if body is None:
                break
            got.append((props, codec.decode(body, props.content_type)))
            if len(got) == expected:
                break
        channel.cancel()
    assert len(got) == expected >= WORKERS * (ROUNDS + 1)  # with the goodbyes
    return got


def test_each_message_has_the_contract_s_properties_and_shape(messages):
    for props, message in messages:
        assert props.type == FIGURES_TYPE
        assert props.content_type == protocol.MSGPACK
        assert props.delivery_mode == 1
        assert props.expiration == "10000"
        assert shape_problems(message) == []
        assert message["buckets"] == list(BUCKETS)
        assert message["interval"] == 0.3


def test_each_worker_s_figures_grow_and_its_last_message_says_it_stops(messages):
    by_worker: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _props, message in messages:
        by_worker[message["worker"]].append(message)
    assert len(by_worker) == WORKERS
    assert sum(len(told[0]["tasks"]) for told in by_worker.values()) == TASKS * PER_TASK
    for told in by_worker.values():
        assert [m["stopping"] for m in told] == [False] * (len(told) - 1) + [True]
        for before, after in itertools.pairwise(told):
            assert after["at"] >= before["at"]
            for task, figures in before["figures"].items():
                later = after["figures"][task]
                for outcome, count in figures["outcomes"].items():
                    assert later["outcomes"][outcome] >= count
                assert all(a >= b for a, b in zip(later["run"], figures["run"], strict=True))
                assert sum(later["run"]) == sum(later["outcomes"].get(o, 0)
                                                for o in ("ok", "remote_error", "killed"))
        assert calls_done(told[-1]) > calls_done(told[0]) > 0
        assert set(told[0]["figures"]) <= set(told[0]["tasks"])


def test_the_fleet_has_running_calls_and_failures_with_tracebacks(messages):
    bodies = [message for _props, message in messages]
    running = [call for m in bodies for call in m["calls"] if call["state"] == "running"]
    assert running and all(call["deadline"] > call["received"] for call in running)
    assert all(m["busy"] == sum(c["state"] == "running" for c in m["calls"]) for m in bodies)
    failures = [f for m in bodies for f in m["failures"]]
    assert any(f["outcome"] == "remote_error" and "Traceback (most recent call last)" in
               f["traceback"] and f["type"] in f["traceback"] for f in failures)
    assert all(m["calls"] == [] for m in bodies if m["stopping"])
    assert all([f["at"] for f in m["failures"]] == sorted(f["at"] for f in m["failures"])
               for m in bodies)  # newest last


def test_shape_problems_finds_what_breaks_the_contract(messages):
    message = dict(messages[0][1])
    assert shape_problems({**message, "interval": "2"}) != []
    assert shape_problems({**message, "buckets": [*BUCKETS, 120.0]}) != []
    del message["failures"]
    assert shape_problems(message) != []


@pytest.mark.gen_test(timeout=60)
async def test_a_real_worker_s_message_passes_the_same_check(make_worker, client, broker_url,
                                                             uid):
    """The checker is the contract as the workers follow it, not only as the fake does."""
    def explode(x):
        raise ValueError(f"bad {x}")

    with raw_channel(broker_url) as channel:
        channel.exchange_declare(FIGURES_EXCHANGE, "fanout", durable=True)
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, FIGURES_EXCHANGE)
        worker = make_worker({f"echo.{uid}": lambda x: x, f"boom.{uid}": explode})
        assert await client.call(f"echo.{uid}", 1) == 1
        with pytest.raises(RemoteError):
            await client.call(f"boom.{uid}", 2)
        for _method, props, body in channel.consume(queue, inactivity_timeout=10):
            assert body is not None, "no figures message with both calls within 10 s"
            message = codec.decode(body, props.content_type)
            if message["worker"] == worker.uuid and len(message["figures"]) == 2:
                break
        channel.cancel()
    assert shape_problems(message) == []
    assert props.type == FIGURES_TYPE and props.expiration == "10000"
    assert message["figures"][f"boom.{uid}"]["outcomes"] == {"remote_error": 1}
    assert message["failures"][-1]["type"] == "ValueError"
