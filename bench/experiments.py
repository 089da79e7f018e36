"""Optimisations tried on crew by monkeypatching, in the benchmark's own processes only.

``python bench/run.py --experiment recv,batch`` adds a row "crew transient +recv+batch"
whose worker and caller apply these patches before they start; crew's files are not
touched. Each patch is a candidate change to crew (see docs/BENCHMARKS.md, "Profile"):

- ``recv``: pika reads its socket 4 KiB at a time and appends each read to a ``bytes``
  frame buffer (``Connection._on_data_available``), so a 128 KiB frame is copied about 32
  times as it arrives: quadratic in the frame size. Read 256 KiB at a time instead.
- ``frames``: the same quadratic copy cured where it happens: incoming chunks are kept in a
  list until the frame being read is complete, then joined once (what ``recv`` alone does
  only when the broker's bytes come in large reads).
- ``coalesce``: pika hands the method, header and body frames of a message to its transport
  one by one; the transport then waits for the next loop iteration (``add_writer``, epoll,
  ``send`` per frame, ``remove_writer``). Join the frames of a small message and try
  ``send`` at once; only what the socket does not take waits for writability.
- ``sendmsg``: pika's transport sends its buffered frames one ``send`` each (three per
  message: method, header, body; one per ack). Send them all with one ``sendmsg``
  (scatter-gather, no copy; plain TCP only: ``SSLSocket`` has no ``sendmsg``).
- ``soon``: instead of ``add_writer`` (two ``epoll_ctl`` calls and a wait for the next
  ``epoll``) for every write into an empty buffer, flush the buffer with ``call_soon`` at
  the end of the loop iteration: everything published in one iteration (the replies to a
  batch of deliveries) leaves together, and a lone call leaves at once. Only what the socket
  does not take waits for writability. Best with ``sendmsg``.
- ``callpath``: the client's per-call extras: correlation ids from a per-client prefix and a
  counter instead of ``uuid4()`` (an ``os.urandom`` call each), task names validated once.
- ``batch``: the worker wakes its loop once per finished job (``call_soon_threadsafe``,
  one self-pipe write each). Queue finished jobs and wake the loop once per batch.
- ``transient``: ``Client.call`` defaults to ``persistent=False`` (what the gateway, which
  never says, then sends). A caller awaits the reply on an exclusive queue that a broker
  restart deletes, so a persistent call buys nothing the caller could use.
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
"""

from __future__ import annotations

import collections
import itertools
import threading
import zlib
from typing import Any, Callable

import common  # noqa: F401  (puts the repository on sys.path)

#: Bytes pika reads per ``recv`` with ``recv`` (pika's own default: 4096).
RECV_BYTES = 256 * 1024
#: Frames of a message up to this size in all are joined into one write.
COALESCE_BYTES = 64 * 1024


def _recv() -> None:
    from pika.adapters.utils import io_services_utils as io

    io._AsyncTransportBase._MAX_RECV_BYTES = RECV_BYTES
    io._AsyncTransportBase._MAX_CONSUME_BYTES = 4 * RECV_BYTES


def _frames() -> None:
    import struct

    from pika import connection

    header_size, end_size = 7, 1  # AMQP frame header (type, channel, size) and end marker

    def on_data_available(self: Any, data_in: bytes) -> None:
        chunks = self.__dict__.setdefault("_bench_chunks", [])
        chunks.append(data_in)
        self._bench_have = getattr(self, "_bench_have", 0) + len(data_in)
        if self._bench_have < getattr(self, "_bench_need", 0):
            return  # the frame under way is still incomplete: no copy yet
        self._frame_buffer += b"".join(chunks)
        chunks.clear()
        self._bench_have = self._bench_need = 0
        while self._frame_buffer:
            consumed, frame_value = self._read_frame()
            if not frame_value:
                buffered = len(self._frame_buffer)
                if buffered >= header_size and self._frame_buffer[:4] != b"AMQP":
                    size = struct.unpack_from(">L", self._frame_buffer, 3)[0]
                    self._bench_need = header_size + size + end_size - buffered
                return
            self._trim_frame_buffer(consumed)
            self._process_frame(frame_value)

    connection.Connection._on_data_available = on_data_available  # type: ignore[method-assign]


