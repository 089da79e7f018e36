"""A gzip bomb as crew's codec meets it, without a broker (sent to a worker:
tests/broker/test_hostile.py)."""

from __future__ import annotations

import tracemalloc
import zlib

import pytest

from crew import codec, protocol
from crew.exceptions import MessageTooLargeError
from crew.protocol import MSGPACK
from tests.support.bombs import MiB


def test_gzip_bomb_is_what_it_claims(bomb):
    assert len(bomb) < 2 * MiB
    decompressor = zlib.decompressobj(31)
    assert decompressor.decompress(bomb, 3 * MiB) == bytes(3 * MiB)


def test_gzip_bomb_decode_stays_within_the_decompressed_limit(bomb):
    limit = protocol.MAX_DECOMPRESSED_BYTES
    tracemalloc.start()
    try:
        with pytest.raises(MessageTooLargeError, match="decompresses to more than"):
            codec.decode(bomb, MSGPACK, "gzip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The limit, the output buffer's growth reserve (an eighth) and a step or two: far from
    # the 1 GiB the bomb expands to, and from the 2x limit of a one-shot decompress().
    assert peak < limit + limit // 8 + 4 * MiB, f"peak {peak / MiB:.1f} MiB"
