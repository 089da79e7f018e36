"""Properties of the codec over generated input (hypothesis), without a broker.

- Any bytes, under any content type and content encoding, either decode to plain data or
  raise a :class:`~crew.CodecError`: never another exception, never an object of a class
  the sender chose.
- Any value crew can send comes back equal, in msgpack and JSON, gzipped or not.
- Any error envelope a worker makes comes back through the client's reply path as the
  matching exception, with its type, message and traceback.

Example counts are kept moderate so that the file runs in a few seconds.
"""

from __future__ import annotations

import gzip
import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pika.spec import BasicProperties

from crew import CrewError, ExpirationError, RemoteError, TimeoutError, codec, protocol
from crew.pending import outcome as _outcome
from crew.exceptions import CodecError
from crew.jobs import Job

MSGPACK, JSON = protocol.MSGPACK, protocol.JSON

SOME = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ------------------------------------------------------------------------

content_types = st.sampled_from([MSGPACK, "application/x-msgpack", JSON, None, "",
                                 "text/plain", "application/x-python-pickle",
                                 "application/python-pickle", "application/json; charset=x"]
                                ) | st.text(max_size=30) | st.binary(max_size=10)
encodings = st.sampled_from([None, "", "identity", "gzip", "GZIP", "x-gzip", "deflate",
                             "br"]) | st.text(max_size=10) | st.binary(max_size=5)

#: Bytes that get past the first checks: raw noise, noise behind a gzip header, and
#: valid bodies with one byte changed.
valid_msgpack = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text()
    | st.binary(), lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=10,
).map(lambda value: msgpack.packb(value, use_bin_type=True))


@st.composite
def mutated(draw: st.DrawFn, bodies: st.SearchStrategy[bytes]) -> bytes:
    body = bytearray(draw(bodies))
    if body:
        at = draw(st.integers(0, len(body) - 1))
        body[at] = draw(st.integers(0, 255))
    return bytes(body)


noise = (st.binary(max_size=300)
         | st.binary(max_size=300).map(gzip.compress)
         | mutated(st.binary(max_size=200).map(gzip.compress))
         | mutated(valid_msgpack)
         | st.text(max_size=100).map(str.encode))

#: What crew can send in both content types; floats are finite (JSON has no NaN).
leaves = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
          | st.floats(allow_nan=False, allow_infinity=False) | st.text())
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                           max_leaves=25)
msgpack_values = st.recursive(leaves | st.binary(max_size=50),
                              lambda inner: st.lists(inner, max_size=5)
                              | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                              max_leaves=25)

PLAIN_TYPES = (type(None), bool, int, float, str, bytes, list, dict, msgpack.Timestamp)


def plain(value: Any) -> bool:
    """True if ``value`` is made of plain data only."""
    if type(value) not in PLAIN_TYPES:
        return False
    if isinstance(value, list):
        return all(plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, bytes)) and plain(v) for k, v in value.items())
    return True


