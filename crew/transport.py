"""Cheaper reads and writes under pika's asyncio connection (internal).

pika 1.x moves bytes in ways that cost crew most of its time per call:

- **Reads.** pika reads its socket 4 KiB at a time and appends each read to a ``bytes``
  frame buffer, then cuts every parsed frame off the front of it. A 128 KiB body frame is
  copied about 32 times while it arrives, and a read holding hundreds of small frames is
  copied once per frame. :class:`FrameReader` keeps received chunks in a list until the
  frame under way is complete, joins them once and parses frames at an offset (the frames
  of calls and replies with crew's own codec, :mod:`crew.wire`). And where pika reads on
  until ``recv`` fails with ``EAGAIN``, crew stops at the first short read.
- **Writes.** pika hands each frame (method, header, body; each ack) to its transport
  separately. The transport registers the socket for writability on the first one
  (``add_writer``: an ``epoll_ctl``), waits for the next loop iteration, sends each frame
  with a ``send`` of its own and unregisters (another ``epoll_ctl``). On loopback every
  ``send`` also runs the receiving side of TCP. :class:`CoalescingTransport` instead
  flushes at the end of the loop iteration, with one ``sendmsg`` for everything buffered
  (the frames of all the calls or replies made in that iteration), and waits for
  writability only when the socket did not take it all. Where waiting for the end of
  the iteration gains nothing, crew flushes sooner (:func:`flush`): the worker after
  each batch of replies, the client after a call made while no other is under way.

- **Sends from another thread.** A worker's job thread that finishes the only call being
  served sends its reply and acknowledgement itself (:meth:`FrameReadingConnection.send_now`)
  rather than waking the loop to do it: the loop's wake-up (a write to its self-pipe, a
  return from ``epoll``, the GIL handed over twice) cost a quarter of a worker's CPU per
  sequential call. A lock (the connection's ``_crew_send_lock``) makes that safe: the loop
  holds it while it writes frames and while it processes what it read, so a thread's
  frames never land inside a message pika is writing, nor after the ``Channel.CloseOk``
  that pika writes before it marks the channel closed.

Both lean on pika internals (pika is pinned below 2). :func:`connection_class` and
:func:`tune` check that what they need is there and otherwise leave pika's own code in
place, which behaves the same, only slower. TLS connections keep pika's transport: an
``SSLSocket`` has no ``sendmsg``, and a thread's send is refused (the loop sends).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import struct
import threading
from typing import Any, Callable

import pika.connection
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.utils import io_services_utils

from . import wire

log = logging.getLogger(__name__)

#: Bytes asked of the socket per recv(), and at most per readiness event before the loop
#: serves others; pika's own are 4 KiB and 100 KiB. 128 KiB is the broker's frame size.
RECV_BYTES = 128 * 1024
CONSUME_BYTES = 1024 * 1024

_HEADER = struct.Struct(">BHL")  # frame type, channel, payload size
_HEADER_SIZE = _HEADER.size  # 7
_PROTOCOL_HEADER = b"AMQP"  # the broker's 8-byte protocol header (version mismatch only)
#: Buffers per sendmsg(): the kernel refuses more than IOV_MAX (1024 on Linux).
_MAX_IOV = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16)


def _frame_size(buffer: bytes | memoryview, offset: int, max_payload: int) -> int:
    """Length of the frame that starts at ``offset``, as far as the bytes there tell: the
    header's size alone while the header is incomplete.

    A size above ``max_payload`` raises pika's ``InvalidFrameError`` at once (a broker
    never sends one; a peer that is not a broker at all, such as an HTTP server on the
    port, would otherwise be read until its made-up length arrived).
    """
    if len(buffer) - offset < _HEADER_SIZE:
        return _HEADER_SIZE
    if buffer[offset] == _PROTOCOL_HEADER[0] and buffer[offset:offset + 4] == _PROTOCOL_HEADER:
        return 8
    payload = _HEADER.unpack_from(buffer, offset)[2]
    if payload > max_payload:
        raise pika.exceptions.InvalidFrameError(
            f"frame of {payload} bytes, more than the frame_max of {max_payload}: "
            "is this port an AMQP broker?")
    return _HEADER_SIZE + payload + 1


def _decode(buffer: bytes, offset: int, end: int) -> Any:
    """One frame of ``buffer[offset:end]``, as pika's ``decode_frame`` makes it."""
    frame = wire.decode(buffer, offset, end)
    if frame is not None:
        return frame
    whole = buffer if offset == 0 and end == len(buffer) else buffer[offset:end]
    return pika.frame.decode_frame(whole)[1]


