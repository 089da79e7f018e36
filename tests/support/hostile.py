"""Helpers for hostile-input tests: a plain pika publisher that sends exactly what it is
given, queue counts (ready and unacknowledged), crew's log lines, replies decoded."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pytest

from crew import codec, protocol
from tests.support.broker import rabbitmqctl_command

JSON, MSGPACK = "application/json", "application/msgpack"


class RawPublisher:
    """A plain pika connection that publishes exactly what it is given and collects what
    comes back on a reply queue of its own. Publishes are confirmed: when ``send`` returns,
    the broker holds the message."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        declared = self.channel.queue_declare("", exclusive=True, auto_delete=True)
        self.reply_queue: str = declared.method.queue
        self.replies: dict[Any, list[tuple[pika.BasicProperties, bytes]]] = {}
        self.channel.basic_consume(self.reply_queue, self._on_reply, auto_ack=True,
                                   exclusive=True)

    def _on_reply(self, _ch: Any, _method: Any, props: pika.BasicProperties,
                  body: bytes) -> None:
        self.replies.setdefault(props.correlation_id, []).append((props, body))

    def send(self, routing_key: str, body: bytes, exchange: str = "", **properties: Any) -> None:
        self.channel.basic_publish(exchange, routing_key, body,
                                   pika.BasicProperties(**properties))

    def call(self, task: str, body: bytes, **properties: Any) -> Any:
        """Publish a call to ``task``; return its correlation id. Properties not given get
        the values of a well-formed JSON call; pass ``None`` to leave one out."""
        defaults = {"content_type": JSON, "correlation_id": uuid.uuid4().hex,
                    "reply_to": self.reply_queue, "expiration": "10000", "headers": {}}
        props = {**defaults, **properties}
        self.send(protocol.task_queue(task), body, **props)
        return props["correlation_id"]

    def wait(self, correlation_id: Any, timeout: float = 10.0
             ) -> tuple[pika.BasicProperties, bytes] | None:
        """The first reply for ``correlation_id``, or None if none came within ``timeout``."""
        end = time.monotonic() + timeout
        while correlation_id not in self.replies:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return None
            self.connection.process_data_events(time_limit=remaining)  # waits on the socket
        return self.replies[correlation_id][0]

    def normal_call(self, task: str) -> None:
        """A well-formed call must get its result: the worker still serves."""
        cid = self.call(task, b'"ping"')
        reply = self.wait(cid)
        assert reply is not None, "the worker no longer answers a normal call"
        props, body = reply
        assert props.headers["crew-status"] == "ok"
        assert json.loads(body) == {"got": "ping"}

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def late_call(url: str, task: str) -> str:
    """Publish a call to ``task`` whose deadline passed a second ago (its TTL still a
    minute: as a priority queue may deliver one) and return its reply's ``crew-status``."""
    publisher = RawPublisher(url)
    try:
        reply = publisher.wait(publisher.call(task, b"null", expiration="60000", headers={
            protocol.DEADLINE_HEADER: protocol.now_ms() - 1000}))
    finally:
        publisher.close()
    assert reply is not None, "no reply to the late call"
    return str(reply[0].headers[protocol.STATUS_HEADER])


def decode_reply(reply: tuple[pika.BasicProperties, bytes]) -> tuple[str, Any]:
    props, body = reply
    return props.headers["crew-status"], codec.decode(body, props.content_type,
                                                      props.content_encoding)


