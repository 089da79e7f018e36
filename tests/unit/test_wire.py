"""crew's lean codec of the hot frames (crew/wire.py) against pika's, over generated input,
without a broker.

- Any publish, with any properties pika can encode, marshals to pika's bytes exactly; for
  properties pika cannot encode, it raises pika's error.
- Any content header, ``Basic.Deliver`` or body frame pika marshals decodes to pika's
  frame exactly: the same fields with values of the same types (``str`` or ``bytes``,
  ``int`` or ``pika.compat.long``).
- Any bytes at all, valid or not, decode either to exactly what pika decodes them to, or to
  None, which leaves them to pika (and its errors): never to something else.
"""

from __future__ import annotations

import datetime
import decimal
import os
import struct
from typing import Any

import pika.compat
import pika.connection
import pika.exceptions
import pika.frame
import pika.spec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pika.spec import Basic, BasicProperties

from crew import protocol, tables, wire
from crew.frames import decode_frame
from crew.frames import frame_size as _frame_size

MANY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FRAME_MAX = 131_072

# --- strategies ------------------------------------------------------------------------

short_text = st.text(max_size=40)
short_strings = st.one_of(short_text, st.binary(max_size=40))
# Around pika's 255-octet limit of a short string: pika refuses the longer ones.
any_short_strings = st.one_of(short_strings, st.text(min_size=250, max_size=260))
table_keys = st.one_of(st.text(max_size=12), st.binary(max_size=12),
                       st.sampled_from([protocol.DEADLINE_HEADER, protocol.TASK_HEADER,
                                        protocol.CLIENT_HEADER, protocol.STATUS_HEADER]))
# pika encodes an int as I (32 bits) where it fits, else as l (64 bits).
integers = st.one_of(st.integers(-2**31 - 2, 2**31 + 1), st.integers(-2**63, 2**63 - 1),
                     st.sampled_from([-2**63, 2**63 - 1, -2**31 - 1, -2**31, 2**31 - 1, 2**31,
                                      1764625000123]))
scalars = st.one_of(
    st.text(max_size=30), st.binary(max_size=30), st.booleans(), integers, st.none(),
    st.builds(pika.compat.long, st.integers(-2**63, 2**63 - 1)),
    st.datetimes(min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(2200, 1, 1),
                 timezones=st.just(datetime.timezone.utc)).map(lambda d: d.replace(microsecond=0)),
    st.decimals(allow_nan=False, allow_infinity=False, places=2,
                min_value=-10**6, max_value=10**6))
# What pika cannot encode: floats, integers past 64 bits.
any_scalars = st.one_of(scalars, st.floats(allow_nan=False), st.sampled_from([2**63, -2**63 - 1]))


def _tables(leaves: Any) -> Any:
    values = st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(table_keys, inner, max_size=3)),
        max_leaves=8)
    return st.dictionaries(table_keys, values, max_size=5)


@st.composite
def properties(draw: Any, encodable: bool = True) -> BasicProperties:
    """Properties with any subset of fields set: ones pika can encode, or (``encodable``
    False) mostly such, with now and then a value pika refuses."""
    strings = short_strings if encodable else any_short_strings
    octets = st.integers(0, 255) if encodable else st.sampled_from([0, 9, 255, 256, -1])
    fields: dict[str, Any] = {}
    for name in ("content_type", "content_encoding", "correlation_id", "reply_to", "expiration",
                 "message_id", "type", "user_id", "app_id", "cluster_id"):
        if draw(st.booleans()):
            fields[name] = draw(strings)
    if draw(st.booleans()):
        fields["headers"] = draw(_tables(scalars if encodable else any_scalars))
    for name in ("delivery_mode", "priority"):
        if draw(st.booleans()):
            fields[name] = draw(octets)
    if draw(st.booleans()):
        fields["timestamp"] = draw(st.integers(0, 2**64 - 1))
    return BasicProperties(**fields)