class FrameReader:
    """Splits the bytes of an AMQP connection into pika frames, copying each byte once.

    :meth:`feed` takes what one ``recv`` returned. Until the frame under way is complete the
    chunk is only kept; then the kept chunks are joined and every complete frame in them is
    decoded. An invalid frame raises pika's ``InvalidFrameError``, as pika's own reader does.
    """

    def __init__(self, max_payload: int = pika.spec.FRAME_MAX_SIZE) -> None:
        self._max_payload = max_payload
        self._chunks: list[bytes | memoryview] = []
        self._buffered = 0
        self._needed = 0

    @property
    def buffered(self) -> int:
        """Bytes received that are not part of a complete frame yet."""
        return self._buffered

    def feed(self, data: bytes) -> tuple[int, list[Any]]:
        """Add received bytes; return ``(bytes consumed, complete frames in order)``."""
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered < self._needed:
            return 0, []  # the frame under way is still incomplete: no copy yet
        buffer = data if len(self._chunks) == 1 else b"".join(self._chunks)
        frames = []
        offset = 0
        while (end := offset + _frame_size(buffer, offset, self._max_payload)) <= len(buffer):
            frames.append(_decode(buffer, offset, end))
            offset = end
        # The rest (the head of the next frame) is kept as a view: no copy until it is joined.
        rest = memoryview(buffer)[offset:] if offset < len(buffer) else b""
        self._chunks = [rest] if rest else []
        self._buffered = len(rest)
        self._needed = _frame_size(rest, 0, self._max_payload) if rest else 0
        return offset, frames


class FrameReadingConnection(AsyncioConnection):
    """pika's ``AsyncioConnection`` with :class:`FrameReader` in place of its frame buffer,
    and :meth:`send_now` for other threads."""

    _crew_reader: FrameReader
    #: Held by the loop while it writes frames or processes frames it read, and by a thread
    #: while it sends (:meth:`send_now`). Reentrant: pika writes while it processes.
    _crew_send_lock: threading.RLock

    def _init_connection_state(self) -> None:
        super()._init_connection_state()  # pika calls this when it starts and when it ends
        # The broker's frames never exceed the frame_max this connection offers.
        self._crew_reader = FrameReader(self.params.frame_max)
        if not hasattr(self, "_crew_send_lock"):  # one lock for the connection's whole life
            self._crew_send_lock = threading.RLock()

    def _on_data_available(self, data_in: bytes) -> None:
        consumed, frames = self._crew_reader.feed(data_in)
        # pika's heartbeat checker watches this counter to tell that the broker is alive.
        self.bytes_received += consumed
        # Under the lock: a Channel.Close from the broker makes pika write CloseOk and only
        # then mark the channel closed; a thread must not see it open in between.
        with self._crew_send_lock:
            for value in frames:
                self._process_frame(value)

    def _output_marshaled_frames(self, marshaled_frames: Any) -> None:
        with self._crew_send_lock:  # a message's frames stay together
            super()._output_marshaled_frames(marshaled_frames)

    def send_now(self, frames: list[bytes], channel_open: Callable[[], bool]) -> bool:
        """From any thread: send whole marshalled ``frames`` now, if ``channel_open()`` (asked
        under the lock) still holds; True once they are sent or queued behind what waits.

        False, and nothing sent, when the connection or channel is closed or the transport
        cannot send from a thread (TLS, pika's own): the caller then hands the frames' work
        to the loop.
        """
        transport = self._transport
        if not isinstance(transport, CoalescingTransport):
            return False
        with self._crew_send_lock:
            if not self.is_open or not channel_open() or not transport.send_now(frames):
                return False
            self.bytes_sent += sum(map(len, frames))
            self.frames_sent += len(frames)
        return True


