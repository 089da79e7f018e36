"""Bodies on the wire, without a broker: round trips, gzip, limits and hostile input."""

from __future__ import annotations

import gzip
import json
import os
import zlib

import msgpack
import pytest

from crew import codec, protocol
from crew.exceptions import CodecError, DecodeError, EncodeError, MessageTooLargeError
from tests.support.hostile import at_stack_depth

MSGPACK, JSON = protocol.MSGPACK, protocol.JSON

NESTED = {
    "text": "Wake up, Neo. Проснись, Нео. 起きて 🐇",
    "numbers": [0, -1, 2**63 - 1, -(2**63), 1.5, True, False, None],
    "deep": {"a": [{"b": [{"c": "d"}]}], "empty": {}, "list": []},
}


def roundtrip(value, content_type=MSGPACK, **kwargs):
    body, encoding = codec.encode(value, content_type, **kwargs)
    return codec.decode(body, content_type, encoding)


# --- round trips -----------------------------------------------------------------------

@pytest.mark.parametrize("content_type", [MSGPACK, JSON])
@pytest.mark.parametrize("value", [None, 0, "", "é", [], {}, NESTED, [NESTED, NESTED]])
def test_values_survive_a_round_trip(content_type, value):
    assert roundtrip(value, content_type) == value


def test_msgpack_keeps_bytes_apart_from_text():
    value = {"raw": b"\x00\xff\x80 not utf-8", "text": "\x00\xff"}
    decoded = roundtrip(value)
    assert decoded == value
    assert isinstance(decoded["raw"], bytes) and isinstance(decoded["text"], str)


def test_msgpack_writes_bytes_as_bin_and_text_as_str():
    body, _ = codec.encode({"b": b"\x01", "s": "x"})
    # use_bin_type: bytes are bin8 (0xc4), text is fixstr (0xa1); an old-spec reader
    # would see both as raw.
    assert b"\xc4\x01\x01" in body and b"\xa1x" in body


def test_json_is_compact_utf8_without_ascii_escapes():
    body, encoding = codec.encode({"k": "é", "n": [1, 2]}, JSON)
    assert encoding is None
    assert body == '{"k":"é","n":[1,2]}'.encode()


def test_json_refuses_bytes_with_encode_error():
    with pytest.raises(EncodeError, match="bytes"):
        codec.encode({"raw": b"\x00"}, JSON)


def test_json_refuses_nan():
    with pytest.raises(EncodeError):
        codec.encode(float("nan"), JSON)


def test_encode_error_is_both_a_codec_error_and_a_type_error():
    with pytest.raises(TypeError):
        codec.encode(object())
    with pytest.raises(CodecError):
        codec.encode(object(), JSON)


def test_msgpack_refuses_integers_beyond_64_bits():
    with pytest.raises(EncodeError):
        codec.encode(2**64)


def test_unknown_content_type_is_refused_on_encode():
    with pytest.raises(EncodeError, match="text/plain"):
        codec.encode(1, "text/plain")


def test_x_msgpack_is_read_as_msgpack():
    body, _ = codec.encode({"a": 1})
    assert codec.decode(body, "application/x-msgpack") == {"a": 1}


# --- gzip ------------------------------------------------------------------------------

def test_forced_gzip_is_labelled_and_is_real_gzip():
    body, encoding = codec.encode(NESTED, JSON, gzip=True)
    assert encoding == "gzip"
    assert body[:2] == b"\x1f\x8b"  # the gzip magic, not a bare zlib stream
    assert json.loads(gzip.decompress(body)) == NESTED
    assert codec.decode(body, JSON, encoding) == NESTED


def test_gzip_from_the_standard_library_is_read():
    body = gzip.compress(msgpack.packb(NESTED, use_bin_type=True))
    assert codec.decode(body, MSGPACK, "gzip") == NESTED


def test_gzip_false_never_compresses():
    body, encoding = codec.encode("a" * (protocol.GZIP_THRESHOLD * 4), gzip=False)
    assert encoding is None
    assert len(body) > protocol.GZIP_THRESHOLD * 4