def crews_call() -> BasicProperties:
    """The properties of a call as crew's client sends it."""
    return BasicProperties(
        content_type=protocol.MSGPACK, correlation_id="5f0c1e2d3b4a.17", priority=0,
        delivery_mode=1, reply_to="amq.gen-JzTY20BRgKO-HjmUJj0wLg",
        expiration="30000", headers={protocol.DEADLINE_HEADER: 1764625000123,
                                     protocol.TASK_HEADER: "echo",
                                     protocol.CLIENT_HEADER: "amq.gen-JzTY20BRgKO-HjmUJj0wLg"})


# --- helpers ---------------------------------------------------------------------------

class _Frames:
    """Stands in for a pika connection in ``Connection._send_message``: keeps the frames."""

    def __init__(self, frame_max: int) -> None:
        self._body_max_length = frame_max - 8
        self.frames: list[bytes] = []

    def _output_marshaled_frames(self, frames: list[bytes]) -> None:
        self.frames.extend(frames)


def pikas_publish(channel: int, exchange: Any, routing_key: Any, mandatory: bool,
                  props: BasicProperties, body: bytes) -> list[bytes]:
    """The frames pika's ``basic_publish`` hands its connection."""
    frames = _Frames(FRAME_MAX)
    method = Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
    pika.connection.Connection._send_message(frames, channel, method, (props, body))
    return frames.frames


def outcome(func: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "value", func(*args)
    except Exception as exc:  # noqa: BLE001 - compared between the two codecs
        return "error", type(exc)


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, (pika.frame.Frame, pika.spec.amqp_object.AMQPObject)):
        return same(vars(a), vars(b))
    return bool(a == b)


def wire_decode(data: bytes) -> Any:
    """crew's decoding of one whole frame (None: pika's case)."""
    return wire.decode(data, 0, len(data))


def pika_decode(data: bytes) -> tuple[str, Any]:
    try:
        consumed, frame = pika.frame.decode_frame(data)
    except Exception as exc:  # noqa: BLE001 - what pika makes of any bytes
        return "error", type(exc)
    return ("frame", frame) if consumed == len(data) else ("incomplete", consumed)


# --- out -------------------------------------------------------------------------------

@MANY
@given(props=properties(encodable=False), exchange=any_short_strings,
       routing_key=any_short_strings,
       mandatory=st.booleans(), body=st.binary(max_size=64), channel=st.integers(1, 65535))
def test_a_publish_marshals_to_pikas_bytes_or_raises_pikas_error(
        props: BasicProperties, exchange: Any, routing_key: Any, mandatory: bool, body: bytes,
        channel: int) -> None:
    pikas = outcome(pikas_publish, channel, exchange, routing_key, mandatory, props, body)
    ours = outcome(wire.publish_frames, channel, exchange, routing_key, mandatory, props,
                   body, FRAME_MAX)
    assert ours == pikas


@pytest.mark.parametrize("size", [0, 1, 131_064, 131_065, 300_000])
def test_bodies_are_cut_into_frames_as_pika_cuts_them(size: int) -> None:
    body = os.urandom(size)
    assert (wire.publish_frames(3, "", "q", True, crews_call(), body, FRAME_MAX)
            == pikas_publish(3, "", "q", True, crews_call(), body))


@pytest.mark.parametrize("value", [-2**63, -2**31 - 1, -2**31, -1, 0, 2**31 - 1, 2**31,
                                   2**63 - 1, True, False, "", b"", "\u00e9", b"\xff"])
def test_header_values_at_the_edges_marshal_to_pikas_bytes(value: Any) -> None:
    props = BasicProperties(headers={"v": value})
    assert (wire.publish_frames(1, "", "q", False, props, b"", FRAME_MAX)
            == pikas_publish(1, "", "q", False, props, b""))


