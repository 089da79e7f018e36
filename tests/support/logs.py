"""Waiting on what a test's own process logs: the lines that match, and a condition on them
checked until it holds (log records cannot notify, so this asks again every 0.05 s)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Callable

import pytest


def lines(caplog: pytest.LogCaptureFixture, pattern: str) -> list[str]:
    """The messages logged so far that match ``pattern``."""
    regex = re.compile(pattern)
    return [r.getMessage() for r in caplog.records if regex.search(r.getMessage())]


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``condition()`` holds; fail saying ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)
