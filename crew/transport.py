# Longer than 300 lines because every use of pika's private names must be in this module.
"""The one module that touches pika's private internals: crew's two I/O paths (internal).

Every use of a private pika name (a ``_name`` of a pika object or module, a private pika
class, a ``__class__`` swap) is in this module; the rest of crew calls :func:`publish`,
:func:`ack`, :func:`publish_and_ack_now`, :func:`publish_now`, :func:`flush` and
:func:`tune`, which do the same on either path. tests/unit/test_seam.py scans crew's
modules to keep it so.

**The fast path** (pika's internals, measured in docs/BENCHMARKS.md):

- *Reads.* :class:`FrameReadingConnection` feeds what the socket returned to
  :class:`crew.frames.FrameReader` (chunks joined once per frame, not once per 4 KiB read;
  frames of calls and replies decoded by :mod:`crew.wire`), and reads 128 KiB per ``recv``,
  stopping at the first short read where pika reads on until ``EAGAIN``.
- *Writes.* :class:`CoalescingTransport` flushes at the end of the loop iteration, with one
  ``sendmsg`` for everything buffered, and waits for writability only when the socket did
  not take it all (pika registers and unregisters a writer, two ``epoll_ctl``, and sends
  each frame with a ``send`` of its own). Where waiting gains nothing crew flushes sooner
  (:func:`flush`). Publishes and acks are marshalled by :mod:`crew.wire`.
- *Sends from another thread.* A worker's job thread that finishes the only call being
  served sends its reply and ack itself (:func:`publish_and_ack_now`) rather than waking
  the loop (a quarter of a worker's CPU per sequential call); a :class:`crew.SyncClient`
  caller whose call is the only one pending publishes it itself (:func:`publish_now`,
  :mod:`crew.synccall`). The connection's
  ``_crew_send_lock``, held by the loop while it writes frames and while it processes what
  it read, keeps a thread's frames out of a message pika is writing and after the
  ``Channel.CloseOk`` pika writes before it marks the channel closed.

**The public path**: pika's own ``AsyncioConnection``, transport, reads and frame decoding;
``basic_publish`` and ``basic_ack``; :func:`publish_and_ack_now` returns False, so the loop
sends. Its one private touch is :meth:`PublicConnection._read_frame`, which asks crew's
codec again only when pika raises on a content header (a timestamp past the year 9999,
see :mod:`crew.tables`), so that such a header does not close the connection; if a pika
lacks that method, the connection still works and only that protection is lost (logged).

**The choice** is made once per connection by :mod:`crew.seam`: the ``CREW_PIKA_PATH``
switch (``auto``, ``fast``, ``public``), the pika versions the fast path was tested with,
and a check of behaviour (crew's codec against pika's; the private methods and attributes
used here exercised on bare objects). TLS connections on the fast path keep pika's
transport (an ``SSLSocket`` has no ``sendmsg``) and send from the loop only.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import itertools
import logging
import os
import struct
import threading
from collections.abc import Callable
from typing import Any

import pika.connection
import pika.exceptions
import pika.spec
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.utils import io_services_utils
from pika.channel import Channel as PikaChannel
from pika.spec import BasicProperties

from . import seam, wire
from .frames import FrameReader, decode_frame

log = logging.getLogger(__name__)

#: Bytes asked of the socket per recv(), and at most per readiness event before the loop
#: serves others; pika's own are 4 KiB and 100 KiB. 128 KiB is the broker's frame size.
RECV_BYTES = 128 * 1024
CONSUME_BYTES = 1024 * 1024

#: Buffers per sendmsg(): the kernel refuses more than IOV_MAX (1024 on Linux).
_MAX_IOV = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16)
_FRAME_HEADER = bytes([pika.spec.FRAME_HEADER])


# --- what the rest of crew calls --------------------------------------------------------

def connection_class() -> type[AsyncioConnection]:
    """The class of the next connection: :class:`FrameReadingConnection` (the fast path)
    or :class:`PublicConnection`, as :func:`crew.seam.choose` decides (logged once)."""
    choice = seam.choose(_internals_problem)
    seam.report(choice)
    if not choice.fast:
        _warn_if_headers_unprotected()
    return FrameReadingConnection if choice.fast else PublicConnection


def is_fast(connection: Any) -> bool:
    """Whether ``connection`` takes the fast path."""
    return isinstance(connection, FrameReadingConnection)


def publish(channel: PikaChannel, exchange: str, routing_key: str, body: bytes,
            properties: BasicProperties, mandatory: bool) -> None:
    """On the loop: hand a message to the connection's write buffer; pika's
    ``basic_publish`` on the public path (which raises on a closed channel)."""
    connection = channel.connection
    if channel.is_open and isinstance(connection, FrameReadingConnection):
        # crew's codec (crew.wire) marshals the frames pika's basic_publish would.
        connection._output_marshaled_frames(wire.publish_frames(
            channel.channel_number, exchange, routing_key, mandatory, properties, body,
            connection.params.frame_max))
    else:
        channel.basic_publish(exchange, routing_key, body, properties, mandatory)


def ack(channel: PikaChannel, delivery_tag: int) -> None:
    """On the loop: acknowledge one delivery, if the channel is open."""
    if not channel.is_open:
        return
    connection = channel.connection
    if isinstance(connection, FrameReadingConnection) and not connection.is_closed:
        connection._output_marshaled_frames(
            [wire.ack_frame(channel.channel_number, delivery_tag)])
    else:
        channel.basic_ack(delivery_tag)  # pika's, which raises on a closed connection


def publish_and_ack_now(channel: PikaChannel, exchange: str, routing_key: str, body: bytes,
                        properties: BasicProperties, mandatory: bool,
                        delivery_tag: int) -> bool:
    """From any thread: publish a message and acknowledge ``delivery_tag``, both sent at
    once, in that order. False, and nothing sent, on the public path, on TLS, or when the
    channel or connection is closed: the caller then hands the work to the loop."""
    connection = channel.connection
    if not isinstance(connection, FrameReadingConnection):
        return False
    number = channel.channel_number
    frames = wire.publish_frames(number, exchange, routing_key, mandatory, properties,
                                 body, connection.params.frame_max)
    frames.append(wire.ack_frame(number, delivery_tag))
    # Asked again under the connection's send lock: the loop may be closing it.
    return connection.send_now(frames, lambda: channel.is_open)


def can_send_now(channel: PikaChannel) -> bool:
    """Whether :func:`publish_now` may send on ``channel``'s connection from a thread now
    (the fast path over plain TCP); it may still refuse, when the state changes."""
    connection = channel.connection
    return (isinstance(connection, FrameReadingConnection)
            and isinstance(connection._transport, CoalescingTransport))


def publish_now(channel: PikaChannel, exchange: str, routing_key: str, body: bytes,
                prepare: Callable[[], BasicProperties | None], mandatory: bool) -> bool:
    """From any thread: publish a message now, its properties made by ``prepare()`` under
    the connection's send lock (None: do not send). False, and nothing sent, as for
    :func:`publish_and_ack_now`."""
    connection = channel.connection
    if not isinstance(connection, FrameReadingConnection):
        return False
    number = channel.channel_number

    def frames() -> list[bytes] | None:
        properties = prepare()
        if properties is None:
            return None
        return wire.publish_frames(number, exchange, routing_key, mandatory, properties,
                                   body, connection.params.frame_max)

    return connection.send_now(frames, lambda: channel.is_open)


def flush(connection: Any) -> None:
    """Send what ``connection`` has buffered now, if its transport is a
    :class:`CoalescingTransport`; pika's own transport sends as it goes."""
    transport = getattr(connection, "_transport", None)
    if isinstance(transport, CoalescingTransport):
        transport.flush()