def test_small_bodies_are_not_compressed_automatically():
    _, encoding = codec.encode("a" * (protocol.GZIP_THRESHOLD // 2))
    assert encoding is None


def test_compressible_body_above_threshold_is_gzipped_automatically():
    value = "the same words again and again " * (protocol.GZIP_THRESHOLD // 10)
    body, encoding = codec.encode(value)
    assert encoding == "gzip"
    assert len(body) < len(value) // 10
    assert msgpack.unpackb(gzip.decompress(body)) == value


def test_random_bytes_above_threshold_are_not_gzipped():
    value = os.urandom(protocol.GZIP_THRESHOLD * 2)
    body, encoding = codec.encode(value)
    assert encoding is None
    assert codec.decode(body, MSGPACK, encoding) == value


def test_identity_and_empty_encodings_mean_uncompressed():
    body, _ = codec.encode([1, 2])
    assert codec.decode(body, MSGPACK, "identity") == [1, 2]
    assert codec.decode(body, MSGPACK, "") == [1, 2]


def _gzip_of_zeros(size: int, chunk: int = 1024 * 1024) -> bytes:
    """gzip of ``size`` zero bytes, built in chunks so the test never holds ``size`` bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(chunk)
    parts = [compressor.compress(zeros) for _ in range(size // chunk)]
    parts.append(compressor.flush())
    return b"".join(parts)


def test_gzip_bomb_is_refused_without_being_inflated(monkeypatch):
    bomb = _gzip_of_zeros(protocol.MAX_DECOMPRESSED_BYTES * 4)
    assert len(bomb) < 1024 * 1024  # small on the wire, 256 MiB inflated
    asked: list[int] = []
    real = zlib.decompressobj

    class Watched:
        """Records the output limit that decode asks zlib for."""

        def __init__(self, *args):
            self._inner = real(*args)

        def decompress(self, data, max_length=0):
            asked.append(max_length)
            return self._inner.decompress(data, max_length)

        def __getattr__(self, name):
            return getattr(self._inner, name)

    monkeypatch.setattr(zlib, "decompressobj", Watched)
    with pytest.raises(MessageTooLargeError, match="decompresses to more than"):
        codec.decode(bomb, MSGPACK, "gzip")
    # zlib was never allowed to produce more than the limit (plus the byte that proves it).
    assert asked and all(0 < n <= protocol.MAX_DECOMPRESSED_BYTES + 1 for n in asked)


def test_gzip_just_under_the_decompressed_limit_is_accepted():
    limit = 1000
    assert codec.gzip_decompress(gzip.compress(b"x" * limit), limit) == b"x" * limit
    with pytest.raises(MessageTooLargeError):
        codec.gzip_decompress(gzip.compress(b"x" * (limit + 1)), limit)


def test_truncated_gzip_is_a_decode_error():
    body = gzip.compress(b"[1, 2, 3]" * 100)
    with pytest.raises(DecodeError, match="truncated"):
        codec.decode(body[: len(body) // 2], JSON, "gzip")


@pytest.mark.parametrize("body", [b"not gzip at all", b"\x1f\x8b\x08\x00garbage"])
def test_corrupt_gzip_is_a_decode_error(body):
    with pytest.raises(DecodeError):
        codec.decode(body, JSON, "gzip")


def test_data_after_the_gzip_member_is_not_ignored():
    body = gzip.compress(b"[1]") + b"trailing"
    with pytest.raises(DecodeError):
        codec.decode(body, JSON, "gzip")


# --- refusing what cannot be read ------------------------------------------------------

@pytest.mark.parametrize("content_type", [None, "", "text/plain", "application/pickle",
                                          "application/python-pickle"])
def test_unknown_content_type_is_a_decode_error(content_type):
    with pytest.raises(DecodeError, match="content type"):
        codec.decode(b"\xc0", content_type)


@pytest.mark.parametrize("encoding", ["deflate", "br", "zlib", "x-gzip"])
def test_unknown_content_encoding_is_a_decode_error(encoding):
    with pytest.raises(DecodeError, match="content encoding"):
        codec.decode(b"\xc0", MSGPACK, encoding)


@pytest.mark.parametrize("body", [
    b"",  # no object at all
    b"\xc1",  # the one byte msgpack never uses
    b"\x92\x01",  # an array of two with one element
    b"\x01\x02",  # extra data after the object
    b"\xa2\xff\xfe",  # str that is not UTF-8
    b"\x91" * 100_000 + b"\xc0",  # nested deeper than the stack allows
])
def test_malformed_msgpack_is_a_decode_error(body):
    with pytest.raises(DecodeError, match="malformed"):
        codec.decode(body, MSGPACK)


@pytest.mark.parametrize("body", [b"", b"{", b'{"a":}', b"[1,]", b"\xff\xfe", b"[" * 10_000])
def test_malformed_json_is_a_decode_error(body):
    with pytest.raises(DecodeError, match="malformed"):
        codec.decode(body, JSON)


def test_msgpack_extension_type_is_refused():
    body = msgpack.packb({"x": msgpack.ExtType(42, b"payload")})
    with pytest.raises(DecodeError, match="extension type 42"):
        codec.decode(body, MSGPACK)


def test_msgpack_timestamp_decodes_to_an_inert_value():
    """msgpack handles its own timestamp type (-1) without ext_hook; documented as the one
    extension accepted, because the value it builds is plain data."""
    body = msgpack.packb({"at": msgpack.Timestamp(1, 0)})
    assert codec.decode(body, MSGPACK) == {"at": msgpack.Timestamp(1, 0)}


def test_json_nan_and_infinity_are_refused():
    for text in (b"NaN", b"[Infinity]", b"-Infinity"):
        with pytest.raises(DecodeError, match="not accepted"):
            codec.decode(text, JSON)


@pytest.mark.parametrize("mapping", [{1: "a"}, {None: "a"}, {1.5: "a"}])
def test_non_string_map_keys_are_refused(mapping):
    body = msgpack.packb(mapping)
    with pytest.raises(DecodeError):
        codec.decode(body, MSGPACK)


def test_decode_errors_are_codec_and_value_errors():
    with pytest.raises(ValueError):
        codec.decode(b"{", JSON)
    with pytest.raises(CodecError):
        codec.decode(b"{", JSON)


# --- size limits -----------------------------------------------------------------------

def test_body_over_the_limit_is_refused_on_encode():
    value = os.urandom(protocol.MAX_BODY_BYTES)  # random: gzip cannot bring it under
    with pytest.raises(MessageTooLargeError, match="limit"):
        codec.encode(value)


def test_body_at_the_limit_is_accepted_on_decode_and_one_byte_more_is_not():
    payload = bytes(protocol.MAX_BODY_BYTES - 5)
    fits = b"\xc6" + len(payload).to_bytes(4, "big") + payload  # msgpack bin32
    assert len(fits) == protocol.MAX_BODY_BYTES
    assert codec.decode(fits, MSGPACK) == payload
    with pytest.raises(MessageTooLargeError):
        codec.decode(fits + b"\x00", MSGPACK)


def test_compressed_size_counts_against_the_body_limit_before_inflating():
    oversized = b"\x1f\x8b" + bytes(protocol.MAX_BODY_BYTES)
    with pytest.raises(MessageTooLargeError):
        codec.decode(oversized, MSGPACK, "gzip")


def test_encode_refuses_what_decode_would_refuse_after_decompression():
    value = bytes(protocol.MAX_DECOMPRESSED_BYTES + 1024)
    with pytest.raises(MessageTooLargeError):
        codec.encode(value)


# --- error envelopes -------------------------------------------------------------------

def _raise_key_error():
    raise KeyError("spoon")


@pytest.mark.parametrize("content_type", [MSGPACK, JSON])
def test_error_envelope_survives_a_round_trip(content_type):
    try:
        _raise_key_error()
    except KeyError as exc:
        envelope = codec.error_envelope(exc)
    assert envelope["type"] == "KeyError"
    assert envelope["message"] == "'spoon'"
    assert "Traceback" in envelope["traceback"] and "_raise_key_error" in envelope["traceback"]
    decoded = roundtrip(envelope, content_type)
    assert codec.parse_error_envelope(decoded) == (
        envelope["type"], envelope["message"], envelope["traceback"])


def test_error_envelope_without_traceback():
    envelope = codec.error_envelope(ValueError("bad"), with_traceback=False)
    assert envelope == {"type": "ValueError", "message": "bad", "traceback": ""}


@pytest.mark.parametrize("value, expected", [
    ({}, ("Error", "", "")),
    ({"type": "X"}, ("X", "", "")),
    ({"type": None, "message": 5, "traceback": None}, ("Error", "5", "")),
    ("just a string", ("Error", "'just a string'", "")),
    ([1, 2], ("Error", "[1, 2]", "")),
])
def test_parse_error_envelope_tolerates_missing_and_odd_fields(value, expected):
    assert codec.parse_error_envelope(value) == expected


@pytest.mark.parametrize("field", [None, "type", "message", "traceback"])
def test_parse_error_envelope_of_values_nested_past_the_stack(field):
    """msgpack nests 990 lists: writing them out in a client's reply callback raised
    RecursionError, and pika closed the client's connection (any caller whose correlation id
    was known: crew inspect and the figures list them)."""
    body = b"\x91" * 990 + b"\xc0"
    if field is not None:
        body = b"\x81" + msgpack.packb(field) + body
    value = codec.decode(body, protocol.MSGPACK)
    kind, message, traceback = at_stack_depth(100, lambda: codec.parse_error_envelope(value))
    shown = {None: message, "type": kind, "message": message, "traceback": traceback}[field]
    assert shown == "<list nested too deep to show>"


def test_parse_error_envelope_bounds_a_huge_non_envelope():
    kind, message, _ = codec.parse_error_envelope("x" * 100_000)
    assert kind == "Error" and len(message) <= 1000
