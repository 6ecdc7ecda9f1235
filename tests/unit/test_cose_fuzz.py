"""Property tests: the COSE, COSE_Key, DICE certificate/CWT and handover parsers fail only with
their documented error types, on random bytes and on mutations of valid messages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from cidboot.errors import FormatError, VerificationError
from cidboot.trust import cose
from cidboot.trust.cose_key import decode_public_key, encode_public_key_bytes
from cidboot.trust.dice import (
    DiceInputs,
    decode_handover,
    encode_chain,
    encode_handover,
    key_from_cdi,
    main_flow,
    parse_certificate,
    verify_chain,
)

KEY = ed25519.Ed25519PrivateKey.generate()
_, _, CERT = main_flow(bytes(32), bytes(32), DiceInputs(profile_name="x"))
CHAIN = encode_chain(key_from_cdi(bytes(32)).public_key(), [CERT])
SAMPLES: dict[str, tuple[Callable[[bytes], Any], bytes]] = {
    "sign1": (cose.decode_sign1, cose.sign1(b"hello", KEY, kid=b"k")),
    "sign": (cose.decode_sign, cose.sign_multi(b"hello", [(KEY, b"k")])),
    "cose_key": (decode_public_key, encode_public_key_bytes(KEY.public_key())),
    "dice_cert": (parse_certificate, CERT),
    "dice_chain": (verify_chain, CHAIN),
    "handover": (decode_handover, encode_handover(bytes(32), bytes(32), CHAIN)),
}
DOCUMENTED = (FormatError, VerificationError)


@pytest.mark.parametrize("name", list(SAMPLES))
@given(data=st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes(name: str, data: bytes) -> None:
    parse, _ = SAMPLES[name]
    try:
        parse(data)
    except DOCUMENTED:
        pass


@pytest.mark.parametrize("name", list(SAMPLES))
@given(st.data())
@settings(max_examples=300, deadline=None)
def test_mutated_valid_messages(name: str, data: st.DataObject) -> None:
    parse, good = SAMPLES[name]
    buf = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(buf)))
    try:
        parse(bytes(buf[:cut]))
    except DOCUMENTED:
        pass


CBOR_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.integers(-5, 5) | st.text(max_size=3), inner, max_size=5)
    | st.builds(cbor2.CBORTag, st.sampled_from([18, 98, 42, 1]), inner),
    max_leaves=20,
)


@pytest.mark.parametrize("name", list(SAMPLES))
@given(value=CBOR_VALUES, wrap=st.booleans())
@settings(max_examples=300, deadline=None)
def test_well_formed_cbor_of_the_wrong_shape(name: str, value: object, wrap: bool) -> None:
    """Valid CBOR gets past the decoder into the shape checks; those must fail cleanly too.
    With `wrap`, the value goes where the parser looks next: encoded as a COSE payload (for a
    DICE certificate that is the CWT claims), as the first chain entry, as the handover's chain."""
    parse, good = SAMPLES[name]
    if wrap:
        outer = cbor2.loads(good)
        if isinstance(outer, cbor2.CBORTag):
            outer = cbor2.CBORTag(outer.tag, [outer.value[0], outer.value[1], cbor2.dumps(value), *outer.value[3:]])
        elif name == "dice_cert":
            outer = [outer[0], outer[1], cbor2.dumps(value), outer[3]]
        elif isinstance(outer, list):
            outer = [value, *outer[1:]]
        elif isinstance(outer, dict):
            outer = {**outer, 3: value}
        value = outer
    try:
        parse(cbor2.dumps(value))
    except DOCUMENTED:
        pass
