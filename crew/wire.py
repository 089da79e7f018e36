"""A lean codec for the frames every call and reply is made of (internal).

pika's frame codec is general and pure Python: encoding a call's content header takes it
some 40 function calls (a ``struct.pack`` per field, a table encoder walking a chain of
``isinstance`` tests per header), decoding one about as many again, and a call is encoded
and decoded twice (the call, then its reply): about a tenth of a worker's CPU per call
(docs/BENCHMARKS.md, the ``pikacodec`` experiment). This module does the same work in
fewer steps for the frames of crew's hot path: ``Basic.Publish`` with its content header
and body, ``Basic.Ack``, and, on the way in, content headers and ``Basic.Deliver``.

It produces exactly pika's bytes and pika's objects. What it reads it reads as pika does,
step for step, truncated and malformed bytes included; what it does not know it leaves to
pika's own codec, which then does what pika does, with the same bytes, the same objects
and the same errors: a property or header value of another kind (decimals, floats,
``pika.compat.long`` on the way out, 64-bit integers below zero), another frame, a flag
word pika would read on from. It uses only pika's public API (the attributes of
``BasicProperties``, the public functions of ``pika.frame``, ``pika.spec`` and
``pika.data``), and **any** exception it meets, an expected one or one raised because
pika's objects changed shape, leaves the frame to pika's codec: a change in pika makes
crew slower, never wrong. tests/unit/test_wire.py checks both directions against pika byte
for byte and field for field, over generated input and edge cases.

One difference from pika, on purpose: content headers' tables are read by
:func:`crew.tables.decode_table`, which keeps a timestamp past the year 9999 an int.
"""

from __future__ import annotations

import struct
from typing import Any

import pika.compat
import pika.data
import pika.frame
import pika.spec
from pika.spec import Basic, BasicProperties

from . import tables

__all__ = ["ack_frame", "decode", "publish_frames"]

_END = bytes([pika.spec.FRAME_END])
_FRAME = struct.Struct(">BHL")  # frame type, channel, payload size
_FRAME_SIZE = _FRAME.size  # 7
_HEADER = struct.Struct(">BHLHHQH")  # _FRAME, then class id, weight, body size, flags
_HEADER_START = struct.Struct(">HHQH")  # a content header's payload up to its properties
_ACK = struct.Struct(">BHLLQB")  # _FRAME, method id, delivery tag, bits: all but the end
_PUBLISH_TICKET = b"\x00\x00"  # Basic.Publish's reserved ticket field
_U32 = struct.Struct(">L")
_U64 = struct.Struct(">Q")
_STRING = struct.Struct(">cL")  # a table's long string (S) or byte array (x): kind, length
_INT = struct.Struct(">ci")  # a table's signed 32-bit integer (I)
_LONG = struct.Struct(">cq")  # a table's signed 64-bit integer (l)
_OCTETS = [bytes([n]) for n in range(256)]
_PUBLISH_INDEX = _U32.pack(Basic.Publish.INDEX)
_DELIVER_INDEX = _U32.pack(Basic.Deliver.INDEX)
_BODY_ROOM = pika.spec.FRAME_HEADER_SIZE + pika.spec.FRAME_END_SIZE

# The content header's properties in wire order: (flag, attribute, kind).
_SHORT, _TABLE, _OCTET, _TIMESTAMP = range(4)
_PROPERTIES = (
    (BasicProperties.FLAG_CONTENT_TYPE, "content_type", _SHORT),
    (BasicProperties.FLAG_CONTENT_ENCODING, "content_encoding", _SHORT),
    (BasicProperties.FLAG_HEADERS, "headers", _TABLE),
    (BasicProperties.FLAG_DELIVERY_MODE, "delivery_mode", _OCTET),
    (BasicProperties.FLAG_PRIORITY, "priority", _OCTET),
    (BasicProperties.FLAG_CORRELATION_ID, "correlation_id", _SHORT),
    (BasicProperties.FLAG_REPLY_TO, "reply_to", _SHORT),
    (BasicProperties.FLAG_EXPIRATION, "expiration", _SHORT),
    (BasicProperties.FLAG_MESSAGE_ID, "message_id", _SHORT),
    (BasicProperties.FLAG_TIMESTAMP, "timestamp", _TIMESTAMP),
    (BasicProperties.FLAG_TYPE, "type", _SHORT),
    (BasicProperties.FLAG_USER_ID, "user_id", _SHORT),
    (BasicProperties.FLAG_APP_ID, "app_id", _SHORT),
    (BasicProperties.FLAG_CLUSTER_ID, "cluster_id", _SHORT),
)
_KNOWN_FLAGS = sum(flag for flag, _, _ in _PROPERTIES)


