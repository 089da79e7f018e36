"""The decode budget: what turning a body into Python objects may cost (internal).

Python objects are larger than their encoding: an empty msgpack array is one byte and a
56-byte list plus an 8-byte slot in its parent, so a body of tiny containers takes up to
about 72 times its size once decoded (``docs/SECURITY.md`` §4 has the measurements). A
:class:`Meter` bounds that while msgpack or the standard library's C decoder builds the
value, and raises :class:`~crew.DecodeError` as soon as the value is over budget.

The budget of a body of ``n`` bytes (after gzip) is ``DECODE_FACTOR * n + DECODE_FLOOR``
for the containers (lists and dicts, counted at their ``sys.getsizeof`` as each is completed,
or for JSON lists, which have no hook, 64 bytes per ``[`` counted before decoding). What
is not counted one by one is bounded by the bytes themselves: every scalar except a few
short kinds (small negative integers and 2-4 byte strings in msgpack, whose excess is
counted before decoding, for every byte that could start one) costs at most 16 bytes per
byte of its encoding, its slot included. So decoding never holds more than
:data:`DECODE_BOUND_FACTOR` times the body plus the floor, whatever the bytes (plus, for
JSON, the str that :func:`json.loads` first makes of the text); ``tests/unit/test_budget.py``
measures every shape.

Bodies that cannot reach the budget skip all of this: bodies of at most
:data:`UNCOUNTED_BYTES` (72 bytes per byte is below the floor) and bodies whose top-level
value is a single string, number or bytes (``1 MB`` of text costs at most 4 times its size).

Not for values built by other means: the meter only sees what the decoders give its hooks.
"""

from __future__ import annotations

import sys
from typing import Any, Final

from .exceptions import DecodeError

__all__ = ["DECODE_BOUND_FACTOR", "DECODE_FACTOR", "DECODE_FLOOR", "Meter", "UNCOUNTED_BYTES",
           "bound", "json_needs_meter", "msgpack_needs_meter", "value_bound"]

#: Bytes of containers a body may decode into, per byte of body (after gzip)...
DECODE_FACTOR: Final = 16
#: ... plus this, so that small bodies are never refused.
DECODE_FLOOR: Final = 1024 * 1024
#: What decoding a body may cost at most, per byte, counted and uncounted objects together.
DECODE_BOUND_FACTOR: Final = 32
#: Bodies up to this size are not counted: even 72 bytes per byte stays under the floor.
UNCOUNTED_BYTES: Final = DECODE_FLOOR // 64

