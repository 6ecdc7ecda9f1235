"""CARv1 read/write, and refusal of truncated, garbled or lying CARs."""

from __future__ import annotations

import io

import pytest

from cidboot import dagcbor, varint
from cidboot.car import CarError, CarReader, CarWriter, encode_header, encode_section
from cidboot.cid import CID, RAW, CIDMismatch

A, B = b"block a", b"block b"
CA, CB = CID.of(A, RAW), CID.of(B, RAW)


def car_bytes(roots: list[CID] = [CA], blocks: list[tuple[CID, bytes]] = [(CA, A), (CB, B)]) -> bytes:  # noqa: B006
    buf = io.BytesIO()
    w = CarWriter(buf, roots)
    for c, d in blocks:
        w.write(c, d)
    return buf.getvalue()


def read_all(data: bytes) -> tuple[list[CID], list[tuple[CID, bytes]]]:
    r = CarReader(io.BytesIO(data))
    return r.roots, list(r)


def test_round_trip() -> None:
    roots, blocks = read_all(car_bytes())
    assert roots == [CA] and blocks == [(CA, A), (CB, B)]


def test_known_header_bytes() -> None:
    # {"roots": [CA], "version": 1} in DAG-CBOR, length-prefixed: the spec's header shape.
    hdr = encode_header([CA])
    n, off = varint.decode(hdr)
    assert dagcbor.decode(hdr[off:]) == {"roots": [CA], "version": 1} and n == len(hdr) - off


@pytest.mark.parametrize("cut", [1, 5, 20, 60, -1, -len(B) - 3])
def test_truncated_car_is_refused(cut: int) -> None:
    data = car_bytes()[:cut]
    with pytest.raises(CarError, match="truncated|empty|header"):
        read_all(data)


def test_block_that_does_not_match_its_cid() -> None:
    bad = encode_header([CA]) + encode_section(CA, b"not block a")
    with pytest.raises(CIDMismatch, match=str(CA)):
        read_all(bad)


@pytest.mark.parametrize(
    "header, why",
    [
        ({"roots": [CA], "version": 2}, "unsupported CAR version"),
        ({"roots": [], "version": 1}, "non-empty list"),
        ({"roots": ["x"], "version": 1}, "non-empty list"),
        ({"version": 1}, "exactly roots and version"),
        ({"roots": [CA], "version": 1, "x": 1}, "exactly roots and version"),
    ],
)
def test_bad_headers(header: dict, why: str) -> None:
    raw = dagcbor.encode(header)
    with pytest.raises(CarError, match=why):
        read_all(varint.encode(len(raw)) + raw)


def test_header_not_dagcbor() -> None:
    with pytest.raises(CarError, match="not DAG-CBOR"):
        read_all(b"\x03\xa1\x61\x61")


def test_absurd_section_length() -> None:
    with pytest.raises(CarError, match="out of range"):
        read_all(encode_header([CA]) + varint.encode(2**40))


def test_garbled_cid_in_section() -> None:
    with pytest.raises(CarError, match="bad CID"):
        read_all(encode_header([CA]) + varint.encode(5) + b"\x01\xff\xff\xff\x01")


def test_header_length_zero_or_huge() -> None:
    with pytest.raises(CarError, match="out of range"):
        read_all(b"\x00")
    with pytest.raises(CarError, match="out of range"):
        read_all(varint.encode(10**9))
