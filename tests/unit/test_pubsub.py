"""Pubsub names and topic matching, without a broker (messages through RabbitMQ:
tests/broker/test_pubsub.py)."""

from __future__ import annotations

import logging

import msgpack
import pytest
from pika.spec import BasicProperties

from crew import Client, protocol
from crew.validation import validate_channel
from crew.pubsub import Subscriptions, _topic_matches


# --- without a broker ---------------------------------------------------------------------

@pytest.mark.parametrize("pattern, key, matches", [
    ("a.b", "a.b", True),
    ("a.b", "a.c", False),
    ("a.*", "a.b", True),
    ("a.*", "a", False),
    ("a.*", "a.b.c", False),
    ("*.b", "a.b", True),
    ("a.#", "a", True),
    ("a.#", "a.b.c", True),
    ("#", "anything.at.all", True),
    ("a.#.z", "a.z", True),
    ("a.#.z", "a.b.c.z", True),
    ("a.#.z", "a.b.c", False),
    ("a*", "ab", False),  # a wildcard is a whole word, as in AMQP
])
def test_topic_matching(pattern, key, matches):
    assert _topic_matches(pattern, key) is matches


@pytest.mark.parametrize("name, pattern, error", [
    ("", True, ValueError),
    ("x" * 256, True, ValueError),
    ("has space", True, ValueError),
    ("line\nbreak", True, ValueError),
    (b"bytes", True, TypeError),
    ("orders.*", False, ValueError),
    ("#", False, ValueError),
])
def test_bad_channels_are_refused(name, pattern, error):
    with pytest.raises(error):
        validate_channel(name, pattern=pattern)


def test_channel_names_that_are_fine():
    assert validate_channel("orders.*", pattern=True) == "orders.*"
    assert validate_channel("é" * 127) == "é" * 127
    assert validate_channel("a*b") == "a*b"  # a star inside a word is no wildcard


def test_subscribe_refuses_what_cannot_be_called():
    with pytest.raises(TypeError):
        Client().subscribe("x", "not callable")


def test_a_channel_name_that_is_not_utf8_is_dropped_and_logged(caplog):
    """Anyone may publish to crew.pubsub with any routing key, which pika gives as bytes when
    it is not UTF-8; a wildcard matches it. Matching it raised TypeError in pika's callback,
    which closed the client's connection."""
    subscriptions = Subscriptions(spawn=None)  # type: ignore[arg-type]  # never connected
    got = []
    for pattern in ("news.*", "#", "news.#"):
        subscriptions.subscribe(pattern, got.append)
    props = BasicProperties(content_type=protocol.MSGPACK)
    subscriptions.on_message(b"news.\xff", props, msgpack.packb("forged"))
    subscriptions.on_message("news.fine", props, msgpack.packb("fine"))
    assert got == ["fine"] * 3
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
