"""Hostile input: whatever anyone who may publish to the vhost can send a worker or a client.

Each hostile message is published with plain pika, as an attacker would, to a running crew
worker's task queue or straight to a crew client's reply queue. For each the tests check the
promise of issue 6: a clear error reply where there is a reply address, exactly one log line,
the message gone from the queue (neither ready nor unacknowledged, so never redelivered), the
task not run, and the worker still serving a normal call afterwards.

Queue counts come from ``rabbitmqctl list_queues``, the only view that shows unacknowledged
messages (``conftest.broker_url`` already requires it unless ``$CREW_TEST_URL`` names
another broker; then ``$CREW_TEST_RABBITMQCTL`` says how to reach that broker's node).
"""

from __future__ import annotations

import asyncio
import decimal
import gzip
import logging
import pickle
import struct
import threading
import time
import tracemalloc
import uuid
import zlib
from typing import Any, Iterator

import msgpack
import pika
import pytest

from crew import RemoteError, protocol
from crew.worker import Worker, serve_in_thread
from tests.support.hostile import (
    JSON,
    MSGPACK,
    RawField,
    RawPublisher,
    assert_queue_empty,
    crew_log_lines,
    decode_reply,
    raw_fields,
)
from tests.support.bombs import MiB
from tests.support.tasks import holding


