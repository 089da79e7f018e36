"""The unit tier runs without a broker: a test here that asks for one fails, loudly."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def broker_url() -> str:
    pytest.fail("a unit test asked for the broker (broker_url): it belongs in tests/broker/")