def _coalesce() -> None:
    import socket

    from pika import connection
    from pika.adapters.utils import io_services_utils as io

    def output(self: Any, frames: list[bytes]) -> None:
        size = sum(len(f) for f in frames)
        self.bytes_sent += size
        self.frames_sent += len(frames)
        if size <= COALESCE_BYTES and len(frames) > 1:
            frames = [b"".join(frames)]
        for data in frames:
            self._adapter_emit_data(data)

    plain_write = io._AsyncPlaintextTransport.write

    def write(self: Any, data: bytes) -> None:
        if self._state == self._STATE_ACTIVE and not self._tx_buffers:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError, socket.timeout):
                sent = 0
            except OSError:
                sent = 0  # the buffered path below reports it as pika would
            if sent == len(data):
                return
            data = data[sent:]
        plain_write(self, data)

    connection.Connection._output_marshaled_frames = output  # type: ignore[method-assign]
    io._AsyncPlaintextTransport.write = write  # type: ignore[method-assign]


def _sendmsg() -> None:
    from pika.adapters.utils import io_services_utils as io

    def produce(self: Any) -> None:
        buffers = self._tx_buffers
        while buffers:
            sent = self._sock.sendmsg(list(itertools.islice(buffers, 512)))
            self._tx_buffered_byte_count -= sent
            while sent:
                if sent >= len(buffers[0]):
                    sent -= len(buffers.popleft())
                else:
                    buffers[0] = buffers[0][sent:]
                    sent = 0

    io._AsyncPlaintextTransport._produce = produce  # type: ignore[method-assign]


def _soon() -> None:
    from pika.adapters.utils import io_services_utils as io

    transport = io._AsyncPlaintextTransport

    def flush(self: Any) -> None:
        self._flush_scheduled = False
        if self._state != self._STATE_ACTIVE or not self._tx_buffers:
            return
        try:
            self._produce()
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as error:
            self._initiate_abort(error)
            return
        if self._tx_buffers:  # the socket is full: the rest waits for writability
            self._nbio.set_writer(self._sock.fileno(), self._on_socket_writable)
        else:
            self._nbio.remove_writer(self._sock.fileno())

    plain_write = transport.write

    def write(self: Any, data: bytes) -> None:
        call_soon = getattr(self._nbio.get_native_ioloop(), "call_soon", None)
        if call_soon is None or self._state != self._STATE_ACTIVE:
            plain_write(self, data)  # pika's own loops (BlockingConnection): as before
            return
        was_empty = not self._tx_buffers
        self._buffer_tx_data(data)
        if was_empty and not getattr(self, "_flush_scheduled", False):
            self._flush_scheduled = True
            call_soon(flush, self)

    transport.write = write  # type: ignore[method-assign]


def _callpath() -> None:
    import functools
    import os
    from types import SimpleNamespace

    from crew import client, protocol

    counter = itertools.count()
    prefix = os.urandom(8).hex()

    def uuid4() -> SimpleNamespace:
        return SimpleNamespace(hex=f"{prefix}{next(counter):x}")

    client.uuid = SimpleNamespace(uuid4=uuid4)  # type: ignore[assignment]
    protocol.validate_task_name = functools.lru_cache(maxsize=1024)(protocol.validate_task_name)


def _batch() -> None:
    from crew import worker as crew_worker

    original_start = crew_worker.Worker.start

    async def start(self: Any) -> None:
        self._done_batch = collections.deque()
        self._done_lock = threading.Lock()
        self._done_scheduled = False
        await original_start(self)

    def drain(self: Any) -> None:
        with self._done_lock:
            batch = list(self._done_batch)
            self._done_batch.clear()
            self._done_scheduled = False
        for job, reply in batch:
            self._answer(job, reply)

    def job_done(self: Any, job: Any, reply: Any) -> None:
        if job.coroutine is not None:  # an async task: already on the loop
            self._answer(job, reply)
            return
        with self._done_lock:
            self._done_batch.append((job, reply))
            wake = not self._done_scheduled
            self._done_scheduled = True
        if wake:
            self._loop.call_soon_threadsafe(drain, self)

    crew_worker.Worker.start = start  # type: ignore[method-assign]
    crew_worker.Worker._job_done = job_done  # type: ignore[method-assign]


def _transient() -> None:
    from crew import client

    call = client.Client.call

    async def transient_call(self: Any, task: str, data: Any = None, *, persistent: bool = False,
                             **options: Any) -> Any:
        return await call(self, task, data, persistent=persistent, **options)

    client.Client.call = transient_call  # type: ignore[method-assign]


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


def _asyncecho() -> None:
    """bench/crew_rpc.py serves an ``async def`` echo when this is among its patches."""


PATCHES: dict[str, Callable[[], None]] = {
    "recv": _recv, "frames": _frames, "coalesce": _coalesce, "sendmsg": _sendmsg, "soon": _soon,
    "callpath": _callpath, "batch": _batch, "transient": _transient, "arena": _arena,
    "mmap": _mmap, "switch": _switch, "asyncecho": _asyncecho, "nogzip": _nogzip,
    "huffman": _huffman,
}


def apply(names: list[str]) -> None:
    for name in names:
        PATCHES[name]()
