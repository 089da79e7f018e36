"""AMQP field tables (message headers) as crew reads them (internal).

:func:`decode_table` reads a table as pika's ``pika.data.decode_table`` does, values of
the same types included, with one difference on purpose: a timestamp that Python cannot
represent (past the year 9999) stays an int of epoch seconds. pika raises on it while it
parses a frame, which kills the connection; the broker passes the header through and
redelivers the call, so one forged message would take a worker down again and again. The
same holds for tables and arrays nested thousands deep (the broker passes them through; a
content header frame holds some 26 000 levels): pika's recursive reader raises
``RecursionError``. crew reads :data:`MAX_DEPTH` levels, and keeps a table or array nested
deeper as the bytes it was sent as (its kind octet, its length, its contents), logged once
per table read. On pika's public path (:mod:`crew.transport`) pika reads first, so there a
value nested deeper than MAX_DEPTH but not so deep that pika fails is pika's nested value.

It replaces crew's former process-wide patch of ``pika.data.decode_value``: it applies
only where crew decodes frames (:mod:`crew.wire`'s content headers, on the fast path and,
when pika's own decoding raised, on the public path: see :mod:`crew.transport`), never to
pika elsewhere in the process. The kinds crew sends (strings, bytes, 32- and 64-bit
integers, booleans) are read here; tables and arrays are walked here too, so that their
timestamps are read the same way; every other kind is read by pika's public
``pika.data.decode_value``, so its quirks of each version (``b`` and ``B`` swapped before
1.4) stay pika's.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import pika.compat
import pika.data

__all__ = ["MAX_DEPTH", "decode_table", "decode_value", "read_short", "text"]

log = logging.getLogger(__name__)

#: Tables and arrays read inside one another at most; deeper ones stay bytes (see above).
#: Far more than any header crew or a program of its users writes; far fewer than the
#: Python stack holds, whatever reads the values afterwards.
MAX_DEPTH = 64

_U32 = struct.Struct(">L")
_U64 = struct.Struct(">Q")
_INT = struct.Struct(">ci")  # a table's signed 32-bit integer (I)
_LONG = struct.Struct(">cq")  # a signed 64-bit integer (l and L since pika 1.4)
_ULONG = struct.Struct(">cQ")  # l before pika 1.4


def _long_reader(kind: bytes) -> struct.Struct | None:
    """How this pika reads a 64-bit table integer of ``kind`` (``l`` or ``L``): signed since
    pika 1.4, ``l`` unsigned before. Asked of pika once; None leaves the kind to pika."""
    try:
        value = pika.data.decode_value(kind + b"\xff" * 8, 0)[0]
    except Exception:  # noqa: BLE001 - pika changed: let it read these itself
        return None
    if type(value) is not pika.compat.long:
        return None
    return {-1: _LONG, 2**64 - 1: _ULONG}.get(value)


_LONG_READERS = {ord(kind): _long_reader(kind) for kind in (b"l", b"L")}


def text(raw: bytes) -> str | bytes:
    """What pika makes of a string's octets: text if they are UTF-8, else the bytes."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


def read_short(data: bytes, offset: int) -> tuple[str | bytes, int]:
    end = offset + 1 + data[offset]
    return text(data[offset + 1:end]), end


def decode_table(data: bytes, offset: int, depth: int = 0,
                 cut: list[int] | None = None) -> tuple[dict[Any, Any], int]:
    """The field table at ``offset`` (its length first) and the offset after it, as pika's
    ``decode_table`` reads it, except for timestamps past the year 9999 (ints) and values
    nested deeper than :data:`MAX_DEPTH` (bytes; see the module's docstring). Raises on
    bytes pika would raise for. For nested tables, ``depth`` and ``cut`` (sizes kept)."""
    if cut is None:  # the outermost table: what it cut is logged once, here
        cut = []
        outer, end = decode_table(data, offset, depth, cut)
        if cut:
            log.warning("a header table with %d value(s) nested deeper than %d tables and "
                        "arrays, kept as bytes (%d in all): a forged message?", len(cut),
                        MAX_DEPTH, sum(cut))
        return outer, end
    size, = _U32.unpack_from(data, offset)
    offset += 4
    limit = offset + size
    table: dict[Any, Any] = {}
    value: Any
    while offset < limit:
        key, offset = read_short(data, offset)
        kind = data[offset]
        if kind == 0x53 or kind == 0x78:  # S (text) or x (bytes): a length, then octets
            length, = _U32.unpack_from(data, offset + 1)
            start = offset + 5
            offset = start + length
            value = text(data[start:offset]) if kind == 0x53 else data[start:offset]
        elif kind == 0x49:  # I
            value = _INT.unpack_from(data, offset)[1]
            offset += 5
        elif kind == 0x74:  # t
            value = data[offset + 1] != 0
            offset += 2
        elif (reader := _LONG_READERS.get(kind)) is not None:  # l, L: pika.compat.long
            value = pika.compat.long(reader.unpack_from(data, offset)[1])
            offset += 9
        else:
            value, offset = decode_value(data, offset, depth, cut)
        table[key] = value
    return table, offset


def decode_value(data: bytes, offset: int, depth: int = 0,
                 cut: list[int] | None = None) -> tuple[Any, int]:
    """The field value at ``offset`` (its kind first) and the offset after it: pika's
    ``decode_value``, except that crew reads nested tables and arrays itself (so that their
    timestamps are read as :func:`decode_table` reads them, and a table or array nested
    deeper than :data:`MAX_DEPTH` stays bytes) and keeps a timestamp past the year 9999 an
    int. ``depth``: how deep the table or array holding the value is; ``cut``, as for
    :func:`decode_table` (None: this value is the outermost)."""
    kind = data[offset:offset + 1]
    if kind == b"F" or kind == b"A":
        if depth >= MAX_DEPTH:
            end = offset + 5 + _U32.unpack_from(data, offset + 1)[0]
            if end > len(data):
                raise IndexError("a table or array longer than the bytes that hold it")
            if cut is not None:
                cut.append(end - offset)
            return data[offset:end], end
        if kind == b"F":
            return decode_table(data, offset + 1, depth + 1, cut)
        length, = _U32.unpack_from(data, offset + 1)
        offset += 5
        end = offset + length
        values = []
        while offset < end:
            value, offset = decode_value(data, offset, depth + 1, cut)
            values.append(value)
        return values, offset
    try:
        decoded: tuple[Any, int] = pika.data.decode_value(data, offset)
        return decoded
    except (OverflowError, OSError, ValueError):
        if kind != b"T":
            raise
        return _U64.unpack_from(data, offset + 1)[0], offset + 9
