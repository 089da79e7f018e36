"""Optimisations tried on crew by monkeypatching, in the benchmark's own processes only.

``python bench/run.py --experiment arena,nogzip`` adds a row "crew transient +arena+nogzip"
whose worker and caller apply these patches before they start; crew's files are not
touched. Each patch is a candidate change to crew (see docs/BENCHMARKS.md, "Profile").

The patches that became crew's own code are gone from here; docs/BENCHMARKS.md keeps what
they measured: ``recv`` and ``frames`` (crew/frames.py ``FrameReader``), ``sendmsg`` and
``soon`` (``CoalescingTransport``), ``coalesce`` (superseded by those two), ``callpath``
(crew/client.py), ``batch`` (the worker's batched hand-back) and ``transient`` (the
gateway's calls).

- ``arena``: at most 2 glibc malloc arenas (``mallopt(M_ARENA_MAX, 2)``, as the
  environment variable ``MALLOC_ARENA_MAX=2`` does). Each of a worker's 64 job threads
  otherwise gets an arena of its own, and the 1 MB bodies they decode and encode stay
  in them: the worker's RSS grows to several times a concurrency-1 worker's.
- ``mmap``: a fixed glibc mmap threshold of 128 KiB (``mallopt(M_MMAP_THRESHOLD)``, as
  ``MALLOC_MMAP_THRESHOLD_=131072`` does): large buffers are then always mapped and given
  back to the system when freed, instead of staying in the heap once glibc has raised its
  threshold (it does so the first time such a buffer is freed).
- ``switch``: ``sys.setswitchinterval(0.001)`` in the worker: a job thread that computes
  holds the GIL for up to the default 5 ms before the loop gets it back, and the loop needs
  it two or three times to answer a deadline.
- ``asyncecho``: not a patch: the echo task is an ``async def``, which crew runs on the
  worker's loop, so the difference to the plain ``def`` is the cost of handing each job to
  a thread and its reply back.
- ``nogzip``: no automatic gzip (``gzip=None`` never compresses); on loopback zlib costs
  far more than the bytes it saves.
- ``huffman``: automatic gzip with ``Z_HUFFMAN_ONLY`` (still real gzip, RFC 1952): no
  string matching, so faster than level 1, at a lower ratio.
- ``isal``: automatic gzip as now, compressed and inflated by python-isal (Intel's ISA-L,
  ``pip install isal``) instead of zlib: the same RFC 1952 gzip at 3-4x the speed.
- ``directall``: every job thread sends its own reply and ack unless a batch of replies
  already waits for the loop, where crew does so only for the one call being served: one
  ``sendmsg`` per reply instead of one per batch, and no wake-up of the loop.
- ``pikacodec``: the reverse of a candidate, to measure what crew has: the frames of calls,
  replies and acks encoded and decoded by pika's own codec, as before ``crew/wire.py``.
- ``nobudget``: the reverse of issue 21: bodies decoded without the decode budget, and a
  worker that reserves nothing for its calls (no memory ceiling), as before.
- ``nofigures``: the reverse of issue 19's dashboard: the worker does not count its calls'
  outcomes, durations and queue waits (``crew.figures``), as before.
- ``noguard``: the reverse of the guard on no-ack consumers (``crew.amqp``): the client's
  replies reach its callback straight from pika, as before, where a callback that raised
  closed the connection.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable

import common  # noqa: F401  (puts the repository on sys.path)


def _arena() -> None:
    import ctypes

    m_arena_max = -8  # glibc malloc.h
    ctypes.CDLL("libc.so.6").mallopt(m_arena_max, 2)


def _mmap() -> None:
    import ctypes

    m_mmap_threshold = -3  # glibc malloc.h
    ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 128 * 1024)


def _switch() -> None:
    import sys

    sys.setswitchinterval(0.001)


def _nogzip() -> None:
    from crew import codec

    codec._worth_compressing = lambda data: False


def _huffman() -> None:
    from crew import codec

    def gzip_compress(data: bytes) -> bytes:
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31, 9, zlib.Z_HUFFMAN_ONLY)
        return compressor.compress(data) + compressor.flush()

    codec.gzip_compress = gzip_compress


def _isal() -> None:
    try:
        from isal import isal_zlib
    except ImportError:
        raise SystemExit("the isal patch needs python-isal: pip install isal") from None
    from crew import codec

    # The same gzip on the wire (RFC 1952), from Intel's ISA-L: a drop-in for zlib's API.
    codec.zlib = isal_zlib  # type: ignore[assignment]


def _asyncecho() -> None:
    """bench/crew_rpc.py serves an ``async def`` echo when this is among its patches."""


def _directall() -> None:
    from crew import replies

    # A job thread answers by itself unless a batch of replies already waits for the loop.
    replies.Replies._alone = lambda self: not self._finished_scheduled  # type: ignore


def _pikacodec() -> None:
    import pika.frame
    from pika.spec import Basic

    from crew import wire

    def publish_frames(channel: int, exchange: str, routing_key: str, mandatory: bool,
                       properties: Any, body: bytes, frame_max: int) -> list[bytes]:
        frames = [pika.frame.Method(channel, Basic.Publish(
                      exchange=exchange, routing_key=routing_key, mandatory=mandatory)
                  ).marshal(),
                  pika.frame.Header(channel, len(body), properties).marshal()]
        room = frame_max - 8
        for start in range(0, len(body), room):
            frames.append(pika.frame.Body(channel, body[start:start + room]).marshal())
        return frames

    wire.publish_frames = publish_frames
    wire.ack_frame = lambda channel, tag: pika.frame.Method(channel, Basic.Ack(tag)).marshal()
    wire.decode = lambda buffer, offset, end: None  # every frame to pika's decode_frame


def _nobudget() -> None:
    """The reverse of issue 21: no decode budget and no memory ceiling, as before."""
    import json

    import msgpack

    from crew import codec

    def unpack(body: Any) -> Any:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=codec._refuse_ext)

    def load_json(body: Any) -> Any:
        return json.loads(body, parse_constant=codec._refuse_constant,
                          parse_float=codec._finite_float)

    codec._unpack = unpack
    codec._load_json = load_json
    codec.decode_memory = lambda body, content_type, content_encoding=None: 0


def _nofigures() -> None:
    """The reverse of issue 19's dashboard: the worker counts nothing of its calls (its
    figures), and publishes its map without them."""
    from crew import replies

    replies.Replies.figures = property(lambda self: None, lambda self, value: None)


def _noguard() -> None:
    """The reverse of the guard on no-ack consumers: pika calls the callbacks directly."""
    from crew import amqp

    amqp._dropping_failures = lambda queue, on_message: on_message


PATCHES: dict[str, Callable[[], None]] = {
    "arena": _arena, "mmap": _mmap, "switch": _switch, "asyncecho": _asyncecho,
    "nogzip": _nogzip, "huffman": _huffman, "isal": _isal, "directall": _directall,
    "pikacodec": _pikacodec, "nobudget": _nobudget, "nofigures": _nofigures,
    "noguard": _noguard,
}


def apply(names: list[str]) -> None:
    for name in names:
        PATCHES[name]()
