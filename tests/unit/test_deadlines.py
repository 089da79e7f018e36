"""Deadline limits, without a broker (calls against their deadlines:
tests/broker/test_deadlines.py)."""

from __future__ import annotations

import crew


def test_default_expiration_stays_below_the_broker_consumer_timeout():
    consumer_timeout = 30 * 60  # RabbitMQ's default, in seconds
    assert crew.protocol.DEFAULT_EXPIRATION < crew.protocol.MAX_EXPIRATION < consumer_timeout