@pytest.mark.parametrize("bad", [
    {"priority": 256}, {"delivery_mode": -1}, {"content_type": "x" * 256},
    {"correlation_id": 17}, {"headers": {"k": 1.5}}, {"headers": {"k": 2**63}},
    {"headers": {"x" * 256: 1}}, {"timestamp": -1}, {"headers": ["not", "a", "dict"]},
])
def test_what_pika_cannot_encode_raises_what_pika_raises(bad: dict[str, Any]) -> None:
    props = BasicProperties(**bad)
    pikas = outcome(pikas_publish, 1, "", "q", False, props, b"x")
    # The case is one pika refuses (2**63: since pika 1.4, which writes l as signed).
    assert pikas[0] == "error" or (bad == {"headers": {"k": 2**63}} and pika.__version__ < "1.4")
    assert outcome(wire.publish_frames, 1, "", "q", False, props, b"x", FRAME_MAX) == pikas


def test_crews_own_frames_are_encoded_by_crew(monkeypatch: pytest.MonkeyPatch) -> None:
    """The frames of every call, reply and ack take the lean path, not pika's."""
    expected = pikas_publish(1, "", "crew.tasks.echo", True, crews_call(), b"x" * 100)
    ack = pika.frame.Method(1, Basic.Ack(7)).marshal()
    reply = BasicProperties(content_type=protocol.MSGPACK, correlation_id="c.1",
                            delivery_mode=1, headers={protocol.STATUS_HEADER: "ok"})
    expected_reply = pikas_publish(1, "", "amq.gen-x", True, reply, b"y")

    def refused(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("pika's codec was used")

    for name in ("Method", "Header", "Body"):
        monkeypatch.setattr(pika.frame, name, refused)
    assert wire.publish_frames(1, "", "crew.tasks.echo", True, crews_call(), b"x" * 100,
                               FRAME_MAX) == expected
    assert wire.publish_frames(1, "", "amq.gen-x", True, reply, b"y", FRAME_MAX) \
        == expected_reply
    assert wire.ack_frame(1, 7) == ack


def test_properties_of_a_subclass_are_encoded_by_its_own_encode() -> None:
    class Reversed(BasicProperties):
        def encode(self) -> list[bytes]:
            return [piece[::-1] for piece in super().encode()]

    props = Reversed(content_type="text/plain")
    assert (wire.publish_frames(1, "", "q", False, props, b"", FRAME_MAX)
            == pikas_publish(1, "", "q", False, props, b""))


@given(channel=st.integers(0, 65535), tag=st.integers(1, 2**64 - 1))
def test_an_ack_marshals_to_pikas_bytes(channel: int, tag: int) -> None:
    assert wire.ack_frame(channel, tag) == pika.frame.Method(channel, Basic.Ack(tag)).marshal()


# --- in --------------------------------------------------------------------------------

@MANY
@given(props=properties(), body_size=st.integers(0, 2**40), channel=st.integers(0, 65535))
def test_any_content_header_pika_marshals_decodes_to_pikas_frame(
        props: BasicProperties, body_size: int, channel: int) -> None:
    data = pika.frame.Header(channel, body_size, props).marshal()
    kind, pikas = pika_decode(data)
    ours = wire_decode(data)
    assert kind == "frame"
    assert ours is not None and same(ours, pikas)


def test_crews_own_frames_are_decoded_by_crew() -> None:
    """The frames of every call and reply take the lean path, not pika's."""
    header = pika.frame.Header(1, 100, crews_call()).marshal()
    reply = pika.frame.Header(1, 100, BasicProperties(
        content_type=protocol.MSGPACK, correlation_id="c.1", delivery_mode=1,
        headers={protocol.STATUS_HEADER: "ok"})).marshal()
    deliver = pika.frame.Method(1, Basic.Deliver("ctag1.abc", 9, True, "", "q")).marshal()
    body = pika.frame.Body(1, b"x" * 100).marshal()
    for data in (header, reply, deliver, body):
        ours = wire_decode(data)
        assert ours is not None
        assert same(ours, pika_decode(data)[1])


@MANY
@given(consumer_tag=short_strings, tag=st.integers(0, 2**64 - 1), redelivered=st.booleans(),
       exchange=short_strings, routing_key=short_strings, channel=st.integers(0, 65535))
def test_any_deliver_pika_marshals_decodes_to_pikas_frame(
        consumer_tag: Any, tag: int, redelivered: bool, exchange: Any, routing_key: Any,
        channel: int) -> None:
    method = Basic.Deliver(consumer_tag, tag, redelivered, exchange, routing_key)
    data = pika.frame.Method(channel, method).marshal()
    ours = wire_decode(data)
    assert ours is not None
    assert same(ours, pika_decode(data)[1])


@MANY
@given(seed=st.sampled_from(["call", "reply", "deliver", "other"]),
       cuts=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3),
       truncate=st.one_of(st.just(0), st.integers(0, 400)), junk=st.binary(max_size=8))