# --- the fast path ----------------------------------------------------------------------

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

    def _on_data_available(self, data_in: bytes) -> None:  # pika's, with crew's reader
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

    def send_now(self, frames: list[bytes] | Callable[[], list[bytes] | None],
                 channel_open: Callable[[], bool]) -> bool:
        """From any thread: send whole marshalled ``frames`` now, if ``channel_open()`` (asked
        under the lock) still holds; True once they are sent or queued behind what waits.
        ``frames`` may be a function, called under the lock, that makes them (None: send
        nothing, return False).

        False, and nothing sent, when the connection or channel is closed or the transport
        cannot send from a thread (TLS, pika's own): the caller then hands the frames' work
        to the loop.
        """
        transport = self._transport
        if not isinstance(transport, CoalescingTransport):
            return False
        with self._crew_send_lock:
            if not self.is_open or not channel_open():
                return False
            made = frames() if callable(frames) else frames
            if made is None or not transport.send_now(made):
                return False
            self.bytes_sent += sum(map(len, made))
            self.frames_sent += len(made)
        return True


class PublicConnection(AsyncioConnection):
    """pika's ``AsyncioConnection``, except that a content header pika cannot decode is
    given to crew's codec before the connection is failed (see the module's docstring)."""

    def _read_frame(self) -> Any:
        try:
            return super()._read_frame()
        except Exception:
            data = self._frame_buffer
            if data[:1] != _FRAME_HEADER:
                raise
            end = 8 + int.from_bytes(data[3:7], "big")  # pika raised: the frame is whole
            return end, decode_frame(data, 0, end, lean=False)  # else pika's error again