def connection_class() -> type[AsyncioConnection]:
    """:class:`FrameReadingConnection` if this pika has what it overrides, else pika's own."""
    overridden = ("_init_connection_state", "_on_data_available", "_process_frame",
                  "_output_marshaled_frames")
    if (all(hasattr(pika.connection.Connection, name) for name in overridden)
            and hasattr(pika.frame, "decode_frame") and hasattr(pika.frame, "Body")):
        return FrameReadingConnection
    log.warning("this pika (%s) lacks the internals crew's frame reader needs; using "
                "pika's own", getattr(pika, "__version__", "?"))
    return AsyncioConnection


_PlainTransport = io_services_utils._AsyncPlaintextTransport


class CoalescingTransport(_PlainTransport):
    """pika's plaintext transport, flushing once per loop iteration with one ``sendmsg``.

    Instances are made by :func:`tune` from pika's own, by changing their class: pika builds
    its transport deep inside its connection workflow, with no hook to choose another.
    """

    #: Set by :func:`tune`.
    _crew_loop: asyncio.AbstractEventLoop
    _crew_flush_pending: bool
    _crew_watching_writes: bool
    #: The connection's send lock (a lock of its own under a connection that has none).
    _crew_lock: threading.RLock

    def _consume(self) -> None:
        """Hand what the socket holds to pika, stopping at the first short read.

        pika reads until ``recv`` raises ``EAGAIN``: on every readiness event one more
        system call and one more raised exception, per call on a lightly loaded connection.
        A read shorter than asked for drained the socket; bytes arriving after it make the
        (level-triggered) selector report the socket again.
        """
        consumed = 0
        while self._state == self._STATE_ACTIVE and consumed < self._MAX_CONSUME_BYTES:
            data = self._sigint_safe_recv(self._sock, self._MAX_RECV_BYTES)
            if not data:
                raise self.RxEndOfFile()  # pika's _on_socket_readable tells the protocol
            consumed += len(data)
            self._protocol.data_received(data)
            if len(data) < self._MAX_RECV_BYTES:
                return

    def write(self, data: bytes) -> None:
        """Buffer ``data``; it leaves with everything else written in this loop iteration."""
        if self._state != self._STATE_ACTIVE:
            return  # as pika: writes after the connection failed are dropped
        if not data:
            raise ValueError("write() called with empty data")
        self._buffer_tx_data(data)
        if not self._crew_flush_pending and not self._crew_watching_writes:
            self._crew_flush_pending = True
            self._crew_loop.call_soon(self._flush)

    def send_now(self, frames: list[bytes]) -> bool:
        """With the connection's send lock held, from any thread: send ``frames`` now, or
        queue them behind bytes already waiting (which a pending flush or the writability
        watch sends); False if the transport is no longer active.
        """
        if self._state != self._STATE_ACTIVE:
            return False
        left_over = False
        if not self._tx_buffers and not self._crew_watching_writes:
            try:
                sent = self._sock.sendmsg(frames)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return False  # the loop's next read or write fails the connection
            if sent == sum(map(len, frames)):
                return True
            frames = _unsent(frames, sent)
            left_over = True
        for frame in frames:
            self._buffer_tx_data(frame)
        if left_over:
            # Watching for writability is the loop's business (its selector is not
            # thread-safe): it flushes the rest, and watches if the socket is still full.
            # Asked only now that the rest is buffered: flush() looks at the buffer before
            # it takes the lock, and asked sooner it could find it empty and do nothing.
            self._crew_loop.call_soon_threadsafe(self._flush)
        return True

    def flush(self) -> None:
        """Send what is buffered now, rather than at the end of the loop iteration.

        For a caller that knows it has written all it will write for a while (the worker
        after a batch of replies, a client after a lone call): the message leaves without
        waiting for the selector to be polled once more.
        """
        if (self._state == self._STATE_ACTIVE and self._tx_buffers
                and not self._crew_watching_writes):
            self._send_buffered()

    def _flush(self) -> None:
        self._crew_flush_pending = False
        self.flush()

    def _on_socket_writable(self) -> None:
        if self._state == self._STATE_ACTIVE:
            self._send_buffered()

    def _send_buffered(self) -> None:
        """Send what the socket takes; watch for writability only while something is left."""
        failed: OSError | None = None
        # All under the lock, the watch's change included: a thread that found bytes
        # waiting or the watch on queues its frames for the loop, which must not then
        # drop the watch they count on.
        with self._crew_lock:
            try:
                self._produce()
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as error:
                failed = error
            left = bool(self._tx_buffers)
            if failed is None and left != self._crew_watching_writes:
                self._crew_watching_writes = left
                if left:
                    self._nbio.set_writer(self._sock.fileno(), self._on_socket_writable)
                else:
                    self._nbio.remove_writer(self._sock.fileno())
        if failed is not None:
            log.debug("send failed, aborting the connection: %r", failed)
            self._initiate_abort(failed)

    def _produce(self) -> None:
        """Send buffered frames, many per system call, until done or the socket is full."""
        buffers = self._tx_buffers
        while buffers:
            batch = list(itertools.islice(buffers, _MAX_IOV))
            sent = self._sock.sendmsg(batch)
            self._tx_buffered_byte_count -= sent
            if sent < sum(map(len, batch)):
                self._drop_sent(sent)
                return  # the socket is full; the rest waits for writability
            for _ in batch:
                buffers.popleft()

    def _drop_sent(self, sent: int) -> None:
        """Remove the first ``sent`` bytes from the buffer after a partial send."""
        buffers = self._tx_buffers
        while sent:
            head = buffers[0]
            if sent < len(head):
                buffers[0] = head[sent:]
                return
            buffers.popleft()
            sent -= len(head)