class _PikasCase(Exception):
    """What the lean codec leaves to pika's."""


# --- out --------------------------------------------------------------------------------

def publish_frames(channel: int, exchange: str, routing_key: str, mandatory: bool,
                   properties: BasicProperties, body: bytes, frame_max: int) -> list[bytes]:
    """The frames of a ``Basic.Publish`` of ``body``, as pika's ``basic_publish`` makes
    them: the method, the content header, and the body cut to fit ``frame_max``. Raises
    what pika raises for what it cannot encode."""
    try:
        frames = [_publish_method(channel, exchange, routing_key, mandatory),
                  _content_header(channel, len(body), properties)]
    # Caught broadly: what the lean codec does not know, and anything a change in pika's
    # objects breaks here, is pika's codec's to encode (the same bytes, or pika's error).
    except Exception:  # noqa: BLE001
        frames = [pika.frame.Method(channel, Basic.Publish(
                      exchange=exchange, routing_key=routing_key, mandatory=mandatory)
                  ).marshal(),
                  pika.frame.Header(channel, len(body), properties).marshal()]
    room = frame_max - _BODY_ROOM
    if len(body) <= room:
        if body:
            frames.append(_FRAME.pack(pika.spec.FRAME_BODY, channel, len(body)) + body + _END)
        return frames
    view = memoryview(body)
    for start in range(0, len(body), room):
        chunk = view[start:start + room]
        frames.append(b"".join((_FRAME.pack(pika.spec.FRAME_BODY, channel, len(chunk)),
                                chunk, _END)))
    return frames


def ack_frame(channel: int, delivery_tag: int) -> bytes:
    """A ``Basic.Ack`` of one delivery, as pika's ``basic_ack`` makes it."""
    try:
        return _ACK.pack(pika.spec.FRAME_METHOD, channel, _ACK.size - _FRAME_SIZE,
                         Basic.Ack.INDEX, delivery_tag, 0) + _END
    except Exception:  # noqa: BLE001 - pika's codec decides (a tag out of range: its error)
        marshaled: bytes = pika.frame.Method(channel, Basic.Ack(delivery_tag)).marshal()
        return marshaled


def _short(value: Any) -> bytes:
    """A short string's octets (length first)."""
    if type(value) is str:
        raw = value.encode()
    elif type(value) is bytes:
        raw = value
    else:
        raise _PikasCase
    return _OCTETS[len(raw)] + raw  # IndexError past 255 octets: pika's ShortStringTooLong