class MakesAFile:
    """Unpickling this opens (creates) ``path``: stands for any code an attacker would run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return open, (self.path, "w")


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(broker_url: str) -> Iterator[dict[str, Any]]:
    """One worker for the module, serving ``hostile.echo.<random>`` with one job slot (so
    the prefetch is 1 and a call is delivered only once the one before it is acked).
    ``runs`` records every argument the task was called with."""
    task = f"hostile.echo.{uuid.uuid4().hex[:8]}"
    runs: list[Any] = []

    def echo(x: Any) -> Any:
        runs.append(x)
        return {"got": x}

    worker = Worker({task: echo}, broker=broker_url, concurrency=1, grace=1.0)
    thread = serve_in_thread(worker)
    yield {"task": task, "runs": runs, "worker": worker}
    worker.request_stop(grace=0)
    thread.join(30)


@pytest.fixture
def raw(broker_url: str) -> Iterator[RawPublisher]:
    publisher = RawPublisher(broker_url)
    yield publisher
    publisher.close()


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data)


# --- calls that get an error reply -------------------------------------------------------

_NOW_MS = time.time_ns() // 1_000_000


# (id, body, properties, envelope type)
ERROR_REPLY_CASES = [
    ("msgpack-reserved-byte", b"\xc1", {"content_type": MSGPACK}, "DecodeError"),
    ("msgpack-truncated-array", b"\x92\x01", {"content_type": MSGPACK}, "DecodeError"),
    ("msgpack-trailing-bytes", b"\x01\x02", {"content_type": MSGPACK}, "DecodeError"),
    ("msgpack-str-not-utf8", b"\xa2\xff\xfe", {"content_type": MSGPACK}, "DecodeError"),
    ("msgpack-ext-type", msgpack.packb(msgpack.ExtType(42, b"obj")),
     {"content_type": MSGPACK}, "DecodeError"),
    ("msgpack-int-map-key", msgpack.packb({1: "a"}), {"content_type": MSGPACK}, "DecodeError"),
    ("msgpack-too-deep", b"\x91" * 100_000 + b"\xc0", {"content_type": MSGPACK},
     "DecodeError"),
    ("json-malformed", b"{not json", {}, "DecodeError"),
    ("json-nan", b"[NaN]", {}, "DecodeError"),
    ("json-overflowing-float", b"[1e400]", {}, "DecodeError"),
    ("json-too-deep", b"[" * 100_000, {}, "DecodeError"),
    ("empty-body", b"", {}, "DecodeError"),
    ("content-type-unknown", b"1", {"content_type": "text/plain"}, "DecodeError"),
    ("content-type-missing", b"1", {"content_type": None}, "DecodeError"),
    ("content-type-not-utf8", b"1", {"content_type": b"\xff\xfe"}, "DecodeError"),
    ("gzip-corrupt", b"not gzip at all", {"content_encoding": "gzip"}, "DecodeError"),
    ("gzip-truncated", _gzip(b"[1, 2, 3]" * 100)[:40], {"content_encoding": "gzip"},
     "DecodeError"),
    ("gzip-trailing-bytes", _gzip(b"1") + b"trailing", {"content_encoding": "gzip"},
     "DecodeError"),
    ("encoding-unknown", b"1", {"content_encoding": "br"}, "DecodeError"),
    ("encoding-zlib-called-gzip", zlib.compress(b"1"), {"content_encoding": "gzip"},
     "DecodeError"),
    ("encoding-not-utf8", b"1", {"content_encoding": b"\xff"}, "DecodeError"),
    ("deadline-string", b"1", {"headers": {"crew-deadline": "soon"}}, "CodecError"),
    ("deadline-decimal", b"1", {"headers": {"crew-deadline": decimal.Decimal("1.5")}},
     "CodecError"),
    ("deadline-bool", b"1", {"headers": {"crew-deadline": True}}, "CodecError"),
    ("deadline-bytes", b"1", {"headers": {"crew-deadline": str(_NOW_MS).encode()}},
     "CodecError"),
    ("deadline-table", b"1", {"headers": {"crew-deadline": {"ms": _NOW_MS}}}, "CodecError"),
    ("task-another", b"1", {"headers": {"crew-task": "another.task"}}, "CodecError"),
    ("task-not-a-string", b"1", {"headers": {"crew-task": 5}}, "CodecError"),
    ("header-name-not-utf8", b"1", {"headers": {b"\xff\xfe": 1}}, "CodecError"),
]


@pytest.mark.parametrize("body, properties, error_type",
                         [case[1:] for case in ERROR_REPLY_CASES],
                         ids=[case[0] for case in ERROR_REPLY_CASES])
def test_bad_call_gets_one_error_reply_one_log_line_and_leaves_nothing(
        served, raw, broker_url, caplog, body, properties, error_type):
    caplog.set_level(logging.DEBUG, logger="crew")
    runs_before = len(served["runs"])
    cid = raw.call(served["task"], body, **properties)
    reply = raw.wait(cid)
    assert reply is not None, "no reply to a call that has a reply address"
    status, envelope = decode_reply(reply)
    assert status == "error"
    assert envelope["type"] == error_type
    assert envelope["message"] and envelope["traceback"] == ""
    assert len(served["runs"]) == runs_before, "the task ran on a call it should refuse"
    raw.normal_call(served["task"])
    lines = crew_log_lines(caplog)
    assert len(lines) == 1 and cid in lines[0], lines
    assert_queue_empty(broker_url, protocol.task_queue(served["task"]))


@pytest.mark.parametrize("content_type", ["application/x-python-pickle",
                                          "application/python-pickle"])
def test_pickled_call_is_refused_and_never_unpickled(served, raw, broker_url, caplog, tmp_path,
                                                     content_type):
    caplog.set_level(logging.DEBUG, logger="crew")
    # The payload is live: unpickling it here creates its file.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(MakesAFile(str(control))))
    assert control.exists()
    target = tmp_path / "pwned"
    cid = raw.call(served["task"], pickle.dumps(MakesAFile(str(target))),
                   content_type=content_type)
    reply = raw.wait(cid)
    assert reply is not None
    status, envelope = decode_reply(reply)
    assert (status, envelope["type"]) == ("error", "DecodeError")
    assert content_type in envelope["message"]
    raw.normal_call(served["task"])
    assert not target.exists()
    assert len(crew_log_lines(caplog)) == 1
    assert_queue_empty(broker_url, protocol.task_queue(served["task"]))


def test_body_over_the_size_limit_is_refused(served, raw, broker_url, caplog):
    """A body one byte over crew's limit is refused by the first limit it meets. RabbitMQ
    4.x's default ``max_message_size`` is crew's 16 MiB: the broker closes the publisher's
    channel (406) and the worker never sees the call. RabbitMQ 3.x's is 128 MiB: the call
    is delivered and the worker refuses it with an error reply. The broker's answer to the
    publish says which case this is; either way the worker serves on and the queue is empty.
    """
    caplog.set_level(logging.DEBUG, logger="crew")
    runs_before = len(served["runs"])
    version = raw.connection._impl.server_properties.get("version")
    oversized = b"\x00" * (protocol.MAX_BODY_BYTES + 1)
    try:
        cid = raw.call(served["task"], oversized, content_type=MSGPACK)
    except pika.exceptions.ChannelClosedByBroker as exc:
        # The broker's limit came first (RabbitMQ 4.x by default).
        assert exc.reply_code == 406, f"RabbitMQ {version}: {exc!r}"
        assert "larger than configured max size" in exc.reply_text, f"RabbitMQ {version}"
        checker = RawPublisher(broker_url)  # raw's channel is closed
        try:
            checker.normal_call(served["task"])
        finally:
            checker.close()
        assert crew_log_lines(caplog) == []
    else:
        # The broker took it (RabbitMQ 3.x by default): crew's limit refuses it.
        reply = raw.wait(cid, timeout=30)
        assert reply is not None, f"RabbitMQ {version} took the call but no reply came"
        status, envelope = decode_reply(reply)
        assert (status, envelope["type"]) == ("error", "MessageTooLargeError")
        assert "max_message_size" in envelope["message"]
        raw.normal_call(served["task"])
        lines = crew_log_lines(caplog)
        assert len(lines) == 1 and cid in lines[0], lines
    assert len(served["runs"]) == runs_before + 1, "the task ran on the oversized call"
    assert_queue_empty(broker_url, protocol.task_queue(served["task"]))


def test_gzip_bomb_sent_to_a_worker_gets_an_error_and_bounded_memory(served, raw, broker_url,
                                                                     caplog, bomb):
    caplog.set_level(logging.DEBUG, logger="crew")
    limit = protocol.MAX_DECOMPRESSED_BYTES
    tracemalloc.start()  # every thread of this process, the worker's included
    try:
        cid = raw.call(served["task"], bomb, content_type=MSGPACK, content_encoding="gzip")
        reply = raw.wait(cid, timeout=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply is not None
    status, envelope = decode_reply(reply)
    assert (status, envelope["type"]) == ("error", "MessageTooLargeError")
    assert peak < limit + limit // 8 + 16 * MiB, f"peak {peak / MiB:.1f} MiB"
    raw.normal_call(served["task"])
    assert len(crew_log_lines(caplog)) == 1
    assert_queue_empty(broker_url, protocol.task_queue(served["task"]))


# --- calls with no one to tell ---------------------------------------------------------


@pytest.mark.parametrize("properties", [
    {"reply_to": None}, {"reply_to": ""}, {"correlation_id": None}, {"correlation_id": ""},
], ids=["no-reply-to", "empty-reply-to", "no-correlation-id", "empty-correlation-id"])
def test_call_without_reply_address_is_acked_and_logged_once(served, raw, broker_url, caplog,
                                                             properties):
    caplog.set_level(logging.DEBUG, logger="crew")
    runs_before = len(served["runs"])
    raw.call(served["task"], b'"no one to tell"', **properties)
    # One job slot: the normal call is delivered only after the bad one was handled, and
    # a reply to it, had there been one, would have arrived first.
    raw.normal_call(served["task"])
    assert len(raw.replies) == 1  # the normal call's: nothing came for the bad one
    assert len(served["runs"]) == runs_before + 1  # the normal call only
    assert len(crew_log_lines(caplog)) == 1
    assert_queue_empty(broker_url, protocol.task_queue(served["task"]))


def test_reply_to_a_queue_that_does_not_exist_is_logged_once(served, raw, broker_url, caplog):
    caplog.set_level(logging.DEBUG, logger="crew")
    cid = raw.call(served["task"], b'"x"', reply_to=f"no.such.queue.{uuid.uuid4().hex}")
    raw.normal_call(served["task"])
    lines = crew_log_lines(caplog)
    assert len(lines) == 1 and cid in lines[0] and "gone" in lines[0], lines
    assert_queue_empty(broker_url, protocol.task_queue(served["task"]))


def test_correlation_id_that_is_not_utf8_is_answered_byte_for_byte(served, raw, broker_url,
                                                                   caplog):
    caplog.set_level(logging.DEBUG, logger="crew")
    cid = b"\xff\xfe" + uuid.uuid4().hex.encode()  # pika hands it over as bytes
    raw.call(served["task"], b'"odd id"', correlation_id=cid)
    reply = raw.wait(cid)
    assert reply is not None and decode_reply(reply) == ("ok", {"got": "odd id"})
    raw.normal_call(served["task"])
    assert crew_log_lines(caplog) == []
    assert_queue_empty(broker_url, protocol.task_queue(served["task"]))


def test_copy_of_a_running_call_is_dropped_not_answered(make_worker, raw, broker_url, caplog,
                                                        uid):
    caplog.set_level(logging.DEBUG, logger="crew")
    task = f"hold.{uid}"
    started, release = threading.Event(), threading.Event()

    def hold(x: Any) -> Any:
        if x == "hold":
            started.set()
            release.wait(20)
        return {"got": x}

    make_worker({task: hold}, concurrency=2)
    cid = raw.call(task, b'"hold"')
    assert started.wait(10)
    raw.call(task, b'"forged copy"', correlation_id=cid)  # same reply_to, same id
    raw.normal_call(task)  # the copy was handled before this was delivered
    release.set()
    assert raw.wait(cid) is not None
    raw.normal_call(task)  # anything more for cid would have come before this
    assert [decode_reply(r) for r in raw.replies[cid]] == [("ok", {"got": "hold"})]
    lines = crew_log_lines(caplog)
    assert len(lines) == 1 and "copy" in lines[0], lines
    assert_queue_empty(broker_url, protocol.task_queue(task))


def test_header_timestamp_out_of_range_does_not_kill_the_worker(make_worker, raw, caplog, uid):
    task = f"echo.{uid}"
    make_worker({task: lambda x: {"got": x}})
    timestamp = RawField(b"T" + struct.pack(">Q", 2**62))  # valid AMQP, year > 9999
    with raw_fields():
        cid = raw.call(task, b'"x"', headers={"when": timestamp})
    try:
        reply = raw.wait(cid, timeout=5)
        assert reply is not None and decode_reply(reply)[0] in ("ok", "error")
        raw.normal_call(task)
    finally:
        raw.channel.queue_purge(protocol.task_queue(task))


@pytest.mark.gen_test(timeout=30)
async def test_task_exception_that_cannot_be_encoded_still_gets_an_error_reply(
        make_worker, make_client, uid):
    """A message with a lone surrogate cannot be written in UTF-8 (msgpack or JSON): the
    worker sends it escaped rather than no reply, for sync and async tasks alike."""
    def sync_task(_: Any) -> None:
        raise ValueError("bad \udcff byte")

    async def async_task(_: Any) -> None:
        raise ValueError("bad \udcff byte")

    make_worker({f"sync.{uid}": sync_task, f"async.{uid}": async_task}, concurrency=2)
    for content_type in (MSGPACK, JSON):
        client = await make_client(content_type=content_type)
        for task in (f"sync.{uid}", f"async.{uid}"):
            with pytest.raises(RemoteError) as info:
                await client.call(task, expiration=10)
            assert info.value.type == "ValueError"
            assert info.value.message == "bad \\udcff byte"


# --- the client's reply queue ------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_forged_replies_are_dropped_and_logged_and_the_real_one_wins(
        make_worker, client, broker_url, caplog, uid):
    caplog.set_level(logging.DEBUG, logger="crew")
    task = f"hold.{uid}"
    started, release = threading.Event(), threading.Event()
    hold = holding(started, release)
    make_worker({task: lambda x: {"true": hold(x)}})
    loop = asyncio.get_running_loop()
    call = asyncio.ensure_future(client.call(task, "real"))
    assert await loop.run_in_executor(None, started.wait, 10)
    (real_cid,) = client._pending
    queue = client._reply_queue
    ok = msgpack.packb({"forged": True})
    forged = [  # (routing key, exchange, body, properties)
        (queue, "", ok, {"correlation_id": uuid.uuid4().hex,
                         "content_type": MSGPACK, "headers": {"crew-status": "ok"}}),
        (queue, "", b"\xc1\xc1", {"correlation_id": uuid.uuid4().hex,
                                  "content_type": MSGPACK, "headers": {"crew-status": "ok"}}),
        (queue, "", ok, {"correlation_id": uuid.uuid4().hex, "content_type": MSGPACK,
                         "headers": {"crew-status": "surrender"}}),
        (queue, "", ok, {"correlation_id": uuid.uuid4().hex, "content_type": "text/evil",
                         "headers": {"crew-status": 7}}),
        (queue, "", ok, {"content_type": MSGPACK, "headers": {"crew-status": "ok"}}),
        (queue, "", ok, {"correlation_id": b"\xff" + uuid.uuid4().hex.encode(),
                         "content_type": MSGPACK}),
        (queue, "", ok, {"correlation_id": uuid.uuid4().hex, "content_type": MSGPACK,
                         "headers": {b"\xff": 1, "crew-status": "ok"}}),
        # A forged "dead letter" through crew.expired, routed by the crew-client header.
        ("", protocol.EXPIRED_EXCHANGE, ok, {"correlation_id": uuid.uuid4().hex,
                                             "headers": {"crew-client": queue}}),
    ]
    publisher = RawPublisher(broker_url)
    try:
        for routing_key, exchange, body, properties in forged:
            publisher.send(routing_key, body, exchange=exchange, **properties)
        release.set()  # the true reply is queued behind every forged message
        assert await call == {"true": "real"}
        assert client._pending == {}
        # A duplicate of the true reply, after the call ended; then a second call, whose
        # reply is queued behind the duplicate.
        publisher.send(queue, msgpack.packb({"true": "duplicate"}), correlation_id=real_cid,
                       content_type=MSGPACK, headers={"crew-status": "ok"})
        assert await client.call(task, "again") == {"true": "again"}
    finally:
        publisher.close()
    assert client._pending == {}
    dropped = crew_log_lines(caplog, logging.INFO, "crew.client")
    assert len(dropped) == len(forged) + 1, dropped
    assert sum(real_cid in line for line in dropped) == 1


@pytest.mark.gen_test(timeout=30)
async def test_malformed_pubsub_message_is_dropped_and_logged_once(client, broker_url, caplog,
                                                                   uid):
    caplog.set_level(logging.DEBUG, logger="crew")
    channel = f"news.{uid}"
    got: list[Any] = []
    done = asyncio.Event()

    def on_news(data: Any) -> None:
        got.append(data)
        done.set()

    await client.subscribe(channel, on_news)
    publisher = RawPublisher(broker_url)
    try:
        publisher.send(channel, b"\xc1", exchange=protocol.PUBSUB_EXCHANGE,
                       content_type=MSGPACK)
        publisher.send(channel, b"1", exchange=protocol.PUBSUB_EXCHANGE,
                       content_type="application/x-python-pickle")
        publisher.send(channel, msgpack.packb("fine"), exchange=protocol.PUBSUB_EXCHANGE,
                       content_type=MSGPACK)
    finally:
        publisher.close()
    await asyncio.wait_for(done.wait(), 10)
    assert got == ["fine"]
    assert len(crew_log_lines(caplog)) == 2


@pytest.mark.gen_test(timeout=30)
async def test_forged_reply_with_bad_timestamp_header_does_not_cut_the_client(
        make_worker, client, broker_url, uid):
    task = f"echo.{uid}"
    make_worker({task: lambda x: x})
    publisher = RawPublisher(broker_url)
    try:
        with raw_fields():
            publisher.send(client._reply_queue, b"\xc0", correlation_id="forged",
                           content_type=MSGPACK,
                           headers={"when": RawField(b"T" + struct.pack(">Q", 2**62))})
    finally:
        publisher.close()
    assert await client.call(task, 1, expiration=5) == 1