def test_any_bytes_decode_to_pikas_frame_or_are_left_to_pika(
        seed: str, cuts: list[tuple[int, int]], truncate: int, junk: bytes) -> None:
    """Valid frames with bytes changed, cut short or followed by junk, the frame's size
    field made to match: crew's reading never differs from pika's."""
    data = {
        "call": lambda: pika.frame.Header(1, 100, crews_call()).marshal(),
        "reply": lambda: pika.frame.Header(1, 5, BasicProperties(
            headers={protocol.STATUS_HEADER: "ok", "n": 5, "t": True})).marshal(),
        "deliver": lambda: pika.frame.Method(2, Basic.Deliver("t", 1, False, "", "q")).marshal(),
        "other": lambda: pika.frame.Method(1, Basic.Ack(4)).marshal(),
    }[seed]()
    payload = bytearray(data[7:-1])
    for at, value in cuts:
        if at < len(payload):
            payload[at] = value
    payload = payload[:max(0, len(payload) - truncate % (len(payload) + 1))] + junk
    frame = data[:3] + len(payload).to_bytes(4, "big") + bytes(payload) + data[-1:]
    assert _frame_size(frame, 0, FRAME_MAX) == len(frame)
    ours = wire_decode(frame)
    event("crew's" if ours is not None else "pika's")
    if ours is not None:
        kind, pikas = pika_decode(frame)
        if kind == "error" and pikas in (OverflowError, OSError, ValueError):
            return  # a timestamp made past the year 9999: crew keeps it an int, on purpose
        assert kind == "frame" and same(ours, pikas)


def _header_frame(flags: int, properties: bytes) -> bytes:
    """A content header frame with these property flags and encoded properties."""
    payload = struct.pack(">HHQH", BasicProperties.INDEX, 0, 10, flags) + properties
    return struct.pack(">BHL", 2, 1, len(payload)) + payload + b"\xce"


def _table_bytes(entries: bytes, size: int | None = None) -> bytes:
    return struct.pack(">L", len(entries) if size is None else size) + entries


HEADERS = BasicProperties.FLAG_HEADERS
CONTENT_TYPE = BasicProperties.FLAG_CONTENT_TYPE