def same(a: Any, b: Any) -> bool:
    """Equality that also tells ``True`` from ``1`` and ``1`` from ``1.0``."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


# --- decoding anything -------------------------------------------------------------------


@SOME
@given(body=noise, content_type=content_types, encoding=encodings)
def test_any_bytes_decode_to_plain_data_or_a_codec_error(body, content_type, encoding):
    try:
        value = codec.decode(body, content_type, encoding)
    except CodecError:
        return
    assert plain(value), f"decoder built {type(value).__name__}"


@SOME
@given(body=noise, content_type=st.sampled_from([MSGPACK, JSON]),
       encoding=st.sampled_from([None, "gzip"]))
def test_bytes_under_crew_content_types_decode_or_fail_cleanly(body, content_type, encoding):
    """The same, with the names that reach the parsers (most random names stop earlier)."""
    if encoding == "gzip":
        body = gzip.compress(body)
    try:
        value = codec.decode(body, content_type, encoding)
    except CodecError:
        return
    assert plain(value)


# --- round trips -------------------------------------------------------------------------


@SOME
@given(value=json_values, content_type=st.sampled_from([MSGPACK, JSON]),
       compress=st.sampled_from([None, True, False]))
def test_values_round_trip_in_both_content_types_with_and_without_gzip(value, content_type,
                                                                       compress):
    body, encoding = codec.encode(value, content_type, compress)
    if compress is not None:
        assert encoding == ("gzip" if compress else None)
    assert same(codec.decode(body, content_type, encoding), value)


@SOME
@given(value=msgpack_values, compress=st.booleans())
def test_msgpack_round_trips_bytes_too(value, compress):
    body, encoding = codec.encode(value, MSGPACK, compress)
    assert same(codec.decode(body, MSGPACK, encoding), value)


# --- error envelopes through the reply path ------------------------------------------------

# Exception names and messages as tasks may produce them; messages may hold lone
# surrogates (class names cannot), which no content type can carry as they are.
class_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
                      max_size=40)
any_text = st.text(st.characters(codec="utf-8") | st.characters(categories=["Cs"]),
                   max_size=60)


def _job(content_type: str) -> Job:
    return Job(None, "task", lambda x: x, 1, "cid", "reply-queue",
               content_type, None, b"", {}, 0.0)


def _received(reply: Any, reply_type: str) -> Any:
    props = BasicProperties(content_type=reply_type, content_encoding=reply.encoding,
                            headers={protocol.STATUS_HEADER: reply.status})
    return _outcome(props, reply.body)


def _sendable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@FEW
@given(name=class_names, message=any_text, traceback=st.booleans(),
       content_type=st.sampled_from([MSGPACK, JSON]))
def test_task_exceptions_come_back_as_remote_errors(name, message, traceback, content_type):
    job = _job(content_type)
    error_class = type(name, (Exception,), {})
    try:
        raise error_class(message)
    except Exception as exc:  # noqa: BLE001 - any task error
        reply = job.error_reply(exc, with_traceback=traceback)
    assert reply.status == protocol.STATUS_ERROR
    outcome = _received(reply, job.reply_type)
    assert isinstance(outcome, RemoteError)
    assert outcome.type == name
    assert outcome.message == _sendable(message)
    assert ("Traceback" in outcome.traceback) is traceback


@FEW
@given(envelope=st.fixed_dictionaries({}, optional={
    "type": st.text(max_size=30), "message": st.text(max_size=200),
    "traceback": st.text(max_size=200)}),
    status=st.sampled_from([protocol.STATUS_ERROR, protocol.STATUS_TIMEOUT,
                            protocol.STATUS_EXPIRED]),
    content_type=st.sampled_from([MSGPACK, JSON]), compress=st.booleans())
def test_error_envelopes_round_trip_to_the_matching_exception(envelope, status, content_type,
                                                              compress):
    body, encoding = codec.encode(envelope, content_type, compress)
    props = BasicProperties(content_type=content_type, content_encoding=encoding,
                            headers={protocol.STATUS_HEADER: status, "x-user": "kept?"})
    outcome = _outcome(props, body)
    message = envelope.get("message", "")
    if status == protocol.STATUS_ERROR:
        assert isinstance(outcome, RemoteError)
        assert outcome.type == (envelope.get("type") or "Error")
        assert outcome.message == message
        assert outcome.traceback == envelope.get("traceback", "")
    else:
        expected = TimeoutError if status == protocol.STATUS_TIMEOUT else ExpirationError
        assert type(outcome) is expected
        if message:
            assert str(outcome) == message


@FEW
@given(value=msgpack_values, status=st.one_of(st.none(), st.text(max_size=10), st.integers()),
       content_type=content_types)
def test_any_reply_becomes_a_result_or_a_crew_error(value, status, content_type):
    """Whatever status and content type a reply claims, the reply path returns a result or
    an exception object; it never raises."""
    body = msgpack.packb(value, use_bin_type=True)
    props = BasicProperties(content_type=content_type,
                            headers={protocol.STATUS_HEADER: status})
    outcome = _outcome(props, body)
    if isinstance(outcome, tuple):
        assert status == protocol.STATUS_OK and plain(outcome[0])
    else:
        assert isinstance(outcome, CrewError)


@pytest.mark.parametrize("content_type", [MSGPACK, JSON])
def test_an_envelope_too_large_to_send_is_cut_down_not_lost(content_type):
    job = _job(content_type)
    reply = job.error_reply(ValueError("x" * (protocol.MAX_DECOMPRESSED_BYTES + 1)))
    outcome = _received(reply, job.reply_type)
    assert isinstance(outcome, RemoteError) and outcome.type == "ValueError"
    assert 0 < len(outcome.message) < protocol.MAX_BODY_BYTES
