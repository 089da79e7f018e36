"""The public path to pika (crew/seam.py) on the broker: calls go out with pika's own
``basic_publish`` and ``basic_ack``, and come in through pika's own reads, never crew's
frames."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pika.channel
import pytest
from pika.adapters.utils import io_services_utils

from crew import seam, transport, wire
from crew.transport import PublicConnection


@pytest.fixture(autouse=True)
def _fresh_checks() -> Iterator[None]:
    """The path is chosen anew for this test's connections, and forgotten after it."""
    seam.codec_problem.cache_clear()
    transport._internals_problem.cache_clear()
    seam._reported.clear()
    yield
    seam._reported.clear()


@pytest.mark.gen_test(timeout=60)
async def test_the_public_path_publishes_and_acks_with_pika(monkeypatch, make_worker,
                                                            make_client, uid):
    monkeypatch.setenv(seam.ENV, "public")
    used: list[str] = []
    for name in ("basic_publish", "basic_ack"):
        original = getattr(pika.channel.Channel, name)
        monkeypatch.setattr(pika.channel.Channel, name,
                            lambda self, *a, _n=name, _o=original, **k: (used.append(_n),
                                                                         _o(self, *a, **k))[1])

    def refused(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("crew's frames on the public path")

    for name in ("publish_frames", "ack_frame", "decode"):
        monkeypatch.setattr(wire, name, refused)
    make_worker({f"echo.{uid}": lambda x: x}, concurrency=2)
    client = await make_client()
    connection = client._connection._connection
    assert type(connection) is PublicConnection
    assert type(connection._transport) is io_services_utils._AsyncPlaintextTransport
    assert connection._transport._MAX_RECV_BYTES == \
        io_services_utils._AsyncPlaintextTransport._MAX_RECV_BYTES  # pika's own reads
    results = await asyncio.gather(*(client.call(f"echo.{uid}", n) for n in range(5)))
    assert results == list(range(5))
    assert used.count("basic_publish") >= 10 and used.count("basic_ack") >= 5
