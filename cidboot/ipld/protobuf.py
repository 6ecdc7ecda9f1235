"""The few protobuf wire-format primitives dag-pb and UnixFS need, strictly.

Both formats are tiny proto2 messages; a general protobuf library would accept far more than
the IPLD specs allow (unknown fields, any field order), so we read exactly what is specified.
"""

from __future__ import annotations

from collections.abc import Iterator

from cidboot.errors import FormatError
from cidboot.ipld import varint

VARINT = 0
LEN = 2


def key(field: int, wire_type: int) -> bytes:
    return varint.encode(field << 3 | wire_type)


def field_bytes(field: int, value: bytes) -> bytes:
    return key(field, LEN) + varint.encode(len(value)) + value


def field_varint(field: int, value: int) -> bytes:
    return key(field, VARINT) + varint.encode(value)


def iter_fields(buf: bytes, error: type[FormatError], what: str) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) for varint and length-delimited fields only."""
    pos = 0
    while pos < len(buf):
        try:
            k, pos = varint.decode(buf, pos)
        except FormatError as e:
            raise error(f"{what}: bad field key at byte {pos}: {e}") from None
        field, wt = k >> 3, k & 7
        if field == 0:
            raise error(f"{what}: field number 0 at byte {pos}")
        if wt == VARINT:
            try:
                v, pos = varint.decode(buf, pos)
            except FormatError as e:
                raise error(f"{what}: field {field}: {e}") from None
            yield field, wt, v
        elif wt == LEN:
            try:
                n, pos = varint.decode(buf, pos)
            except FormatError as e:
                raise error(f"{what}: field {field} length: {e}") from None
            if n > len(buf) - pos:
                raise error(f"{what}: field {field} length {n} runs past the end ({len(buf) - pos} bytes left)")
            yield field, wt, buf[pos : pos + n]
            pos += n
        else:
            raise error(f"{what}: field {field} has unsupported wire type {wt}")
