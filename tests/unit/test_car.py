"""CARv1 read/write, and refusal of truncated, garbled or lying CARs."""

from __future__ import annotations

import io

import pytest

from cidboot.ipld import dagcbor, varint
from cidboot.ipld.car import CarError, CarReader, CarWriter, encode_header, encode_section
from cidboot.ipld.cid import CID, RAW, CIDMismatch

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


def carv2(inner: bytes, padding: int = 5, trailer: bytes = b"INDEX-BYTES-NOT-A-SECTION") -> bytes:
    """A CARv2 by its spec: pragma, 40-byte header (characteristics, data offset, data size,
    index offset, little-endian), padding, the inner CARv1, then an index we do not read."""
    from cidboot.ipld.car import CARV2_PRAGMA

    data_offset = len(CARV2_PRAGMA) + 40 + padding
    index_offset = data_offset + len(inner)
    header = bytes(16) + b"".join(n.to_bytes(8, "little") for n in (data_offset, len(inner), index_offset))
    return CARV2_PRAGMA + header + bytes(padding) + inner + trailer


def test_carv2_is_unwrapped_to_its_inner_carv1() -> None:
    roots, blocks = read_all(carv2(car_bytes()))
    assert roots == [CA] and blocks == [(CA, A), (CB, B)]


def test_carv2_truncated_or_pointing_backwards_is_refused() -> None:
    whole = carv2(car_bytes())
    with pytest.raises(CarError, match="truncated"):
        read_all(whole[: len(whole) - 30])  # cut inside the inner CARv1's last section
    bad = bytearray(whole)
    bad[11 + 16 : 11 + 24] = (3).to_bytes(8, "little")  # data offset inside the header
    with pytest.raises(CarError, match="points inside the header"):
        read_all(bytes(bad))


def test_trailing_garbage_after_last_section_is_refused() -> None:
    with pytest.raises(CarError):
        read_all(car_bytes() + b"\x05abc")  # a section that claims 5 bytes but has 3
    with pytest.raises(CarError, match="bad CID"):
        read_all(car_bytes() + b"\x03abc")  # a complete section whose CID is garbage


class _Dribble(io.RawIOBase):
    """A stream that hands out at most `step` bytes per read/readinto (a socket, a chunked
    HTTP body): views() must fill each block across many reads."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.pos, self.step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.step, len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        n = len(self.data) - self.pos if n < 0 else n
        out = b""
        while len(out) < n:  # a short read only at the end, like an HTTP response's read(n)
            chunk = self.data[self.pos : self.pos + min(n - len(out), self.step)]
            if not chunk:
                break
            self.pos += len(chunk)
            out += chunk
        return out


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_views_yield_the_same_blocks_read_into_one_reused_buffer(step: int) -> None:
    big = [bytes([i]) * (300 + 1000 * i) for i in range(5)]  # each larger than SECTION_HEAD and the last
    blocks = [(CA, A), *((CID.of(d, RAW), d) for d in big), (CB, B)]
    data = car_bytes(blocks=blocks)
    r = CarReader(_Dribble(data, step))
    got = [(c, bytes(v)) for c, v in r.views()]
    assert got == blocks and r.offset == len(data)
    # the buffer is reused: a view kept past its step shows a later block's bytes, not its own
    views = [(c, v) for c, v in CarReader(io.BytesIO(car_bytes(blocks=[(CB, B), (CA, A)]))).views()]
    assert bytes(views[0][1]) != B


@pytest.mark.parametrize("cut", [1, 5, 100])
def test_views_refuse_a_truncated_or_lying_car(cut: int) -> None:
    blob = bytes(range(256)) * 4
    data = car_bytes(blocks=[(CA, A), (CID.of(blob, RAW), blob)])
    with pytest.raises(CarError, match="truncated"):
        list(CarReader(_Dribble(data[:-cut], 3)).views())
    lying = car_bytes(blocks=[(CA, B)])
    with pytest.raises(CIDMismatch):
        list(CarReader(io.BytesIO(lying)).views())
    assert [bytes(v) for _, v in CarReader(io.BytesIO(lying), verify=False).views()] == [B]


@pytest.mark.parametrize("step", [1, 5, 1 << 20])
def test_views_of_many_tiny_sections_read_ahead_in_one_read(step: int) -> None:
    """views() reads a section's length, CID and first bytes in one read, so several small
    sections arrive together: each must come out whole and in order, and a CARv2's read-ahead
    must stop at the end of its inner CARv1 (the index after it is not a section)."""
    tiny = [bytes([i]) * i for i in range(1, 40)]  # each section far shorter than one read-ahead
    blocks = [(CID.of(d, RAW), d) for d in tiny]
    inner = car_bytes(roots=[blocks[0][0]], blocks=blocks)
    for data in (inner, carv2(inner, trailer=b"\x05index bytes that are not a section")):
        r = CarReader(_Dribble(data, step))
        assert [(c, bytes(v)) for c, v in r.views()] == blocks


def test_views_refuse_a_car_cut_anywhere_in_its_last_small_section() -> None:
    """A cut inside the length varint, the CID or the block of a section that came with the one
    before it is a CarError saying truncated (or, cut just after a whole section, a clean end)."""
    data = car_bytes(blocks=[(CA, A), (CB, B)])
    last = len(encode_section(CB, B))
    for cut in range(1, last):
        with pytest.raises(CarError, match="truncated"):
            list(CarReader(_Dribble(data[:-cut], 1 << 20)).views())
    assert [c for c, _ in CarReader(io.BytesIO(data[:-last])).views()] == [CA]
