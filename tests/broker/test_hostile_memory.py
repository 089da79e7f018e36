"""Hostile input, memory: bodies built to cost a worker or a client far more memory than
their size (issue 21).

A worker runs as a child process at concurrency 4 with the default memory ceiling, so that
its peak RSS (VmHWM in /proc) is its own. Twenty 16 MiB calls of tiny containers, deep
nesting and wide maps (msgpack and JSON), and gzip bodies that inflate to the limit, are
published with plain pika. Each gets its error reply, or is dropped with one log line when
it has no reply address; the worker's peak stays under the bound the README states; it then
answers a normal call, and no message is left in its queue. The same bodies sent as replies
and pubsub messages to a client end a call with DecodeError or are dropped with one log line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
import threading
import zlib
from typing import Any, Iterator

import pytest

from crew import CodecError, protocol
from crew.worker import DEFAULT_MAX_MEMORY
from tests.support.hostile import (
    JSON,
    MSGPACK,
    RawPublisher,
    assert_queue_empty,
    crew_log_lines,
    decode_reply,
)
from tests.support.processes import spawn_python

MiB = 1024 * 1024
WIRE = protocol.MAX_BODY_BYTES
#: What the README promises a worker holds at most with the default settings: its memory
#: ceiling, the undecoded bodies of the calls in its prefetch (one per job slot), and the
#: process's own baseline (interpreter, pika, crew, job threads: about 30 MiB at start),
#: with a margin.
CONCURRENCY = 4
DOCUMENTED_BOUND = DEFAULT_MAX_MEMORY + CONCURRENCY * WIRE + 128 * MiB

WORKER = """
import asyncio, logging, sys
from crew.worker import Worker
logging.basicConfig(level=logging.WARNING, stream=sys.stdout,
                    format="LOG %(levelname)s %(name)s %(message)s")

def size(value):
    return {"got": value} if isinstance(value, str) else {"len": len(value)}

async def main():
    worker = Worker({sys.argv[1]: size}, concurrency=int(sys.argv[2]), grace=1.0)
    await worker.start()
    print("READY", flush=True)
    await worker._serve_started()

asyncio.run(main())
"""


def _msgpack_array(item: bytes, size: int = WIRE) -> bytes:
    """A msgpack array32 of copies of ``item``, ``size`` bytes in all (at most)."""
    count = (size - 5) // len(item)
    return b"\xdd" + struct.pack(">I", count) + item * count


def _json_array(item: bytes, size: int = WIRE) -> bytes:
    count = (size - 2) // (len(item) + 1)
    return b"[" + b",".join([item] * count) + b"]"


def _gzip(data: bytes, declared: int | None = None) -> bytes:
    """gzip of ``data``; ``declared`` replaces the size its trailer states."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = bytearray(compressor.compress(data) + compressor.flush())
    if declared is not None:
        body[-4:] = struct.pack("<I", declared)
    return bytes(body)


