"""A caller in "another language": plain pika and JSON, following docs/PROTOCOL.md only.

Nothing here imports crew.protocol or crew.codec: every exchange, queue, header and argument
is spelled as the document spells it. If the code and the document drift apart, these tests
fail. The workers are real crew workers on the test vhost.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

import pika
import pika.exceptions
import pytest

# Names exactly as docs/PROTOCOL.md gives them.
EXPIRED_EXCHANGE = "crew.expired"
CONTROL_EXCHANGE = "crew.control"
TASK_QUEUE_PREFIX = "crew.tasks."
JSON = "application/json"
TASK_QUEUE_ARGUMENTS = {
    "x-max-priority": 10,
    "x-dead-letter-exchange": EXPIRED_EXCHANGE,
    "x-queue-type": "classic",
}


@dataclass
class Outcome:
    """What came back for one call: a delivery on the reply queue, or a basic.return."""

    kind: str  # "delivery" or "returned"
    method: Any
    properties: pika.BasicProperties
    body: bytes

    def json(self) -> Any:
        assert self.properties.content_type == JSON
        return json.loads(self.body)


class ForeignCaller:
    """The caller side of section 2.3 and 3 of the protocol document, with BlockingConnection."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(EXPIRED_EXCHANGE, "headers", durable=True)
        self.channel.exchange_declare(CONTROL_EXCHANGE, "fanout", durable=True)
        declared = self.channel.queue_declare("", exclusive=True, auto_delete=True)
        self.reply_queue: str = declared.method.queue
        self.channel.queue_bind(self.reply_queue, EXPIRED_EXCHANGE, routing_key="",
                                arguments={"x-match": "all", "crew-client": self.reply_queue})
        self.outcomes: dict[str, list[Outcome]] = {}
        self.channel.add_on_return_callback(self._on_return)
        self.channel.basic_consume(self.reply_queue, self._on_delivery, auto_ack=True,
                                   exclusive=True)

    def _on_delivery(self, _ch: Any, method: Any, props: pika.BasicProperties,
                     body: bytes) -> None:
        self.outcomes.setdefault(props.correlation_id, []).append(
            Outcome("delivery", method, props, body))

    def _on_return(self, _ch: Any, method: Any, props: pika.BasicProperties,
                   body: bytes) -> None:
        self.outcomes.setdefault(props.correlation_id, []).append(
            Outcome("returned", method, props, body))

    def call(self, task: str, data: Any, *, expiration_ms: int = 10_000,
             deadline_ms: int | None = None, headers: dict[str, Any] | None = None,
             priority: int = 0) -> tuple[str, int]:
        """Publish a JSON call; return its correlation id and crew-deadline."""
        correlation_id = uuid.uuid4().hex
        if deadline_ms is None:
            deadline_ms = time.time_ns() // 1_000_000 + expiration_ms
        all_headers = dict(headers or {})
        all_headers.update({"crew-deadline": deadline_ms, "crew-client": self.reply_queue,
                            "crew-task": task})
        properties = pika.BasicProperties(
            content_type=JSON, correlation_id=correlation_id, reply_to=self.reply_queue,
            priority=priority, expiration=str(expiration_ms), delivery_mode=2,
            headers=all_headers)
        self.channel.basic_publish("", TASK_QUEUE_PREFIX + task, json.dumps(data).encode(),
                                   properties, mandatory=True)
        return correlation_id, deadline_ms

    def cancel(self, correlation_id: str, deadline_ms: int) -> None:
        self.channel.basic_publish(CONTROL_EXCHANGE, "", b"", pika.BasicProperties(
            type="crew.cancel", correlation_id=correlation_id, reply_to=self.reply_queue,
            headers={"crew-deadline": deadline_ms}, delivery_mode=1))

    def wait(self, correlation_id: str, timeout: float = 10.0) -> Outcome | None:
        """The first outcome of the call, or None if nothing came within ``timeout``."""
        end = time.monotonic() + timeout
        while correlation_id not in self.outcomes:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return None
            # Returns as soon as the broker sent something (a delivery, a return), or at
            # the time limit: this waits on the socket, it does not poll.
            self.connection.process_data_events(time_limit=remaining)
        return self.outcomes[correlation_id][0]

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()  # the reply queue is exclusive: it goes with it