#: Well-formed headers of the kinds crew reads: crew decodes them, to pika's frame.
READ = [
    # Booleans of any nonzero octet are True.
    _header_frame(HEADERS, _table_bytes(b"\x01kt\x02" + b"\x01jt\x00" + b"\x01it\xff")),
    # Integers at the edges of I and l.
    _header_frame(HEADERS, _table_bytes(
        b"\x01aI\x7f\xff\xff\xff" + b"\x01bI\x80\x00\x00\x00"
        + b"\x01cl" + b"\xff" * 8 + b"\x01dL\x80" + b"\x00" * 7)),
    # Text that is not UTF-8 stays bytes; bytes stay bytes.
    _header_frame(HEADERS, _table_bytes(
        b"\x01aS\x00\x00\x00\x02\xff\xfe" + b"\x01bx\x00\x00\x00\x01z")),
]
#: Malformed headers, and kinds crew leaves to pika: crew decodes them to pika's frame, or
#: leaves them to pika.
ODD = [
    # A table whose size ends inside its last value, or past its values.
    _header_frame(HEADERS, _table_bytes(b"\x01aI\x00\x00\x00\x01", size=3) + b"\x00" * 4),
    _header_frame(HEADERS, _table_bytes(b"\x01aI\x00\x00\x00\x01", size=9) + b"\x00" * 4),
    _header_frame(HEADERS, _table_bytes(b"\x01aI\x00\x00\x00\x01", size=64)),
    # A string value longer than the table, or than the whole frame.
    _header_frame(HEADERS, _table_bytes(b"\x01aS\x00\x00\x00\x05abc", size=9) + b"xyzw"),
    _header_frame(HEADERS, _table_bytes(b"\x01aS\x00\x00\x00\x50abc")),
    _header_frame(HEADERS, _table_bytes(b"\x01ax\x00\x00\x00\x05ab", size=9) + b"cdef"),
    # A table key, or a short string property, longer than what is left.
    _header_frame(HEADERS, _table_bytes(b"\x09aI\x00\x00\x00\x01")),
    _header_frame(CONTENT_TYPE, b"\x20text/plain"),
    _header_frame(CONTENT_TYPE | HEADERS, b"\x03abc" + _table_bytes(b"\x01aI\x00")),
    # Flag words that pika reads on from (bit 0) or ignores (bit 1).
    _header_frame(CONTENT_TYPE | 1, b"\x00\x00\x03abc"),
    _header_frame(CONTENT_TYPE | 1, b"\x80\x00\x03abc\x03def"),
    _header_frame(CONTENT_TYPE | 2, b"\x03abc"),
    # Another class's header; properties past the frame's end.
    struct.pack(">BHL", 2, 1, 14) + struct.pack(">HHQH", 61, 0, 1, 0) + b"\xce",
    _header_frame(BasicProperties.FLAG_PRIORITY | BasicProperties.FLAG_TIMESTAMP, b"\x05\x00"),
    # Unknown value kinds, and ones pika reads but crew leaves to it.
    _header_frame(HEADERS, _table_bytes(b"\x01aZ\x00")),
    _header_frame(HEADERS, _table_bytes(b"\x01aV" + b"\x01bb\xff" + b"\x01cf\x3f\x80\x00\x00")),
]


@pytest.mark.parametrize("frame", READ + ODD, ids=lambda frame: frame[21:].hex()[:32])
def test_edge_cases_decode_as_pika_decodes_them_or_are_left_to_pika(frame: bytes) -> None:
    ours = wire_decode(frame)
    kind, pikas = pika_decode(frame)
    if frame in READ:
        assert ours is not None
    assert ours is None or (kind == "frame" and same(ours, pikas))


def test_a_frame_without_its_end_octet_is_left_to_pika() -> None:
    data = bytearray(pika.frame.Header(1, 100, crews_call()).marshal())
    data[-1] = 0
    assert wire_decode(bytes(data)) is None
    with pytest.raises(pika.exceptions.InvalidFrameError):
        pika.frame.decode_frame(bytes(data))


def _hostile_header(headers: dict[str, Any]) -> bytes:
    """A content header whose headers hold ``headers``, each timestamp of 2020-01-01 made
    one of the year 146 138 514 283 (2**62 seconds): valid AMQP that pika cannot read."""
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, headers)
    table = b"".join(pieces).replace((1577836800).to_bytes(8, "big"), (2**62).to_bytes(8, "big"))
    payload = (BasicProperties.INDEX.to_bytes(2, "big") + b"\0\0" + (0).to_bytes(8, "big")
               + BasicProperties.FLAG_HEADERS.to_bytes(2, "big") + table)
    return b"\x02\x00\x01" + len(payload).to_bytes(4, "big") + payload + b"\xce"