def hostile_bodies() -> list[tuple[str, bytes, dict[str, Any]]]:
    """(name, body, properties): twenty crafted calls; what a call leaves out of the
    properties takes the values of a well-formed JSON call (RawPublisher.call)."""
    mp, js = {"content_type": MSGPACK}, {"content_type": JSON}
    gz = {"content_encoding": "gzip"}
    limit = protocol.MAX_DECOMPRESSED_BYTES
    wide_map = b"\xdf\xff\xff\xff\xff" + b"\xa0\xc0" * ((WIRE - 5) // 2)  # claims 2**32-1
    return [
        ("msgpack empty arrays", _msgpack_array(b"\x90"), mp),
        ("msgpack empty maps", _msgpack_array(b"\x80"), mp),
        ("msgpack lists of one", _msgpack_array(b"\x91\x00"), mp),
        ("msgpack nested lists", _msgpack_array(b"\x91\x91\x90"), mp),
        ("msgpack small negative ints", _msgpack_array(b"\xfa"), mp),
        ("msgpack nested deep", b"\x91" * (WIRE - 1) + b"\xc0", mp),
        ("msgpack wide map", wide_map, mp),
        ("msgpack maps of empty maps", _msgpack_array(b"\x81\xa0\x80"), mp),
        ("JSON empty arrays", _json_array(b"[]"), js),
        ("JSON empty objects", _json_array(b"{}"), js),
        ("JSON nested lists", _json_array(b"[[[]]]"), js),
        ("JSON one-entry objects", _json_array(b'{"":0}'), js),
        ("JSON wide object of small objects",
         b"{" + b",".join([b'"":{"":0}'] * ((WIRE - 2) // 10)) + b"}", js),
        ("JSON nested deep", b"[" * WIRE, js),
        ("gzip msgpack arrays to the limit", _gzip(_msgpack_array(b"\x90", limit)), {**mp, **gz}),
        ("gzip JSON arrays to the limit", _gzip(_json_array(b"[]", limit)), {**js, **gz}),
        ("gzip lying about its size", _gzip(_msgpack_array(b"\x90", limit), MiB), {**mp, **gz}),
        ("gzip msgpack arrays, 16 MiB", _gzip(_msgpack_array(b"\x90")), {**mp, **gz}),
        ("no reply_to", _msgpack_array(b"\x90"), {**mp, "reply_to": None}),
        ("no correlation_id", _json_array(b"[]"), {**js, "correlation_id": None}),
    ]


def _vm_hwm(pid: int) -> int:
    """The peak resident set size of process ``pid``, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.fixture
def worker_process(broker_url: str, uid: str) -> Iterator[tuple[Any, str]]:
    """A worker in a child process serving task ``size.<uid>`` at concurrency 4; stopped
    when the test ends, however it ends."""
    task = f"size.{uid}"
    process = spawn_python(["-c", WORKER, task, str(CONCURRENCY)], broker_url)
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == "READY", line
        yield process, task
    finally:
        process.kill()
        process.wait(30)


def test_crafted_calls_are_refused_and_the_worker_stays_under_its_bound(
        worker_process, broker_url):
    process, task = worker_process
    raw = RawPublisher(broker_url)
    try:
        sent: dict[str, Any] = {}  # name: the correlation id to expect a reply for
        for name, body, properties in hostile_bodies():
            cid = raw.call(task, body, expiration="120000", **properties)
            sent[name] = cid if properties.get("reply_to", True) else None
        for name, cid in sent.items():
            if cid is None:
                continue
            reply = raw.wait(cid, timeout=120)
            assert reply is not None, f"{name}: no reply"
            status, envelope = decode_reply(reply)
            assert status == "error" and envelope["type"] in (
                "DecodeError", "MessageTooLargeError"), (name, envelope)
            assert envelope["message"] and envelope["traceback"] == ""
        raw.normal_call(task)  # queued behind every crafted call at concurrency 4
        peak = _vm_hwm(process.pid)
    finally:
        raw.close()
    assert peak < DOCUMENTED_BOUND, f"worker peak RSS {peak / MiB:.0f} MiB"
    assert_queue_empty(broker_url, protocol.task_queue(task))
    process.terminate()
    output, _ = process.communicate(timeout=30)
    lines = [line for line in output.splitlines() if line.startswith("LOG WARNING")]
    # One line per crafted call, each naming it when it has a correlation id.
    assert len(lines) == len(sent), "\n".join(lines)
    for name, cid in sent.items():
        if cid is not None:
            assert sum(str(cid) in line for line in lines) == 1, (name, lines)
    print(f"worker peak RSS {peak / MiB:.0f} MiB; bound {DOCUMENTED_BOUND / MiB:.0f} MiB")


CLIENT_SHAPES = ["msgpack empty arrays", "msgpack small negative ints", "JSON empty objects",
                 "JSON nested deep", "gzip msgpack arrays to the limit",
                 "gzip lying about its size"]


@pytest.mark.gen_test(timeout=180)
async def test_crafted_replies_and_pubsub_messages_do_not_reach_a_client(
        make_worker, client, broker_url, caplog, uid):
    """Each crafted body as the reply to a pending call ends that call with a CodecError
    (DecodeError or MessageTooLargeError); as a pubsub message it is dropped with one log
    line. The client still works afterwards."""
    caplog.set_level(logging.WARNING, logger="crew")
    bodies = [(name, body, {k: v for k, v in props.items()
                            if k not in ("correlation_id", "reply_to")})
              for name, body, props in hostile_bodies() if name in CLIENT_SHAPES]
    task = f"hold.{uid}"
    started, release = threading.Event(), threading.Semaphore(0)

    def hold(x: Any) -> Any:
        started.set()
        release.acquire(timeout=60)  # one release per call
        return x

    make_worker({task: hold})
    loop = asyncio.get_running_loop()
    publisher = await loop.run_in_executor(None, RawPublisher, broker_url)
    channel = f"news.{uid}"
    got: list[Any] = []
    await client.subscribe(channel, got.append)
    try:
        for _name, body, props in bodies:
            await loop.run_in_executor(None, functools.partial(
                publisher.send, channel, body, exchange=protocol.PUBSUB_EXCHANGE, **props))
        for name, body, props in bodies:
            # A pending call; the crafted body arrives as its reply before the true one.
            pending = asyncio.ensure_future(client.call(task, name, expiration=60))
            assert await loop.run_in_executor(None, started.wait, 10)
            started.clear()
            (cid,) = client._pending
            await loop.run_in_executor(None, functools.partial(
                publisher.send, client._reply_queue, body, correlation_id=cid,
                headers={"crew-status": "ok"}, **props))
            with pytest.raises(CodecError):
                await pending
            release.release()  # the true reply comes late, and is dropped
    finally:
        release.release()
        await loop.run_in_executor(None, publisher.close)
    assert got == []
    dropped = [line for line in crew_log_lines(caplog) if "pubsub message" in line]
    assert len(dropped) == len(bodies), dropped