@pytest.fixture
def caller(broker_url: str) -> Iterator[ForeignCaller]:
    c = ForeignCaller(broker_url)
    yield c
    c.close()


def _explode(x: Any) -> None:
    raise ValueError(f"bad {x!r}")


def test_json_call_gets_an_ok_reply_with_user_headers(make_worker, caller, uid):
    task = f"echo.{uid}"
    make_worker({task: lambda x: {"got": x}})
    cid, _ = caller.call(task, {"a": [1, "é"]}, headers={"trace-id": "abc"}, priority=200)
    reply = caller.wait(cid)
    assert reply is not None and reply.kind == "delivery"
    assert reply.method.exchange == ""
    assert reply.properties.correlation_id == cid
    assert reply.properties.content_type == JSON
    assert reply.properties.headers == {"trace-id": "abc", "crew-status": "ok"}
    assert reply.json() == {"got": {"a": [1, "é"]}}


@pytest.mark.parametrize("crew_gzip, result, compressed", [
    (None, "x" * 100_000, True),       # absent: automatic, and 100 kB of text pays
    (None, "small", False),
    (False, "x" * 100_000, False),     # the caller's choice holds for the reply
    (True, "small", True),
])
def test_crew_gzip_header_decides_how_the_reply_is_compressed(make_worker, caller, uid,
                                                              crew_gzip, result, compressed):
    task = f"text.{uid}"
    make_worker({task: lambda _: result})
    headers = {} if crew_gzip is None else {"crew-gzip": crew_gzip}
    cid, _ = caller.call(task, None, headers=headers)
    reply = caller.wait(cid)
    assert reply is not None and reply.properties.headers == {"crew-status": "ok"}
    assert reply.properties.content_encoding == ("gzip" if compressed else None)
    body = gzip.decompress(reply.body) if compressed else reply.body
    assert json.loads(body) == result


def test_crew_gzip_that_is_not_a_boolean_is_refused(make_worker, caller, uid):
    task = f"echo.{uid}"
    make_worker({task: lambda x: x})
    cid, _ = caller.call(task, None, headers={"crew-gzip": "no"})
    reply = caller.wait(cid)
    assert reply is not None and reply.properties.headers["crew-status"] == "error"
    assert reply.json()["type"] == "CodecError"
    assert "crew-gzip must be a boolean" in reply.json()["message"]


def test_task_exception_comes_back_as_an_error_envelope(make_worker, caller, uid):
    task = f"boom.{uid}"
    make_worker({task: _explode})
    cid, _ = caller.call(task, [1])
    reply = caller.wait(cid)
    assert reply is not None and reply.method.exchange == ""
    assert reply.properties.headers["crew-status"] == "error"
    envelope = reply.json()
    assert set(envelope) == {"type", "message", "traceback"}
    assert envelope["type"] == "ValueError"
    assert envelope["message"] == "bad [1]"
    assert "Traceback" in envelope["traceback"] and "_explode" in envelope["traceback"]


def test_malformed_json_body_is_answered_with_decode_error(make_worker, caller, uid):
    task = f"echo.{uid}"
    make_worker({task: lambda x: x})
    correlation_id = uuid.uuid4().hex
    caller.channel.basic_publish("", TASK_QUEUE_PREFIX + task, b"{not json",
                                 pika.BasicProperties(
                                     content_type=JSON, correlation_id=correlation_id,
                                     reply_to=caller.reply_queue, expiration="10000",
                                     headers={"crew-client": caller.reply_queue}),
                                 mandatory=True)
    reply = caller.wait(correlation_id)
    assert reply is not None
    assert reply.properties.headers["crew-status"] == "error"
    assert reply.json()["type"] == "DecodeError"


