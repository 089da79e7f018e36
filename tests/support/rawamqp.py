"""Plain pika for tests: what crew itself would not do to the broker (declare a decoy queue,
delete the cancel stream, ask for a queue's counts)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pika
from pika.adapters.blocking_connection import BlockingChannel


@contextlib.contextmanager
def raw_channel(url: str) -> Iterator[BlockingChannel]:
    """A channel of a plain pika connection to ``url``, closed on leaving."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection.channel()
    finally:
        connection.close()
