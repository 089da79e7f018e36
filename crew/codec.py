"""Bodies on the wire: msgpack or JSON, optionally gzip, with hard size limits.

msgpack is the default; JSON is understood both ways so that programs in other languages can
call tasks. Nothing here can run code from a message: msgpack extension types are refused
(except msgpack's own timestamp, type -1, which msgpack decodes itself into an inert
``msgpack.Timestamp``) and pickle is not supported. Map keys must be strings (or bytes):
msgpack's ``strict_map_key`` keeps attacker-chosen integer keys, whose hashes collide at
will, out of dictionaries. gzip is real gzip (RFC 1952), labelled ``content_encoding: gzip``.
Decompression runs in steps and stops at :data:`~crew.protocol.MAX_DECOMPRESSED_BYTES`, so a
gzip bomb costs little more memory than that. Every failure to read a body is a
:class:`~crew.CodecError`, whatever the bytes.

The memory of the *decoded* value is bounded by :mod:`crew.budget`: Python objects are
larger than their encoding (an empty msgpack array is one byte and a 56-byte list), and a
body whose containers would take more than 16 times its size plus 1 MiB is refused with
:class:`~crew.DecodeError` while it is decoded; nothing decodes into more than 32 times its
size plus 1 MiB. See ``docs/SECURITY.md`` §4.
"""

from __future__ import annotations

import json
import math
import traceback as _traceback
import zlib
from typing import Any, Callable, NoReturn

import msgpack

from . import budget, protocol
from .exceptions import DecodeError, EncodeError, MessageTooLargeError

__all__ = ["decode", "encode", "error_envelope", "parse_error_envelope"]

#: zlib level for gzip: level 1 compresses text almost as well as 6 at several times the speed.
GZIP_LEVEL = 1
#: Bytes of a large body compressed on trial to see whether gzip pays.
_SAMPLE_BYTES = 8 * 1024
#: A sample must shrink below this ratio for the whole body to be compressed.
_WORTHWHILE_RATIO = 0.9
#: wbits for zlib that mean "gzip container".
_GZIP_WBITS = 31
#: Most bytes inflated per step: what a gzip bomb can cost beyond the limit.
_INFLATE_STEP = 1024 * 1024
#: Longest message or traceback kept in an envelope that could not be encoded as it was.
_MAX_ENVELOPE_TEXT = 64 * 1024
#: Bodies this small skip the decode budget (read here: the hot path is one comparison).
_UNCOUNTED_BYTES = budget.UNCOUNTED_BYTES


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise DecodeError(f"msgpack extension type {code} is not accepted")


def _refuse_constant(name: str) -> NoReturn:
    raise DecodeError(f"JSON constant {name} is not accepted (crew never sends it)")


def _finite_float(text: str) -> float:
    """JSON numbers such as ``1e400`` overflow to infinity, which crew refuses like NaN."""
    value = float(text)
    if not math.isfinite(value):
        raise DecodeError(f"JSON number {text[:40]} is out of the float64 range")
    return value


def _serialize(value: Any, content_type: str) -> bytes:
    try:
        if content_type == protocol.MSGPACK:
            packed: bytes = msgpack.packb(value, use_bin_type=True)
            return packed
        if content_type == protocol.JSON:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                              allow_nan=False).encode()
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(
            f"cannot encode {type(value).__name__} as {content_type}: {exc}") from None
    raise EncodeError(f"unknown content type {content_type!r}")


def _worth_compressing(data: bytes) -> bool:
    """Compress two small samples; random or already compressed data does not shrink."""
    middle = len(data) // 2
    for start in (0, middle):
        sample = data[start:start + _SAMPLE_BYTES]
        if len(zlib.compress(sample, GZIP_LEVEL)) > _WORTHWHILE_RATIO * len(sample):
            return False
    return True


