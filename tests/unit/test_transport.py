"""The fast path's frame reader and coalescing transport against loopback sockets, no broker
(connections to RabbitMQ: tests/broker/test_transport.py)."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import socket
from typing import Any

import pika.exceptions
import pika.frame
import pika.spec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pika.adapters.asyncio_connection import _AsyncioIOServicesAdapter
from pika.adapters.utils import io_services_utils

from crew import transport
from crew.frames import FrameReader
from crew.transport import CoalescingTransport


def _stream() -> tuple[bytes, list[bytes]]:
    """Marshalled frames of every kind, bodies from empty to several frames' worth."""
    rng = random.Random(5)
    props = pika.spec.BasicProperties(correlation_id="c-1", headers={"crew-task": "echo"})
    frames = [
        pika.frame.Method(1, pika.spec.Basic.Deliver("ctag", 7, False, "", "k")).marshal(),
        pika.frame.Header(1, 300_000, props).marshal(),
        pika.frame.Heartbeat().marshal(),
    ]
    for size in (0, 1, 100, 4096, 131_064, 70_000):
        frames.append(pika.frame.Body(2, rng.randbytes(size)).marshal())
    frames.append(pika.frame.Method(3, pika.spec.Basic.Ack(9)).marshal())
    return b"".join(frames), frames


STREAM, FRAMES = _stream()


def _marshal(value: Any) -> bytes:
    return value.marshal()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=40))
