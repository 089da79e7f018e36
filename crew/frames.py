"""Splitting the bytes of an AMQP connection into frames, copying each byte once (internal).

pika reads its socket 4 KiB at a time and appends each read to a ``bytes`` frame buffer,
then cuts every parsed frame off the front of it: a 128 KiB body frame is copied about 32
times while it arrives, and a read holding hundreds of small frames is copied once per
frame. :class:`FrameReader` keeps received chunks in a list until the frame under way is
complete, joins them once and parses frames at an offset. It is pure: it uses pika's
public frame classes and ``decode_frame`` only, and the connection class that feeds it,
which does touch pika's internals, lives in :mod:`crew.transport` (the fast path).

Frames are decoded by :func:`decode_frame`: crew's codec (:mod:`crew.wire`) first, pika's
for what crew's leaves to it; and where pika raises on a content header, crew's codec is
asked again, so that a header pika cannot read but crew can (a timestamp past the year
9999, see :mod:`crew.tables`) does not close the connection.
"""

from __future__ import annotations

import struct
from typing import Any

import pika.exceptions
import pika.frame
import pika.spec

from . import wire

_HEADER = struct.Struct(">BHL")  # frame type, channel, payload size
_HEADER_SIZE = _HEADER.size  # 7
_PROTOCOL_HEADER = b"AMQP"  # the broker's 8-byte protocol header (version mismatch only)


def frame_size(buffer: bytes | memoryview, offset: int, max_payload: int) -> int:
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
    payload: int = _HEADER.unpack_from(buffer, offset)[2]
    if payload > max_payload:
        raise pika.exceptions.InvalidFrameError(
            f"frame of {payload} bytes, more than the frame_max of {max_payload}: "
            "is this port an AMQP broker?")
    return _HEADER_SIZE + payload + 1


def decode_frame(buffer: bytes, offset: int = 0, end: int | None = None,
                 lean: bool = True) -> Any:
    """The complete frame ``buffer[offset:end]``, as pika's ``decode_frame`` makes it, but
    by crew's codec first if ``lean``; raises what pika raises, unless crew's codec can
    read a content header that pika cannot (see the module's docstring)."""
    end = len(buffer) if end is None else end
    if lean and (frame := wire.decode(buffer, offset, end)) is not None:
        return frame
    whole = buffer if offset == 0 and end == len(buffer) else buffer[offset:end]
    try:
        return pika.frame.decode_frame(whole)[1]
    except Exception:
        if whole[:1] == bytes([pika.spec.FRAME_HEADER]) and (
                frame := wire.decode(whole, 0, len(whole))) is not None:
            return frame
        raise


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
        while (end := offset + frame_size(buffer, offset, self._max_payload)) <= len(buffer):
            frames.append(decode_frame(buffer, offset, end))
            offset = end
        # The rest (the head of the next frame) is kept as a view: no copy until it is joined.
        rest = memoryview(buffer)[offset:] if offset < len(buffer) else b""
        self._chunks = [rest] if rest else []
        self._buffered = len(rest)
        self._needed = frame_size(rest, 0, self._max_payload) if rest else 0
        return offset, frames