def gzip_compress(data: bytes) -> bytes:
    """Real gzip (RFC 1952) at :data:`GZIP_LEVEL`."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
    return compressor.compress(data) + compressor.flush()


def gzip_decompress(data: bytes | bytearray,
                    limit: int = protocol.MAX_DECOMPRESSED_BYTES) -> bytearray:
    """Decompress gzip, refusing output beyond ``limit`` bytes and truncated or corrupt input.

    Inflates at most :data:`_INFLATE_STEP` bytes at a time and stops as soon as the output
    would pass ``limit``: a bomb costs at most ``limit``, the output buffer's growth reserve
    (an eighth) and one step. (A single ``decompress(data, limit + 1)`` call is bounded too,
    but CPython assembles its output from blocks and then copies it: twice the limit.)
    """
    decompressor = zlib.decompressobj(_GZIP_WBITS)
    out = bytearray()
    pending = data
    try:
        while not decompressor.eof:
            step = decompressor.decompress(pending, _INFLATE_STEP)
            if len(out) + len(step) > limit:
                raise MessageTooLargeError(f"gzip body decompresses to more than {limit} bytes")
            out += step
            pending = decompressor.unconsumed_tail
            if not step and not pending:
                break  # input exhausted before the end of the gzip member
    except zlib.error as exc:
        raise DecodeError(f"corrupt gzip body: {exc}") from None
    if not decompressor.eof:
        raise DecodeError("truncated gzip body")
    if decompressor.unused_data:
        raise DecodeError("data after the end of the gzip body (one gzip member only)")
    return out


def encode(value: Any, content_type: str = protocol.MSGPACK, gzip: bool | None = None,
           threshold: int = protocol.GZIP_THRESHOLD) -> tuple[bytes, str | None]:
    """Serialize ``value``; return the body and its content encoding (``"gzip"`` or None).

    ``gzip=None`` compresses bodies of at least ``threshold`` bytes when a sample shows that
    it pays; True and False force it on or off. The three steps are public for a caller
    that compresses elsewhere (the client, off its event loop).
    """
    body = serialize(value, content_type)
    if should_gzip(body, gzip, threshold):
        return gzip_body(body), protocol.GZIP
    return check_wire_size(body), None


def serialize(value: Any, content_type: str = protocol.MSGPACK) -> bytes:
    """``value`` in ``content_type``, uncompressed; refused if no receiver would inflate it."""
    body = _serialize(value, content_type)
    if len(body) > protocol.MAX_DECOMPRESSED_BYTES:
        # Compressed, it might fit on the wire, but the receiver would refuse to inflate it.
        raise MessageTooLargeError(
            f"encoded body is {len(body)} bytes, more than the limit of "
            f"{protocol.MAX_DECOMPRESSED_BYTES} before compression")
    return body


def should_gzip(body: bytes, gzip: bool | None,
                threshold: int = protocol.GZIP_THRESHOLD) -> bool:
    """Whether :func:`encode` would compress ``body`` (see there for ``gzip``)."""
    if gzip is not None:
        return bool(gzip)
    return len(body) >= threshold and _worth_compressing(body)


def gzip_body(body: bytes) -> bytes:
    """``body`` compressed with :func:`gzip_compress`, within the size limit of the wire."""
    return check_wire_size(gzip_compress(body))


def check_wire_size(body: bytes) -> bytes:
    """``body``, unless it is over :data:`~crew.protocol.MAX_BODY_BYTES`."""
    if len(body) > protocol.MAX_BODY_BYTES:
        raise MessageTooLargeError(
            f"encoded body is {len(body)} bytes, more than the limit of {protocol.MAX_BODY_BYTES}"
            " (RabbitMQ 4.x's default max_message_size is also 16 MiB; 3.x's is 128 MiB)"
        )
    return body


def decode(body: bytes | bytearray, content_type: str | None,
           content_encoding: str | None = None) -> Any:
    """Turn a received body back into a value, or raise a :class:`~crew.CodecError`.

    ``content_type`` and ``content_encoding`` are taken as they arrived: pika hands over a
    property that is not UTF-8 as ``bytes``, which is refused like any unknown name. The
    value is made of ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes`` (msgpack
    only), ``list``, ``dict`` and ``msgpack.Timestamp``: nothing the sender chose the class of.
    """
    if len(body) > protocol.MAX_BODY_BYTES:
        raise MessageTooLargeError(
            f"body is {len(body)} bytes, more than the limit of {protocol.MAX_BODY_BYTES}"
            " (RabbitMQ 4.x's default max_message_size is also 16 MiB; 3.x's is 128 MiB)"
        )
    kind = protocol.CONTENT_TYPES.get(content_type or "")
    if kind is None:
        raise DecodeError(f"unsupported content type {content_type!r}")
    if content_encoding == protocol.GZIP:
        # The declared size bounds what the worker reserved for this call (decode_memory).
        body = gzip_decompress(body, min(gzip_declared_size(body),
                                         protocol.MAX_DECOMPRESSED_BYTES))
    elif content_encoding not in (None, "", "identity"):
        raise DecodeError(f"unsupported content encoding {content_encoding!r}")
    try:
        if kind == protocol.MSGPACK:
            return _unpack(body)
        return _load_json(body)
    except DecodeError:
        raise
    except RecursionError:
        raise DecodeError(f"malformed {kind} body: nested too deep") from None
    except (ValueError, TypeError) as exc:
        # msgpack raises ExtraData, FormatError, StackError (all ValueError), UnicodeDecodeError
        # and TypeError (unhashable map keys); json raises ValueError (and RecursionError).
        if isinstance(exc, msgpack.StackError):
            raise DecodeError(f"malformed {kind} body: nested too deep") from None
        raise DecodeError(f"malformed {kind} body: {type(exc).__name__}: {exc}") from None


def _unpack(body: bytes | bytearray) -> Any:
    """msgpack, within the decode budget (:mod:`crew.budget`) when it could exceed it."""
    if len(body) <= _UNCOUNTED_BYTES or not budget.msgpack_needs_meter(body):
        return msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    meter = budget.Meter.for_msgpack(body)
    return msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext,
                           list_hook=meter.on_list, object_hook=meter.on_dict)


def _load_json(body: bytes | bytearray) -> Any:
    """JSON, within the decode budget (:mod:`crew.budget`) when it could exceed it."""
    if len(body) <= _UNCOUNTED_BYTES or not budget.json_needs_meter(body):
        return json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    meter = budget.Meter.for_json(body)
    return json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float,
                      object_hook=meter.on_dict)


def gzip_declared_size(body: bytes | bytearray) -> int:
    """The size a gzip body says it inflates to (its trailer's ISIZE: the size modulo 2**32,
    exact below 4 GiB). Anyone can write any value there: :func:`decode` refuses a body that
    inflates to more. 0 if the body is too short to be gzip."""
    return int.from_bytes(body[-4:], "little") if len(body) >= 18 else 0


def decode_memory(body: bytes, content_type: str | None,
                  content_encoding: str | None = None) -> int:
    """The most memory that decoding ``body`` can hold at once, in bytes: the body, its
    inflated copy and the value (:func:`crew.budget.value_bound`). Cheap: reads the gzip
    trailer, and the first inflated byte at most; never raises."""
    if content_encoding != protocol.GZIP:
        size, first = len(body), body[:1]
        held = size
    else:
        size = min(gzip_declared_size(body), protocol.MAX_DECOMPRESSED_BYTES)
        try:
            first = zlib.decompressobj(_GZIP_WBITS).decompress(body[:4096], 1)
        except zlib.error:
            first = b""
        held = len(body) + size
    kind = protocol.CONTENT_TYPES.get(content_type or "", protocol.MSGPACK)
    return held + budget.value_bound(first, size, kind)


def error_envelope(exc: BaseException, with_traceback: bool = True) -> dict[str, str]:
    """The error envelope for ``exc``: its class name, message and formatted traceback."""
    tb = "".join(_traceback.format_exception(exc)) if with_traceback else ""
    return {"type": type(exc).__name__, "message": str(exc), "traceback": tb}


def encodable_envelope(envelope: dict[str, Any]) -> dict[str, str]:
    """``envelope`` reduced to what any content type can carry: its three fields as text
    without lone surrogates, message and traceback cut to :data:`_MAX_ENVELOPE_TEXT`
    characters. For the rare envelope that cannot be sent as it is (an exception message
    with a lone surrogate, or megabytes long)."""
    def text(key: str, limit: int) -> str:
        raw = str(envelope.get(key) or "")[:limit]
        return raw.encode("utf-8", "backslashreplace").decode("utf-8")

    return {"type": text("type", 200) or "Error", "message": text("message", _MAX_ENVELOPE_TEXT),
            "traceback": text("traceback", _MAX_ENVELOPE_TEXT)}


def parse_error_envelope(value: Any) -> tuple[str, str, str]:
    """``(type, message, traceback)`` from a received envelope, tolerating missing fields
    and fields that are not text (written out; by their type when nested too deep to be)."""
    if not isinstance(value, dict):
        return "Error", _written(repr, value)[:1000], ""
    return (_written(str, value.get("type") or "Error"),
            _written(str, value.get("message") or ""),
            _written(str, value.get("traceback") or ""))


def _written(write: Callable[[Any], str], value: Any) -> str:
    # A body nests up to 1000 lists deep, more than the stack holds under pika's callback.
    try:
        return write(value)
    except RecursionError:
        return f"<{type(value).__name__} nested too deep to show>"
