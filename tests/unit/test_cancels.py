"""Remembered cancel notices, without a broker (the notices on RabbitMQ:
tests/broker/test_cancels.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pika.data
import pytest

from crew import protocol
from crew.cancels import Remembered, send_notice


# --- what a worker remembers ------------------------------------------------------------


def test_remembered_notices_last_until_their_deadline():
    async def check() -> None:
        remembered = Remembered()
        remembered.add(("q", "soon"), protocol.now_ms() + 50)
        remembered.add(("q", "later"), protocol.now_ms() + 60_000)
        remembered.add(("q", "past"), protocol.now_ms() - 1)
        remembered.add(("q", "none"), None)  # kept for the longest a call can live
        assert ("q", "soon") in remembered and ("q", "past") not in remembered
        await asyncio.sleep(0.2)
        assert ("q", "soon") not in remembered
        assert remembered.take(("q", "later")) and not remembered.take(("q", "later"))
        assert ("q", "none") in remembered
        remembered.clear()
        assert len(remembered) == 0

    asyncio.run(check())


def test_a_flood_of_notices_forgets_the_oldest_and_says_so_once(caplog):
    async def check() -> None:
        remembered = Remembered(limit=100)
        deadline = protocol.now_ms() + 60_000
        for n in range(1000):
            remembered.add(("q", str(n)), deadline)
        assert len(remembered) == 100
        assert ("q", "899") not in remembered and ("q", "900") in remembered
        assert caplog.text.count("cancel notices remembered") == 1
        remembered.clear()

    asyncio.run(check())


@pytest.mark.parametrize("deadline", [lambda: 2**63 - 1, lambda: protocol.now_ms() + 3_600_000],
                         ids=["2**63-1", "in an hour"])
def test_a_notice_is_remembered_no_longer_than_a_call_can_wait(deadline):
    """A call waits at most MAX_EXPIRATION (crew's client gives no longer an expiration):
    a notice whose deadline is further (forged: 2**63 - 1 ms) is forgotten then, not kept
    until the limit pushes it out."""
    deadline = deadline()  # "in an hour" from when the test runs, not from its collection

    async def check() -> None:
        remembered = Remembered()
        remembered.add(("q", "far"), deadline)
        loop = asyncio.get_running_loop()
        forgotten_at = remembered._notices[("q", "far")].when()
        assert forgotten_at <= loop.time() + protocol.MAX_EXPIRATION
        assert forgotten_at >= loop.time() + protocol.MAX_EXPIRATION - 5
        remembered.clear()

    asyncio.run(check())


class _Sent:
    def __init__(self) -> None:
        self.headers: dict[str, Any] = {}

    def publish(self, _exchange: str, _key: str, _body: bytes, props: Any) -> None:
        self.headers = props.headers
        pika.data.encode_table([], props.headers)  # as pika will: a signed 64-bit at most


@pytest.mark.parametrize("deadline", [2**64 - 1, 10**400, -(10**400)],
                         ids=["2**64-1", "10**400", "-10**400"])
def test_a_notice_with_a_deadline_past_64_bits_is_sent_with_one_a_call_can_have(deadline):
    """crew cancel and the dashboard send the deadline a worker reported: a forged presence
    answer's is any integer, which pika could not encode (crew cancel ended in a traceback)."""
    channel = _Sent()
    send_notice(channel, "c.1", "amq.gen-q", deadline)  # type: ignore[arg-type]
    sent = channel.headers[protocol.DEADLINE_HEADER]
    assert 0 <= sent <= protocol.now_ms() + protocol.seconds_to_ms(protocol.MAX_EXPIRATION)