def test_frames_split_anywhere_come_out_whole_and_in_order(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    reader = FrameReader()
    decoded: list[Any] = []
    consumed = 0
    for start, end in itertools.pairwise(points):
        if end > start:
            used, frames = reader.feed(STREAM[start:end])
            consumed += used
            decoded.extend(frames)
    assert [_marshal(f) for f in decoded] == FRAMES
    assert consumed == len(STREAM)
    assert reader.buffered == 0


def test_an_incomplete_frame_is_kept_until_its_last_byte_arrives() -> None:
    body = pika.frame.Body(1, os.urandom(50_000)).marshal()
    reader = FrameReader()
    assert reader.feed(body[:3]) == (0, [])  # not even a whole frame header
    assert reader.feed(body[3:-1]) == (0, [])
    assert reader.buffered == len(body) - 1
    used, frames = reader.feed(body[-1:])
    assert used == len(body) and [f.fragment for f in frames] == [body[7:-1]]


def test_a_bad_frame_end_raises_as_pika_does() -> None:
    frame = bytearray(pika.frame.Body(1, b"xyz").marshal())
    frame[-1] = 0
    with pytest.raises(pika.exceptions.InvalidFrameError):
        FrameReader().feed(bytes(frame))
    with pytest.raises(pika.exceptions.InvalidFrameError):
        pika.frame.decode_frame(bytes(frame))


def test_the_brokers_protocol_header_is_read_like_pika() -> None:
    header = b"AMQP\x00\x00\x09\x01"
    used, frames = FrameReader().feed(header[:5])
    assert (used, frames) == (0, [])
    reader = FrameReader()
    used, frames = reader.feed(header)
    assert used == 8 and isinstance(frames[0], pika.frame.ProtocolHeader)


def test_a_peer_that_is_not_a_broker_is_refused_at_once() -> None:
    # An HTTP server's answer read as an AMQP frame header claims a payload of ~800 MB.
    reader = FrameReader()
    with pytest.raises(pika.exceptions.InvalidFrameError, match="frame_max"):
        reader.feed(b"HTTP/1.1 400 Bad Request\r\n")
    reader = FrameReader(max_payload=100)
    assert reader.feed(pika.frame.Body(1, b"x" * 100).marshal())[0] == 108
    with pytest.raises(pika.exceptions.InvalidFrameError):
        reader.feed(pika.frame.Body(1, b"x" * 101).marshal()[:7])


class _Protocol:
    """What pika's transport reports to: records data and the loss of the connection."""

    def __init__(self) -> None:
        self.lost: asyncio.Future[BaseException | None] = \
            asyncio.get_running_loop().create_future()
        self.received = bytearray()
        self.got_data = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.got_data.set()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, error: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(error)


class _CountingSocket:
    """A socket whose sendmsg and recv calls are counted (socket objects take no
    attributes)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sendmsg_calls: list[int] = []
        self.recv_results: list[int | str] = []

    def sendmsg(self, buffers: list[bytes]) -> int:
        self.sendmsg_calls.append(len(buffers))
        return self._sock.sendmsg(buffers)

    def recv(self, size: int) -> bytes:
        try:
            data = self._sock.recv(size)
        except BlockingIOError:
            self.recv_results.append("EAGAIN")
            raise
        self.recv_results.append(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


async def _tuned(sock: Any) -> tuple[Any, _Protocol, list[int]]:
    """pika's plaintext transport on ``sock``, tuned; and the fds it asked to watch."""
    sock.setblocking(False)
    nbio = _AsyncioIOServicesAdapter(asyncio.get_running_loop())
    watched: list[int] = []
    set_writer = nbio.set_writer
    nbio.set_writer = lambda fd, cb: (watched.append(fd), set_writer(fd, cb))[1]
    protocol = _Protocol()
    plain = io_services_utils._AsyncPlaintextTransport(sock, protocol, nbio)
    connection = type("Conn", (), {"_transport": plain})()
    transport.tune(connection)
    return plain, protocol, watched


async def _receive(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < size:
        chunk = await loop.sock_recv(sock, 1 << 20)
        if not chunk:
            break
        got += chunk
    return bytes(got)


@pytest.mark.gen_test(timeout=30)
async def test_writes_of_one_loop_iteration_leave_in_one_sendmsg() -> None:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    counting = _CountingSocket(ours)
    tx, _, watched = await _tuned(counting)
    assert type(tx) is CoalescingTransport
    tx.write(b"method")
    tx.write(b"header")
    tx.write(b"body")
    assert counting.sendmsg_calls == []  # nothing leaves before the loop iteration ends
    assert await _receive(peer, 16) == b"methodheaderbody"
    assert counting.sendmsg_calls == [3]
    assert watched == []  # the socket took it all: no writability watch, no epoll_ctl
    tx.write(b"again")
    assert await _receive(peer, 5) == b"again"
    assert counting.sendmsg_calls == [3, 1]
    tx.abort()
    peer.close()


@pytest.mark.gen_test(timeout=30)
async def test_flush_sends_at_once() -> None:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    counting = _CountingSocket(ours)
    tx, _, _ = await _tuned(counting)
    tx.write(b"reply")
    tx.write(b"ack")
    tx.flush()
    assert counting.sendmsg_calls == [2]  # sent before the loop iteration ends
    assert await _receive(peer, 8) == b"replyack"
    assert counting.sendmsg_calls == [2]  # the end-of-iteration flush found nothing left
    tx.abort()
    peer.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_short_read_ends_the_readiness_event_without_another_recv() -> None:
    ours, peer = socket.socketpair()
    counting = _CountingSocket(ours)
    _, protocol, _ = await _tuned(counting)
    peer.sendall(b"x" * 100)
    await asyncio.wait_for(protocol.got_data.wait(), 10)
    # pika reads on until recv raises EAGAIN; a short read says the socket is drained.
    assert counting.recv_results == [100]
    big = os.urandom(3 * transport.RECV_BYTES + 5)
    peer.setblocking(False)
    await asyncio.get_running_loop().sock_sendall(peer, big)
    while len(protocol.received) < 100 + len(big):
        protocol.got_data.clear()
        await asyncio.wait_for(protocol.got_data.wait(), 10)
    assert bytes(protocol.received) == b"x" * 100 + big
    peer.close()  # the end of the stream still ends the connection
    assert await asyncio.wait_for(protocol.lost, 10) is None


@pytest.mark.gen_test(timeout=60)
async def test_a_full_socket_waits_for_writability_and_loses_nothing() -> None:
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    peer.setblocking(False)
    tx, _, watched = await _tuned(ours)
    pieces = [os.urandom(64 * 1024) for _ in range(2048)]  # far more than IOV_MAX buffers
    for piece in pieces:
        tx.write(piece)
    await asyncio.sleep(0)  # the flush, scheduled first, runs and fills the socket; nobody reads
    assert tx.get_write_buffer_size() > 0
    assert watched  # the rest waits for writability
    expected = b"".join(pieces)
    assert await _receive(peer, len(expected)) == expected
    assert tx.get_write_buffer_size() == 0 and not tx._crew_watching_writes
    tx.abort()
    peer.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_dead_peer_fails_the_connection_instead_of_hanging() -> None:
    ours, peer = socket.socketpair()
    tx, protocol, _ = await _tuned(ours)
    peer.close()
    tx.write(b"x" * 100_000)
    error = await asyncio.wait_for(protocol.lost, 10)
    assert isinstance(error, OSError)


@pytest.mark.gen_test(timeout=30)
async def test_transports_it_does_not_know_keep_their_own_writes() -> None:
    class Other(io_services_utils._AsyncPlaintextTransport):
        pass

    ours, peer = socket.socketpair()
    ours.setblocking(False)
    nbio = _AsyncioIOServicesAdapter(asyncio.get_running_loop())
    other = Other(ours, _Protocol(), nbio)
    transport.tune(type("Conn", (), {"_transport": other})())
    assert type(other) is Other  # e.g. pika's TLS transport: only the reads are widened
    assert other._MAX_RECV_BYTES == transport.RECV_BYTES
    other.abort()
    peer.close()


class _SocketWithoutSendmsg:
    """A socket as some platforms have it: no sendmsg."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def __getattr__(self, name: str) -> Any:
        if name == "sendmsg":
            raise AttributeError(name)
        return getattr(self._sock, name)


@pytest.mark.gen_test(timeout=30)
async def test_a_socket_without_sendmsg_keeps_pikas_writes() -> None:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    tx, _, _ = await _tuned(_SocketWithoutSendmsg(ours))
    assert type(tx) is io_services_utils._AsyncPlaintextTransport
    tx.write(b"still works")
    assert await _receive(peer, 11) == b"still works"
    tx.abort()
    peer.close()


@pytest.mark.gen_test(timeout=30)
async def test_bytes_pika_left_unsent_before_tuning_still_go_out() -> None:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    nbio = _AsyncioIOServicesAdapter(asyncio.get_running_loop())
    plain = io_services_utils._AsyncPlaintextTransport(ours, _Protocol(), nbio)
    plain.write(b"pika's own")  # buffered, the socket watched by pika's method
    transport.tune(type("Conn", (), {"_transport": plain})())
    assert await _receive(peer, 10) == b"pika's own"
    assert not plain._crew_watching_writes
    plain.write(b" and ours")  # must be flushed: the flag was cleared by crew's method
    assert await _receive(peer, 9) == b" and ours"
    plain.abort()
    peer.close()


# --- sends from another thread (a worker's job thread answering a lone call) ------------

def _lock(tx: Any) -> Any:
    return tx._crew_lock


async def _send_from_thread(tx: Any, frames: list[bytes]) -> bool:
    """``tx.send_now(frames)`` from a thread of its own, with the send lock held there."""
    def send() -> bool:
        with _lock(tx):
            return tx.send_now(frames)
    return await asyncio.to_thread(send)


@pytest.mark.gen_test(timeout=30)
async def test_a_thread_sends_at_once_when_nothing_waits() -> None:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    counting = _CountingSocket(ours)
    tx, _, watched = await _tuned(counting)
    assert await _send_from_thread(tx, [b"reply", b"ack"])
    assert counting.sendmsg_calls == [2]  # sent by the thread itself, in one sendmsg
    assert await _receive(peer, 8) == b"replyack"
    assert counting.sendmsg_calls == [2] and watched == [] and not tx._tx_buffers
    tx.abort()
    peer.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_threads_frames_queue_behind_bytes_that_wait() -> None:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    counting = _CountingSocket(ours)
    tx, _, _ = await _tuned(counting)
    tx.write(b"first")  # buffered until the end of this loop iteration
    with _lock(tx):  # as a thread would, but before the loop can run its flush
        assert tx.send_now([b"second", b"third"])
    assert counting.sendmsg_calls == []  # not ahead of what waited
    assert await _receive(peer, 16) == b"firstsecondthird"
    assert counting.sendmsg_calls == [3]
    tx.abort()
    peer.close()


@pytest.mark.gen_test(timeout=60)
async def test_what_a_full_socket_did_not_take_from_a_thread_is_sent_by_the_loop() -> None:
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    peer.setblocking(False)
    tx, _, watched = await _tuned(ours)
    frames = [os.urandom(1024 * 1024) for _ in range(4)]
    assert await _send_from_thread(tx, frames)
    assert tx._tx_buffers  # the socket took part; the rest waits for the loop
    expected = b"".join(frames)
    assert await _receive(peer, len(expected)) == expected
    assert watched  # the loop watched for writability, which only it may do
    assert not tx._tx_buffers and not tx._crew_watching_writes
    tx.abort()
    peer.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_thread_buffers_what_a_full_socket_left_before_it_asks_the_loop_to_flush(
) -> None:
    # The loop's flush looks at the buffer before it takes the send lock: asked first, it
    # could find it empty, send nothing and watch nothing, and the rest would wait for the
    # connection's next write (a heartbeat, a minute later).
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    peer.setblocking(False)
    tx, _, _ = await _tuned(ours)
    loop = tx._crew_loop
    buffered_when_asked: list[int] = []

    class Loop:
        def call_soon_threadsafe(self, callback: Any, *args: Any) -> Any:
            buffered_when_asked.append(sum(map(len, tx._tx_buffers)))
            return loop.call_soon_threadsafe(callback, *args)

    tx._crew_loop = Loop()
    frames = [os.urandom(1024 * 1024) for _ in range(4)]
    assert await _send_from_thread(tx, frames)
    tx._crew_loop = loop
    assert len(buffered_when_asked) == 1 and buffered_when_asked[0] > 0
    expected = b"".join(frames)
    assert await _receive(peer, len(expected)) == expected
    tx.abort()
    peer.close()


@pytest.mark.gen_test(timeout=60)
async def test_the_loop_turns_the_writability_watch_on_and_off_under_the_send_lock() -> None:
    # A thread that finds the watch on queues its frames behind the waiting bytes: were the
    # watch turned off between the loop's last send and that check, they would wait there
    # for the loop's next write, with no flush and no watch to send them.
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    peer.setblocking(False)
    tx, _, _ = await _tuned(ours)
    held: list[bool] = []
    nbio = tx._nbio
    set_writer, remove_writer = nbio.set_writer, nbio.remove_writer
    nbio.set_writer = lambda fd, cb: (held.append(_lock(tx)._is_owned()), set_writer(fd, cb))[1]
    nbio.remove_writer = lambda fd: (held.append(_lock(tx)._is_owned()), remove_writer(fd))[1]
    data = os.urandom(4 * 1024 * 1024)
    tx.write(data)
    assert await _receive(peer, len(data)) == data
    assert held == [True, True]  # on when the socket filled, off once it took the rest
    tx.abort()
    peer.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_closed_transport_refuses_a_threads_send() -> None:
    ours, peer = socket.socketpair()
    tx, _, _ = await _tuned(ours)
    tx.abort()
    assert not await _send_from_thread(tx, [b"late"])
    peer.close()
