"""Unsigned LEB128 varints as multiformats use them (CIDs, multihash, CAR sections).

Strict on decode: a varint must be minimally encoded and at most 9 bytes (63 bits), as the
multiformats unsigned-varint spec requires, so two encodings never name the same number.
"""

from __future__ import annotations

from typing import BinaryIO

from cidboot.errors import FormatError

MAX_BYTES = 9


class VarintError(FormatError):
    """A varint is truncated, overlong or not minimally encoded."""


def encode(n: int) -> bytes:
    if n < 0 or n >= 1 << 63:
        raise VarintError(f"varint out of range: {n}")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def decode(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """Return (value, offset just past the varint)."""
    value = shift = 0
    for i in range(MAX_BYTES):
        pos = offset + i
        if pos >= len(buf):
            raise VarintError(f"truncated varint at offset {offset}")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if b == 0 and i > 0:
                raise VarintError(f"varint at offset {offset} is not minimally encoded")
            return value, pos + 1
        shift += 7
    raise VarintError(f"varint at offset {offset} is longer than {MAX_BYTES} bytes")


def read_stream(stream: BinaryIO) -> int | None:
    """Read one varint from a binary stream; None at a clean end of stream."""
    raw = bytearray()
    while True:
        c = stream.read(1)
        if not c:
            if raw:
                raise VarintError("truncated varint at end of stream")
            return None
        raw += c
        if not c[0] & 0x80:
            return decode(raw)[0]
        if len(raw) >= MAX_BYTES:
            raise VarintError(f"varint longer than {MAX_BYTES} bytes in stream")