#: Bytes that start a msgpack map or array: fixmap, fixarray, array 16/32, map 16/32.
_MSGPACK_CONTAINERS: Final = frozenset([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
#: msgpack scalars dearer than 16 bytes per byte of their encoding (their slot included),
#: by first byte, with what they cost beyond that: negative fixints -32..-6 (a 32-byte int
#: from one byte; -5..-1 are cached but are not told apart here), int8, and strings of 2 to 4
#: bytes (fixstr, str8), where one non-Latin-1 character makes an 80-byte str.
_DEAR_EXCESS: Final = {**{b: 24 for b in range(0xE0, 0x100)}, 0xD0: 8, 0xA2: 40, 0xA3: 24,
                       0xA4: 8, 0xD9: 24}
_ALL_BYTES: Final = bytes(range(256))
_NOT_DEAR: Final = _ALL_BYTES.translate(None, bytes(_DEAR_EXCESS))
#: Classes of dear bytes: the cost of the most common (24) is charged for every dear byte,
#: then what the others cost more or less.
_NOT_40: Final = _ALL_BYTES.translate(None, bytes([0xA2]))
_NOT_8: Final = _ALL_BYTES.translate(None, bytes([0xD0, 0xA4]))
#: A JSON list, counted per ``[``: the list (56 bytes); its slots are part of its elements'
#: bytes.
_JSON_LIST_COST: Final = 64
#: First bytes of a JSON text that is one scalar (string, number, true, false, null).
_JSON_SCALAR_STARTS: Final = frozenset(b'"-0123456789tfn')


def budget(size: int) -> int:
    """Bytes of containers a body of ``size`` bytes may decode into."""
    return DECODE_FACTOR * size + DECODE_FLOOR


def bound(size: int) -> int:
    """The most that decoding a body of ``size`` bytes can cost, everything included."""
    return DECODE_BOUND_FACTOR * size + DECODE_FLOOR


def value_bound(first: bytes, size: int, kind: str) -> int:
    """The most memory a body of ``size`` bytes, starting with ``first``, decodes into while
    it is decoded: :func:`bound`, or 4 bytes per byte plus 1 KiB for a single string, number
    or bytes (UTF-8 into a 4-byte-per-character str at worst). JSON adds the text it is
    read from (:func:`json.loads` makes a str of the bytes first, up to 4 bytes per byte)."""
    text = 4 * size if kind == "application/json" else 0
    if size <= UNCOUNTED_BYTES:
        return text + 72 * size + 1024
    if not first:
        return text + bound(size)
    if kind == "application/json":
        scalar = first[0] in _JSON_SCALAR_STARTS
    else:
        scalar = first[0] not in _MSGPACK_CONTAINERS
    return text + (4 * size + 1024 if scalar else bound(size))


def msgpack_needs_meter(body: bytes | bytearray) -> bool:
    """Whether ``body`` could decode past its budget: large, and a map or array at the top."""
    return len(body) > UNCOUNTED_BYTES and body[0] in _MSGPACK_CONTAINERS


def json_needs_meter(body: bytes | bytearray) -> bool:
    """Whether ``body`` could decode past its budget: large, and not one scalar. Leading
    whitespace, a byte-order mark or UTF-16/32 count as "maybe a container"."""
    return len(body) > UNCOUNTED_BYTES and body[0] not in _JSON_SCALAR_STARTS


def _dict_sizes(count: int) -> tuple[int, ...]:
    """``sys.getsizeof`` of a dict after 0, 1, ... ``count - 1`` insertions, as the decoders
    build theirs (one key at a time, no presizing), with bytes keys: their entries are
    larger than those of all-str-key dicts, so the sizes bound both."""
    sizes: list[int] = []
    value: dict[bytes, None] = {}
    for key in range(count):
        sizes.append(sys.getsizeof(value))
        value[bytes([key])] = None
    return tuple(sizes)


#: Dict sizes by length, looked up rather than asked of ``sys.getsizeof`` (a third of the
#: meter's cost per container).
_DICT_SIZES: Final = _dict_sizes(128)
#: A list of n items as msgpack makes it (``PyList_New(n)``): header and n slots.
_LIST_HEADER: Final = sys.getsizeof([])


class Meter:
    """Counts the containers of one value as a decoder builds it; over budget, raises
    :class:`~crew.DecodeError`. :attr:`on_list` and :attr:`on_dict` are the decoders'
    hooks: closures, the cheapest Python call, as they run once per container."""

    __slots__ = ("size", "kind", "on_list", "on_dict", "_charge")

    def __init__(self, size: int, kind: str) -> None:
        self.size = size
        self.kind = kind
        left = budget(size)

        def charge(cost: int) -> None:
            nonlocal left
            left -= cost
            if left < 0:
                self._refuse()

        def on_list(value: list[Any], len: Any = len) -> list[Any]:
            nonlocal left
            left -= _LIST_HEADER + 8 * len(value)
            if left < 0:
                self._refuse()
            return value

        def on_dict(value: dict[Any, Any], len: Any = len, sizes: Any = _DICT_SIZES,
                    getsizeof: Any = sys.getsizeof) -> dict[Any, Any]:
            nonlocal left
            count = len(value)
            left -= sizes[count] if count < 128 else getsizeof(value)
            if left < 0:
                self._refuse()
            return value

        self._charge, self.on_list, self.on_dict = charge, on_list, on_dict

    @classmethod
    def for_msgpack(cls, body: bytes | bytearray) -> "Meter":
        """A meter charged up front for the dear msgpack scalars ``body`` may hold: a byte
        that could start one counts as one (it may be payload; the count is an upper bound)."""
        meter = cls(len(body), "msgpack")
        dear = body.translate(None, _NOT_DEAR)
        if dear:  # 24 for each (_DEAR_EXCESS), 16 more for 0xA2, 16 less for 0xD0 and 0xA4
            meter.charge(24 * len(dear) + 16 * len(dear.translate(None, _NOT_40))
                         - 16 * len(dear.translate(None, _NOT_8)))
        return meter

    @classmethod
    def for_json(cls, body: bytes | bytearray) -> "Meter":
        """A meter charged up front for every list ``body`` may hold (a ``[`` in a string
        counts too), since the JSON decoder has no hook for lists."""
        meter = cls(len(body), "JSON")
        meter.charge(body.count(b"[") * _JSON_LIST_COST)
        return meter

    def charge(self, cost: int) -> None:
        """Count ``cost`` bytes; raise :class:`~crew.DecodeError` once over budget."""
        self._charge(cost)

    def _refuse(self) -> None:
        raise DecodeError(
            f"{self.kind} body of {self.size} bytes decodes into more than "
            f"{budget(self.size)} bytes of Python objects (the limit is "
            f"{DECODE_FACTOR} times the body plus {DECODE_FLOOR // 1024} KiB): too many "
            f"small containers or values")
