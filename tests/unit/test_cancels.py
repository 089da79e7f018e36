"""Remembered cancel notices, without a broker (the notices on RabbitMQ:
tests/broker/test_cancels.py)."""

from __future__ import annotations

import asyncio

from crew import protocol
from crew.cancels import Remembered


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