def tune(connection: AsyncioConnection) -> None:
    """Give an open connection larger reads and, on plain TCP, coalesced writes.

    What this pika or this socket does not support is left as pika made it.
    """
    transport = getattr(connection, "_transport", None)
    if transport is None or not hasattr(transport, "_MAX_RECV_BYTES"):
        return
    transport._MAX_RECV_BYTES = RECV_BYTES
    transport._MAX_CONSUME_BYTES = CONSUME_BYTES
    if type(transport) is _PlainTransport and _can_coalesce(transport):
        loop = transport._nbio.get_native_ioloop()
        transport.__class__ = CoalescingTransport
        transport._crew_loop = loop
        transport._crew_lock = getattr(connection, "_crew_send_lock", None) or threading.RLock()
        transport._crew_flush_pending = False
        transport._crew_watching_writes = bool(transport._tx_buffers)
        if transport._crew_watching_writes:
            # pika's own write() watches the socket with its own method, bound before the
            # class changed; ours must take over, or the flag would never be cleared.
            transport._nbio.set_writer(transport._sock.fileno(), transport._on_socket_writable)


def flush(connection: Any) -> None:
    """Send what ``connection`` has buffered now, if its transport is a
    :class:`CoalescingTransport`; pika's own transport sends as it goes."""
    transport = getattr(connection, "_transport", None)
    if isinstance(transport, CoalescingTransport):
        transport.flush()


def _unsent(frames: list[bytes], sent: int) -> list[bytes]:
    """What is left of ``frames`` once their first ``sent`` bytes are sent."""
    for index, frame in enumerate(frames):
        if sent < len(frame):
            return [frame[sent:], *frames[index + 1:]]
        sent -= len(frame)
    return []


def _can_coalesce(transport: Any) -> bool:
    needed = ("_sock", "_nbio", "_state", "_STATE_ACTIVE", "_tx_buffers",
              "_tx_buffered_byte_count", "_buffer_tx_data", "_initiate_abort",
              "_protocol", "_sigint_safe_recv", "_MAX_CONSUME_BYTES", "RxEndOfFile")
    return (all(hasattr(transport, name) for name in needed)
            and hasattr(transport._sock, "sendmsg")
            and isinstance(getattr(transport._nbio, "get_native_ioloop", lambda: None)(),
                           asyncio.AbstractEventLoop))
