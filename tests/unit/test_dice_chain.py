"""DICE chains: a real three-layer chain verifies; each broken rule names its entry."""

from __future__ import annotations

import cbor2
import pytest

from cidboot.trust import cose
from cidboot.trust.dice import (
    DiceChainError,
    DiceInputs,
    DiceMode,
    decode_handover,
    encode_chain,
    encode_handover,
    key_from_cdi,
    main_flow,
    verify_chain,
)
from cidboot.trust.dice.cert import ISS, KEY_USAGE, SUB
from cidboot.trust.dice.chain import HandoverError, append_to_chain

UDS = bytes(range(32))


def build(modes: tuple[DiceMode, ...] = (DiceMode.NORMAL,) * 3, profile: str | None = "cidboot.1") -> tuple[bytes, list[bytes], bytes]:
    root = key_from_cdi(UDS).public_key()
    attest, seal = UDS, UDS
    certs = []
    for i, mode in enumerate(modes):
        attest, seal, cert = main_flow(attest, seal, DiceInputs(code_hash=bytes([i + 1]) * 64, mode=mode, profile_name=profile))
        certs.append(cert)
    return encode_chain(root, certs), certs, attest


def test_three_layer_chain_verifies() -> None:
    chain, certs, leaf_cdi = build()
    v = verify_chain(chain, expected_profile="cidboot.1")
    assert [e.code_hash[0] for e in v.entries] == [1, 2, 3]
    assert v.leaf_public_key.public_bytes_raw() == key_from_cdi(leaf_cdi).public_key().public_bytes_raw()  # type: ignore[union-attr]
    assert append_to_chain(encode_chain(key_from_cdi(UDS).public_key(), certs[:2]), certs[2]) == chain


def test_debug_mode_refused_unless_allowed() -> None:
    chain, _, _ = build((DiceMode.NORMAL, DiceMode.DEBUG, DiceMode.NORMAL))
    with pytest.raises(DiceChainError, match="chain entry 2: layer booted in debug mode"):
        verify_chain(chain)
    verify_chain(chain, allow_debug=True)


def test_wrong_signer_named() -> None:
    _, certs, _ = build()
    other_root = key_from_cdi(bytes(32)).public_key()
    with pytest.raises(DiceChainError, match="chain entry 1: not signed by the key of entry 0"):
        verify_chain(encode_chain(other_root, certs))
    with pytest.raises(DiceChainError, match="chain entry 2: not signed"):
        verify_chain(encode_chain(key_from_cdi(UDS).public_key(), [certs[0], certs[2]]))


def test_tampered_entry_named() -> None:
    chain, _, _ = build()
    items = cbor2.loads(chain)
    claims = cbor2.loads(items[2][2])
    claims[-4670545] = bytes(64)  # change layer 2's code hash
    items[2][2] = cbor2.dumps(claims)
    with pytest.raises(DiceChainError, match="chain entry 2"):
        verify_chain(cbor2.dumps(items))


def test_repeated_entry_and_profile_mismatch() -> None:
    chain, certs, _ = build()
    with pytest.raises(DiceChainError, match="profile"):
        verify_chain(chain, expected_profile="android.18")
    items = cbor2.loads(chain)
    with pytest.raises(DiceChainError, match="chain entry 4"):
        verify_chain(cbor2.dumps([*items, items[3]]))


@pytest.mark.parametrize("bad, why", [(b"\xa0", "non-empty array"), (cbor2.dumps([{1: 9}]), "entry 0"),
                                      (cbor2.dumps([{1: 1, -1: 6, -2: bytes(32)}, [1, 2]]), "entry 1"), (b"\xff", "CBOR")])
def test_malformed_chains(bad: bytes, why: str) -> None:
    with pytest.raises(DiceChainError, match=why):
        verify_chain(bad)


def test_handover_round_trip_and_bad() -> None:
    chain, _, leaf = build()
    h = decode_handover(encode_handover(leaf, leaf, chain))
    assert h.cdi_attest == leaf and h.chain == chain
    for bad in (cbor2.dumps({1: b"x", 2: b"y", 3: [1]}), cbor2.dumps({1: leaf}), b"\x01\x02"):
        with pytest.raises(HandoverError):
            decode_handover(bad)


def resigned(field: int, value: object) -> bytes:
    """A two-layer chain whose second certificate has `field` replaced and is then properly
    re-signed by layer 1's key, so only the rule about `field` can catch it."""
    root = key_from_cdi(UDS).public_key()
    a1, s1, c1 = main_flow(UDS, UDS, DiceInputs(code_hash=bytes([1]) * 64))
    _, _, c2 = main_flow(a1, s1, DiceInputs(code_hash=bytes([2]) * 64))
    claims = cbor2.loads(cbor2.loads(c2)[2])
    claims[field] = value
    return encode_chain(root, [c1, cose.sign1(cbor2.dumps(claims), key_from_cdi(a1), tagged=False)])


@pytest.mark.parametrize("field, value, why", [
    (ISS, "00" * 20, "chain entry 2: issuer 00.* does not match subject .* of entry 1"),
    (SUB, "7f" * 20, "chain entry 2: subject 7f.* is not the ID of its public key"),
    (KEY_USAGE, b"\x01", "chain entry 2: key usage"),
])
def test_properly_signed_but_wrong_fields_named(field: int, value: object, why: str) -> None:
    with pytest.raises(DiceChainError, match=why):
        verify_chain(resigned(field, value))


def test_resigned_control_verifies() -> None:
    """The re-signing helper itself yields a valid chain when the field keeps its value."""
    assert len(verify_chain(resigned(KEY_USAGE, b"\x20")).entries) == 2