_PlainTransport = io_services_utils._AsyncPlaintextTransport


class CoalescingTransport(io_services_utils._AsyncPlaintextTransport):
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
    """On the fast path, give an open connection larger reads and, on plain TCP, coalesced
    writes; a :class:`PublicConnection` is left as pika made it.

    What this pika or this socket does not support is left as pika made it.
    """
    if isinstance(connection, PublicConnection):
        return  # the public path keeps pika's reads and writes
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
            and transport._state == transport._STATE_ACTIVE
            and isinstance(transport._tx_buffers, collections.deque)
            and isinstance(transport._tx_buffered_byte_count, int)
            and hasattr(transport._sock, "sendmsg")
            and isinstance(getattr(transport._nbio, "get_native_ioloop", lambda: None)(),
                           asyncio.AbstractEventLoop))


# --- the check of behaviour (crew.seam asks it once per process) ------------------------

@functools.cache
def _internals_problem() -> str | None:
    """What is wrong with the pika internals the fast path uses (None: nothing), checked on
    bare objects: the methods it overrides take what it passes, and the ones it calls
    write where it reads."""
    try:
        return _connection_problem() or _transport_problem()
    except Exception as error:  # noqa: BLE001 - any failure is a failed check
        return f"{error!r}"


def _connection_problem() -> str | None:
    expected = {"_init_connection_state": 0, "_on_data_available": 1, "_process_frame": 1,
                "_output_marshaled_frames": 1}
    for name, arguments in expected.items():
        method = getattr(pika.connection.Connection, name, None)
        if not callable(method) or len(inspect.signature(method).parameters) != arguments + 1:
            return f"pika's Connection.{name} is not what crew overrides"
    sink: list[bytes] = []
    conn = AsyncioConnection.__new__(AsyncioConnection)
    conn.bytes_sent = conn.frames_sent = 0
    conn._transport = type("Sink", (), {"write": staticmethod(sink.append)})()
    conn._output_marshaled_frames([b"ab", b"c"])
    if sink != [b"ab", b"c"] or (conn.bytes_sent, conn.frames_sent) != (3, 2):
        return "pika's Connection._output_marshaled_frames does not write as crew expects"
    return None


def _transport_problem() -> str | None:
    plain = _PlainTransport
    for name in ("_consume", "_buffer_tx_data", "_initiate_abort", "_sigint_safe_recv",
                 "_produce", "write"):
        if not callable(getattr(plain, name, None)):
            return f"pika's plaintext transport has no {name}()"
    if not (isinstance(getattr(plain, "_MAX_RECV_BYTES", None), int)
            and isinstance(getattr(plain, "_MAX_CONSUME_BYTES", None), int)
            and hasattr(plain, "_STATE_ACTIVE")
            and issubclass(getattr(plain, "RxEndOfFile", type), BaseException)):
        return "pika's plaintext transport lacks the constants crew sets or reads"
    bare = plain.__new__(plain)
    bare._state, bare._sock = plain._STATE_ACTIVE, None
    bare._tx_buffers = collections.deque()
    bare._tx_buffered_byte_count = 0
    bare._buffer_tx_data(b"abc")
    if list(bare._tx_buffers) != [b"abc"] or bare._tx_buffered_byte_count != 3:
        return "pika's transport does not buffer as crew expects"
    return None


@functools.cache
def _warn_if_headers_unprotected() -> None:
    """Check once that a content header pika cannot decode reaches crew's codec on the
    public path (through :meth:`PublicConnection._read_frame`); warn if it does not."""
    table = b"\x01tT" + (2**62).to_bytes(8, "big")  # {"t": a timestamp past the year 9999}
    payload = (struct.pack(">HHQH", BasicProperties.INDEX, 0, 0, BasicProperties.FLAG_HEADERS)
               + len(table).to_bytes(4, "big") + table)
    frame = struct.pack(">BHL", pika.spec.FRAME_HEADER, 1, len(payload)) + payload + b"\xce"
    got: list[Any] = []
    try:
        conn = PublicConnection.__new__(PublicConnection)
        conn._frame_buffer = b""
        conn.bytes_received = 0
        conn._process_frame = got.append
        conn._on_data_available(frame)
        if got and got[0].properties.headers == {"t": 2**62}:
            return
    except Exception:  # noqa: BLE001 - reported below
        pass
    log.warning("on this pika, a header timestamp past the year 9999 will close crew's "
                "connections on the public path")