def test_call_past_its_crew_deadline_is_answered_expired(make_worker, caller, uid):
    task = f"echo.{uid}"
    ran = threading.Event()

    def echo(x: Any) -> Any:
        ran.set()
        return x

    make_worker({task: echo})
    # The broker still delivers it (expiration 10 s), but crew-deadline has passed.
    past = time.time_ns() // 1_000_000 - 1000
    cid, _ = caller.call(task, 1, deadline_ms=past)
    reply = caller.wait(cid)
    assert reply is not None and reply.method.exchange == ""
    assert reply.properties.headers["crew-status"] == "expired"
    assert reply.json()["type"] == "ExpirationError"
    assert not ran.is_set()


def test_call_to_unknown_task_comes_back_as_basic_return_312(caller, uid):
    cid, _ = caller.call(f"nobody.serves.this.{uid}", None)
    outcome = caller.wait(cid)
    assert outcome is not None and outcome.kind == "returned"
    assert outcome.method.reply_code == 312
    assert outcome.method.routing_key == f"{TASK_QUEUE_PREFIX}nobody.serves.this.{uid}"


def test_call_expired_in_a_queue_without_consumer_comes_back_as_dead_letter(caller, uid):
    task = f"lonely.{uid}"
    queue = TASK_QUEUE_PREFIX + task
    caller.channel.queue_declare(queue, durable=True, arguments=TASK_QUEUE_ARGUMENTS)
    try:
        cid, deadline_ms = caller.call(task, {"n": 1}, expiration_ms=200,
                                       headers={"trace-id": "t1"})
        letter = caller.wait(cid, timeout=10)
        assert letter is not None and letter.kind == "delivery"
        assert letter.method.exchange == EXPIRED_EXCHANGE
        assert letter.method.routing_key == queue
        assert letter.properties.reply_to == caller.reply_queue
        assert letter.properties.expiration is None
        assert json.loads(letter.body) == {"n": 1}  # the call itself, not a result
        headers = letter.properties.headers
        assert headers["crew-deadline"] == deadline_ms
        assert headers["crew-client"] == caller.reply_queue
        assert headers["trace-id"] == "t1"
        death = headers["x-death"][0]
        assert death["reason"] == "expired"
        assert death["queue"] == queue
        assert death["original-expiration"] == "200"
    finally:
        caller.channel.queue_delete(queue)


def test_redeclaring_a_task_queue_with_other_arguments_fails_406(make_worker, broker_url, uid):
    task = f"echo.{uid}"
    make_worker({task: lambda x: x})
    other = ForeignCaller(broker_url)
    try:
        # The worker's own arguments are accepted again...
        other.channel.queue_declare(TASK_QUEUE_PREFIX + task, durable=True,
                                    arguments=TASK_QUEUE_ARGUMENTS)
        # ...another maximum priority is not, and costs the channel.
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            other.channel.queue_declare(TASK_QUEUE_PREFIX + task, durable=True,
                                        arguments={**TASK_QUEUE_ARGUMENTS, "x-max-priority": 5})
        assert info.value.reply_code == 406
    finally:
        other.close()


def test_cancel_messages_stop_a_running_call_and_a_queued_one_without_replies(
        make_worker, caller, uid):
    task = f"spin.{uid}"
    seen: list[str] = []
    started, interrupted = threading.Event(), threading.Event()

    def spin_or_echo(x: str) -> str:
        seen.append(x)
        if x != "spin":
            return x
        started.set()
        try:
            end = time.monotonic() + 30
            while time.monotonic() < end:  # pure Python, so the worker can interrupt it
                pass
            return "finished"
        except BaseException:
            interrupted.set()
            raise

    # One slot: while "spin" runs, every slot of the worker is busy and "queued" waits.
    make_worker({task: spin_or_echo}, concurrency=1)
    running, running_deadline = caller.call(task, "spin", expiration_ms=20_000)
    assert started.wait(10)
    queued, queued_deadline = caller.call(task, "queued", expiration_ms=20_000)
    caller.cancel(queued, queued_deadline)
    caller.cancel(running, running_deadline)
    assert interrupted.wait(5), "the cancelled job was not interrupted"
    # Calls are served in order, so once this one is answered the queued one was handled.
    after, _ = caller.call(task, "after")
    reply = caller.wait(after)
    assert reply is not None and reply.json() == "after"
    assert seen == ["spin", "after"]  # the queued call never started
    assert running not in caller.outcomes and queued not in caller.outcomes