def _publish_method(channel: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    payload = b"".join((_PUBLISH_INDEX, _PUBLISH_TICKET, _short(exchange), _short(routing_key),
                        b"\x01" if mandatory else b"\x00"))
    return _FRAME.pack(pika.spec.FRAME_METHOD, channel, len(payload)) + payload + _END


def _content_header(channel: int, body_size: int, properties: BasicProperties) -> bytes:
    if type(properties) is not BasicProperties:
        raise _PikasCase
    flags = 0
    pieces = []
    for flag, name, kind in _PROPERTIES:
        value = getattr(properties, name)
        if value is None:
            continue
        flags |= flag
        if kind == _SHORT:
            pieces.append(_short(value))
        elif kind == _TABLE:
            pieces.append(_table(value))
        elif type(value) is not int:
            raise _PikasCase
        elif kind == _OCTET:
            if not 0 <= value <= 255:
                raise _PikasCase  # pika's struct.error
            pieces.append(_OCTETS[value])
        else:
            pieces.append(_U64.pack(value))
    payload = b"".join(pieces)
    return _HEADER.pack(pika.spec.FRAME_HEADER, channel,
                        _HEADER.size - _FRAME_SIZE + len(payload),
                        BasicProperties.INDEX, 0, body_size, flags) + payload + _END


def _table(table: Any) -> bytes:
    """An AMQP field table (length first), values of the kinds crew sends encoded here and
    any other by pika's ``encode_value``."""
    if type(table) is not dict:
        raise _PikasCase
    pieces: list[bytes] = []
    for key, value in table.items():
        pieces.append(_short(key))
        kind = type(value)
        if kind is str:
            raw = value.encode()
            pieces.append(_STRING.pack(b"S", len(raw)))
            pieces.append(raw)
        elif kind is int and -0x80000000 <= value:
            # pika: I when it fits 32 bits, else l; pika.compat.long is always l, and a
            # 64-bit value below zero is L before pika 1.4 (both left to pika, below).
            pieces.append(_INT.pack(b"I", value) if value <= 0x7FFFFFFF
                          else _LONG.pack(b"l", value))
        elif kind is bytes:
            pieces.append(_STRING.pack(b"x", len(value)))
            pieces.append(value)
        elif kind is bool:
            pieces.append(b"t\x01" if value else b"t\x00")
        else:
            pika.data.encode_value(pieces, value)
    payload = b"".join(pieces)
    return _U32.pack(len(payload)) + payload


# --- in ---------------------------------------------------------------------------------

def decode(buffer: bytes, offset: int, end: int) -> Any | None:
    """The frame ``buffer[offset:end]`` as pika's ``decode_frame`` makes it, if it is a body,
    a content header or a ``Basic.Deliver`` that this codec reads; None leaves the frame to
    pika's ``decode_frame`` (any other frame, a value of another kind, bytes that cannot be
    read without an error, which pika then raises)."""
    if end - offset < _FRAME_SIZE + 1 or buffer[end - 1] != pika.spec.FRAME_END:
        return None  # pika raises its InvalidFrameError
    kind, channel, _size = _FRAME.unpack_from(buffer, offset)
    start = offset + _FRAME_SIZE
    if kind == pika.spec.FRAME_BODY:
        # The payload is sliced once; pika would slice the frame, then the payload.
        return pika.frame.Body(channel, buffer[start:end - 1])
    try:
        if kind == pika.spec.FRAME_HEADER:
            return _decode_header(channel, buffer[start:end - 1])
        if kind == pika.spec.FRAME_METHOD and buffer[start:start + 4] == _DELIVER_INDEX:
            return pika.frame.Method(channel, _decode_deliver(buffer[start:end - 1]))
    # Caught broadly: bytes pika reads in its own way or raises for, and anything a change
    # in pika's objects breaks here, are pika's to decode.
    except Exception:  # noqa: BLE001
        pass
    return None


def _decode_header(channel: int, payload: bytes) -> pika.frame.Header:
    class_id, _weight, body_size, flags = _HEADER_START.unpack_from(payload, 0)
    if class_id != BasicProperties.INDEX or flags & ~_KNOWN_FLAGS:
        raise _PikasCase  # another class, or a flag word pika would read on
    properties = BasicProperties()
    offset = _HEADER_START.size
    value: Any
    for flag, name, kind in _PROPERTIES:
        if not flags & flag:
            continue
        if kind == _SHORT:
            value, offset = tables.read_short(payload, offset)
        elif kind == _TABLE:
            value, offset = tables.decode_table(payload, offset)
        elif kind == _OCTET:
            value = payload[offset]
            offset += 1
        else:
            value = _U64.unpack_from(payload, offset)[0]
            offset += 8
        setattr(properties, name, value)
    return pika.frame.Header(channel, body_size, properties)


def _decode_deliver(payload: bytes) -> Any:
    consumer_tag, offset = tables.read_short(payload, 4)
    delivery_tag, = _U64.unpack_from(payload, offset)
    redelivered = bool(payload[offset + 8] & 1)
    exchange, offset = tables.read_short(payload, offset + 9)
    routing_key, offset = tables.read_short(payload, offset)
    return Basic.Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key)