def queue_counts(broker_url: str, queue: str) -> tuple[int, int]:
    """``(messages_ready, messages_unacknowledged)`` of ``queue`` on the test vhost.

    Through ``rabbitmqctl`` (``tests.support.broker.rabbitmqctl_command``); against another broker
    (``$CREW_TEST_URL``) without ``$CREW_TEST_RABBITMQCTL`` only the ready count can be had
    (a passive declare), and the unacknowledged count is taken as 0.
    """
    rabbitmqctl = rabbitmqctl_command()
    if rabbitmqctl is None:
        connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        try:
            declared = connection.channel().queue_declare(queue, passive=True)
        finally:
            connection.close()
        return declared.method.message_count, 0
    vhost = unquote(urlsplit(broker_url).path[1:]) or "/"
    done = subprocess.run(
        [*rabbitmqctl, "-q", "-p", vhost, "list_queues", "--formatter", "json", "name",
         "messages_ready", "messages_unacknowledged"],
        check=True, capture_output=True, text=True, timeout=60)
    for row in json.loads(done.stdout or "[]"):
        if row["name"] == queue:
            return int(row["messages_ready"]), int(row["messages_unacknowledged"])
    raise AssertionError(f"no queue {queue} on vhost {vhost}")


def assert_queue_empty(broker_url: str, queue: str, timeout: float = 10.0) -> None:
    """Nothing ready, nothing unacknowledged. The worker acks right after publishing its
    reply, so the ack may reach the broker just after the reply reached us: ask again for a
    bounded time (rabbitmqctl cannot notify)."""
    end = time.monotonic() + timeout
    while True:
        counts = queue_counts(broker_url, queue)
        if counts == (0, 0) or time.monotonic() > end:
            break
        time.sleep(0.2)
    assert counts == (0, 0), f"{queue}: {counts[0]} ready, {counts[1]} unacknowledged"


def crew_log_lines(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING,
                   logger: str = "crew") -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= level and (r.name == logger or r.name.startswith(logger + "."))]


class RawField:
    """An AMQP field value written as given (pika cannot write such a timestamp itself)."""

    def __init__(self, encoded: bytes) -> None:
        self.encoded = encoded


class raw_fields:
    """Context manager: while active, pika writes :class:`RawField` values verbatim."""

    def __enter__(self) -> None:
        self._original = pika.data.encode_value

        def encode_value(pieces: list[bytes], value: Any) -> int:
            if isinstance(value, RawField):
                pieces.append(value.encoded)
                return len(value.encoded)
            return self._original(pieces, value)

        pika.data.encode_value = encode_value

    def __exit__(self, *exc_info: Any) -> None:
        pika.data.encode_value = self._original


class PresenceForger:
    """A program that answers every presence request on the vhost with ``answers`` (each a
    body and its content type), from a queue of its own bound to ``crew.presence``, as
    anyone who may bind there can (docs/PROTOCOL.md, section 12). Its pika connection runs
    in a thread of its own until :meth:`stop`; ``requests`` counts what it answered."""

    def __init__(self, url: str, answers: list[tuple[bytes, str]]) -> None:
        self.answers = answers
        self.requests = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the forger did not bind to crew.presence"

    def _run(self, url: str) -> None:
        with pika.BlockingConnection(pika.URLParameters(url)) as connection:
            channel = connection.channel()
            channel.exchange_declare(protocol.PRESENCE_EXCHANGE, "fanout", durable=True)
            queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue, protocol.PRESENCE_EXCHANGE)
            channel.basic_consume(queue, self._on_request, auto_ack=True, exclusive=True)
            self._ready.set()
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.1)

    def _on_request(self, channel: Any, _method: Any, props: pika.BasicProperties,
                    _body: bytes) -> None:
        self.requests += 1
        for body, content_type in self.answers:
            channel.basic_publish("", props.reply_to, body, pika.BasicProperties(
                type=protocol.PRESENCE_TYPE, correlation_id=props.correlation_id,
                content_type=content_type, delivery_mode=1))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


# --- values that cost the stack --------------------------------------------------------------

#: A JSON integer (they have any length) that no float and no msgpack integer holds.
HUGE = 10**400


def deep(levels: int) -> Any:
    """``levels`` lists, one inside the other, around None (msgpack carries 1000)."""
    value: Any = None
    for _ in range(levels):
        value = [value]
    return value


def at_stack_depth(frames: int, func: Any) -> Any:
    """``func()`` called ``frames`` frames deep, as pika's callbacks are called."""
    return at_stack_depth(frames - 1, func) if frames else func()