def _raw_call(caller: ForeignCaller, task: str, body: bytes, content_type: str) -> str:
    correlation_id = uuid.uuid4().hex
    caller.channel.basic_publish("", TASK_QUEUE_PREFIX + task, body, pika.BasicProperties(
        content_type=content_type, correlation_id=correlation_id, reply_to=caller.reply_queue,
        expiration="3000", headers={"crew-deadline": time.time_ns() // 1_000_000 + 3000,
                                    "crew-client": caller.reply_queue}), mandatory=True)
    return correlation_id


CANCEL_STREAM_ARGUMENTS = {
    "x-queue-type": "stream",
    "x-max-age": "1800s",
    "x-max-length-bytes": 33554432,
    "x-stream-max-segment-size-bytes": 1048576,
}


def test_a_worker_of_another_language_reads_notices_sent_before_it_started(
        make_worker, caller, broker_url, uid):
    # Section 7's recipe for a worker of your own, with plain pika: a notice sent while it
    # was not running is read before the marker it writes comes back.
    make_worker({f"echo.{uid}": lambda x: x})  # a crew worker has declared the stream
    caller.cancel(f"early.{uid}", time.time_ns() // 1_000_000 + 60_000)
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1000, global_qos=False)
        channel.queue_declare("crew.cancels", durable=True, arguments=CANCEL_STREAM_ARGUMENTS)
        channel.queue_bind("crew.cancels", CONTROL_EXCHANGE, routing_key="")
        since = datetime.fromtimestamp(time.time() - 25 * 60, timezone.utc)
        read: list[tuple[str, str]] = []
        marker = f"foreign.{uid}"

        def on_notice(ch: Any, method: Any, props: pika.BasicProperties, _body: bytes) -> None:
            ch.basic_ack(method.delivery_tag)
            read.append((props.type, props.correlation_id))
            if props.type == "crew.marker" and props.correlation_id == marker:
                ch.stop_consuming()

        channel.basic_consume("crew.cancels", on_notice,
                              arguments={"x-stream-offset": since})
        channel.basic_publish("", "crew.cancels", b"", pika.BasicProperties(
            type="crew.marker", correlation_id=marker, delivery_mode=1))
        timer = connection.call_later(10, channel.stop_consuming)
        channel.start_consuming()
        connection.remove_timeout(timer)
    finally:
        connection.close()
    assert ("crew.marker", marker) in read, "the marker did not come back within 10 s"
    assert read.index(("crew.cancel", f"early.{uid}")) < read.index(("crew.marker", marker))


def test_x_msgpack_call_gets_a_reply(make_worker, caller, uid):
    task = f"echo.{uid}"
    make_worker({task: lambda x: {"got": x}})
    cid = _raw_call(caller, task, b"\x01", "application/x-msgpack")  # msgpack for 1
    reply = caller.wait(cid, timeout=5)
    assert reply is not None and reply.properties.headers["crew-status"] == "ok"


def test_unknown_content_type_is_refused_with_decode_error(make_worker, caller, uid):
    task = f"echo.{uid}"
    ran = threading.Event()

    def echo(x: Any) -> Any:
        ran.set()
        return x

    make_worker({task: echo})
    cid = _raw_call(caller, task, b"\x01", "text/plain")
    reply = caller.wait(cid)
    assert reply is not None and reply.properties.headers["crew-status"] == "error"
    assert not ran.is_set()