def test_a_timestamp_past_year_9999_in_a_header_stays_an_int() -> None:
    """crew's table decoder, not pika's (which raises, and is left as it is)."""
    when = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    data = _hostile_header({"when": when, "f": {"a": [when, {"b": when}]}})
    headers = wire_decode(data).properties.headers
    assert headers == {"when": 2**62, "f": {"a": [2**62, {"b": 2**62}]}}
    with pytest.raises((OverflowError, OSError, ValueError)):
        pika.frame.decode_frame(data)  # pika itself is not patched


def _nested(depth: int, kind: bytes) -> bytes:
    """A field value: ``depth`` arrays (``A``) or tables (``F``, one key each) around a void."""
    value = b"V"
    for _ in range(depth):
        value = (b"A" + struct.pack(">L", len(value)) + value if kind == b"A"
                 else b"F" + struct.pack(">L", len(value) + 2) + b"\x01k" + value)
    return value


@pytest.mark.parametrize("kind, depth", [(b"A", 3000), (b"F", 1000)])
def test_a_header_nested_thousands_deep_is_read_to_max_depth_and_kept_as_bytes_below(
        kind: bytes, depth: int, caplog: pytest.LogCaptureFixture) -> None:
    """The broker passes such a header through (tests/broker/test_hostile.py); pika's
    recursive reader raises RecursionError on it, which closed the connection."""
    deep = _nested(depth, kind)
    frame = _header_frame(HEADERS, _table_bytes(b"\x04deep" + deep
                                                + b"\x02okS\x00\x00\x00\x01y"))
    with pytest.raises(RecursionError):
        pika.frame.decode_frame(frame)  # pika itself is not patched
    for lean in (True, False):  # crew's codec first, and after pika raised (public path)
        caplog.clear()
        headers = decode_frame(frame, lean=lean).properties.headers
        assert headers["ok"] == "y"
        value = headers["deep"]
        for _ in range(tables.MAX_DEPTH):
            value = value[0] if kind == b"A" else value["k"]
        assert value == deep[5 * tables.MAX_DEPTH if kind == b"A" else 7 * tables.MAX_DEPTH:]
        assert [r.name for r in caplog.records] == ["crew.tables"]


def test_values_nested_to_max_depth_are_read_as_pika_reads_them() -> None:
    frame = _header_frame(HEADERS, _table_bytes(b"\x01a" + _nested(tables.MAX_DEPTH, b"A")
                                                + b"\x01f" + _nested(tables.MAX_DEPTH, b"F")))
    assert same(wire_decode(frame), pika_decode(frame)[1])


def test_decimal_and_nested_values_decode_as_pika_decodes_them() -> None:
    when = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    props = BasicProperties(headers={"d": decimal.Decimal("1.25"), "f": {"a": [1, "b", when]},
                                     "v": None, "n": -2**40})
    data = pika.frame.Header(1, 0, props).marshal()
    assert same(wire_decode(data), pika_decode(data)[1])
    assert wire.publish_frames(1, "", "q", False, props, b"", FRAME_MAX) \
        == pikas_publish(1, "", "q", False, props, b"")


class _Shapeless:
    """Stands for a pika object whose shape changed: any attribute read raises."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"no {name} any more")


def test_a_change_in_pikas_objects_leaves_the_work_to_pika(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Any exception in the lean codec, expected or not, falls back to pika's codec."""
    props = crews_call()
    expected = pikas_publish(1, "", "q", True, props, b"x")
    header = pika.frame.Header(1, 1, props).marshal()
    monkeypatch.setattr(wire, "_PROPERTIES", _Shapeless())  # iterating it raises
    assert wire.publish_frames(1, "", "q", True, props, b"x", FRAME_MAX) == expected
    assert wire_decode(header) is None
    monkeypatch.setattr(wire, "_ACK", _Shapeless())
    assert wire.ack_frame(1, 7) == pika.frame.Method(1, Basic.Ack(7)).marshal()
