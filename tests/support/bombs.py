"""Gzip bombs: valid gzip bodies that inflate a thousandfold, built without holding what they
inflate to (hostile-input tests, unit and broker)."""

from __future__ import annotations

import struct
import zlib


MiB = 1024 * 1024


def gzip_bomb(size: int) -> bytes:
    """A valid gzip body of ``size`` zero bytes (a multiple of 1 MiB), about 1000 times
    smaller, built without ever holding ``size`` bytes: after a full flush deflate starts
    afresh, so every 1 MiB of zeros compresses to the same block."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate; gzip framing below
    zeros = bytes(MiB)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(size // MiB):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)
    return header + block * (size // MiB) + compressor.flush() + trailer
