"""Strict DAG-CBOR: canonical encoding, and refusal of every non-canonical form."""

import math

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, RAW
from cidboot.ipld.dagcbor import DagCborError

LINK = CID.of(b"x", RAW)


def test_known_encoding() -> None:
    # Keys sort length-first ("b" before "aa"), ints are shortest, CIDs are tag 42 over 0x00+cid.
    obj = {"aa": 1, "b": [LINK, None, True, 1.5]}
    enc = dagcbor.encode(obj)
    assert enc.hex() == (
        "a2" "6162" "84" "d82a5825" "00" + bytes(LINK).hex() + "f6f5fb3ff8000000000000" "626161" "01"
    )
    assert dagcbor.decode(enc) == obj


def test_floats_always_64_bit() -> None:
    assert dagcbor.encode(0.5) == b"\xfb" + (0.5).hex().encode()[:0] + bytes.fromhex("3fe0000000000000")


@pytest.mark.parametrize(
    "hexdata, why",
    [
        ("1801", "shortest"),
        ("190001", "shortest"),
        ("1a0000ffff", "shortest"),
        ("1b00000000ffffffff", "shortest"),
        ("5f4101ff", "indefinite"),
        ("9f01ff", "indefinite"),
        ("a2616101616101", "duplicate"),
        ("a16161", "truncated"),
        ("a2626161016162 02".replace(" ", ""), "out of canonical order"),
        ("a10101", "not a string"),
        ("c11a00000000", "tag 1"),
        ("c249010000000000000000", "tag 2"),
        ("d82a4101", "0x00 multibase prefix"),
        ("d82a420001", "invalid CID"),
        ("d82a01", "byte string"),
        ("f97c00", "64-bit"),
        ("fa7f800000", "64-bit"),
        ("fb7ff8000000000000", "NaN"),
        ("fb7ff0000000000000", "Infinity"),
        ("f7", "undefined"),
        ("f0", "simple value"),
        ("0000", "trailing"),
        ("62c328", "UTF-8"),
        ("9affffffff", "exceeds remaining"),
        ("", "empty"),
        ("5a7fffffff", "truncated"),
    ],
)
def test_rejects_non_canonical(hexdata: str, why: str) -> None:
    with pytest.raises(DagCborError, match=why):
        dagcbor.decode(bytes.fromhex(hexdata))


def test_depth_and_size_limits() -> None:
    deep = b"\x81" * 100 + b"\x01"
    with pytest.raises(DagCborError, match="deeper than 64"):
        dagcbor.decode(deep)
    assert dagcbor.decode(deep, max_depth=200) is not None
    with pytest.raises(DagCborError, match="limit"):
        dagcbor.decode(b"\x41\x00", max_size=1)


def test_encoder_refuses_what_it_cannot_represent() -> None:
    for bad in (math.nan, math.inf, {1: 2}, object(), 2**64):
        with pytest.raises(DagCborError):
            dagcbor.encode(bad)


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.just(LINK),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5),
    max_leaves=30,
)


@given(values)
@settings(max_examples=300, deadline=None)
def test_round_trip_is_identity(v: object) -> None:
    enc = dagcbor.encode(v)
    assert dagcbor.decode(enc) == v
    assert dagcbor.encode(dagcbor.decode(enc)) == enc


@given(st.binary(max_size=64))
@settings(max_examples=2000, deadline=None)
def test_random_bytes_only_raise_dagcbor_error(data: bytes) -> None:
    try:
        v = dagcbor.decode(data)
    except DagCborError:
        return
    assert dagcbor.encode(v) == data  # whatever is accepted is canonical


@given(values, st.data())
@settings(max_examples=300, deadline=None)
def test_mutations_are_rejected_or_canonical(v: object, data: st.DataObject) -> None:
    enc = bytearray(dagcbor.encode(v))
    i = data.draw(st.integers(min_value=0, max_value=len(enc) - 1))
    enc[i] ^= data.draw(st.integers(min_value=1, max_value=255))
    try:
        out = dagcbor.decode(bytes(enc))
    except DagCborError:
        return
    assert dagcbor.encode(out) == bytes(enc)


def test_agrees_with_cbor2_canonical_on_plain_data() -> None:
    obj = {"name": "hello", "version": 3, "list": [1, 2, {"z": b"\x00", "aa": -7}]}
    assert dagcbor.encode(obj) == cbor2.dumps(obj, canonical=True)
