"""Several broker URLs against the shared broker: a node that refuses is passed over, and a
lost connection moves to the next node first. Two :class:`FaultProxy` in front of the one
broker stand for two nodes (the proxy class alone: not the fault plugin, whose fixtures start
a private node). A real three-node cluster: tests/nodes/test_cluster_nodes.py."""

from __future__ import annotations

import logging
import random
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from crew import Client
from tests.support.connect import refused_port
from tests.support.faults import PASS, REFUSE, RESET, FaultProxy
from tests.support.logs import lines, until


def at_port(url: str, port: int) -> str:
    """``url`` with its port replaced (same host, credentials, vhost)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition(":")[0] if parts.port else parts.netloc
    return urlunsplit(parts._replace(netloc=f"{netloc}:{port}"))


@pytest.fixture
def first_node_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every rotation at the first URL (crew picks one at random) so that the test
    knows which node comes first; the rotation itself is crew's."""
    monkeypatch.setattr(random, "randrange", lambda n: 0)


@pytest.fixture
def proxies(broker_url: str) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    """Two TCP proxies to the shared broker: "node A" and "node B"."""
    parts = urlsplit(broker_url)
    upstream = (parts.hostname or "127.0.0.1", parts.port or 5672)
    with FaultProxy(upstream) as a, FaultProxy(upstream) as b:
        yield a, b



@pytest.mark.gen_test(timeout=60)
async def test_a_refusing_first_node_is_passed_over_by_client_and_worker(
        broker_url, make_worker, uid, caplog, first_node_first):
    caplog.set_level(logging.INFO)
    closed = at_port(broker_url, refused_port())
    good = urlsplit(broker_url)
    node = f"{good.hostname}:{good.port or 5672}"
    make_worker({f"echo.{uid}": lambda x: x}, broker=f"{closed}, {broker_url}")
    client = Client([closed, broker_url])
    try:
        await client.connect(timeout=20)
        assert await client.call(f"echo.{uid}", "hi", expiration=20) == "hi"
    finally:
        await client.close()
    refused = f":{urlsplit(closed).port}/"
    assert lines(caplog, rf"^client cannot connect \(attempt 1\).*{refused}")
    assert lines(caplog, rf"^worker cannot connect \(attempt 1\).*{refused}")
    assert lines(caplog, rf"^client connected to amqp://guest:\*\*\*@{node}/")
    await until(lambda: bool(lines(caplog, rf"^worker \w+ serving .* on amqp://guest:\*\*\*@"
                                           rf"{node}/")), 10, "the worker's log names its node")
    assert all("guest:guest" not in r.getMessage() for r in caplog.records)


@pytest.mark.gen_test(timeout=120)
async def test_a_lost_node_moves_client_and_worker_to_the_next_node_first(
        proxies, broker_url, make_worker, uid, caplog, first_node_first):
    caplog.set_level(logging.INFO)
    a, b = proxies
    urls = [at_port(broker_url, a.port), at_port(broker_url, b.port)]
    echo = f"echo.{uid}"
    make_worker({echo: lambda x: x}, broker=urls)
    client = Client(",".join(urls))
    try:
        await client.connect(timeout=20)
        assert await client.call(echo, 1, expiration=20) == 1
        await until(lambda: a.accepted >= 2, 10, "client and worker connected to node A")
        assert b.accepted == 0

        for lost, other in ((a, b), (b, a)):
            other.set_mode(PASS)
            client_on = rf"^client connected to .*:{other.port}/"
            worker_on = rf"^worker \w+ serving .* on .*:{other.port}/"
            before = len(lines(caplog, client_on)), len(lines(caplog, worker_on))
            lost.set_mode(RESET)  # every connection through it cut with an RST...
            lost.set_mode(REFUSE)  # ...and nothing listens any more
            await until(lambda c=client_on, w=worker_on, n=before:
                        len(lines(caplog, c)) > n[0] and len(lines(caplog, w)) > n[1], 30,
                        f"client and worker connected again, to the node on {other.port}")
            for value in range(5):
                assert await client.call(echo, value, expiration=20) == value
            # The first attempt after the loss went to the other node: the lost one was
            # never tried.
            assert not lines(caplog, rf"cannot connect .*:{lost.port}/")
            assert client.connected
    finally:
        await client.close()
    assert lines(caplog, rf"^client lost its broker connection to .*:{a.port}/")
    assert all("guest:guest" not in r.getMessage() for r in caplog.records)
