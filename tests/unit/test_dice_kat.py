"""Open Profile for DICE against open-dice's published known test values, byte for byte."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from cidboot.trust import cose
from cidboot.trust.cose_key import raw_public_bytes
from cidboot.trust.dice import (
    DiceConfigType,
    DiceInputError,
    DiceInputs,
    derive_cdi_private_key_seed,
    derive_id,
    key_from_cdi,
    main_flow,
    parse_certificate,
    root_public_key_from_uds,
    uds_keypair,
)

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors/dice/known_test_values.json").read_text())["values"]


def fake(seed: str, n: int) -> bytes:
    """open-dice's DeriveFakeInputValue: SHA-512 of a 64-byte state whose first 8 bytes are a
    little-endian counter."""
    state = bytearray(hashlib.sha512(seed.encode()).digest())
    out = b""
    while len(out) < n:
        out += hashlib.sha512(bytes(state)).digest()
        struct.pack_into("<Q", state, 0, (struct.unpack_from("<Q", state)[0] + 1) % 2**64)
    return out[:n]


def case(name: str, profile: str | None) -> tuple[bytes, bytes, DiceInputs]:
    if name == "ZeroInput":
        return bytes(32), bytes(32), DiceInputs(profile_name=profile)
    if name == "HashOnlyInput":
        return fake("cdi_attest", 32), fake("cdi_seal", 32), DiceInputs(
            code_hash=fake("code_hash", 64), authority_hash=fake("authority_hash", 64),
            config_value=fake("inline_config", 64), profile_name=profile)
    return fake("cdi_attest", 32), fake("cdi_seal", 32), DiceInputs(
        code_hash=fake("code_hash", 64), code_descriptor=fake("code_desc", 100), config_value=None,
        config_descriptor=fake("config_desc", 40), authority_hash=fake("authority_hash", 64),
        authority_descriptor=fake("authority_desc", 65), profile_name=profile)


ED25519_CASES = [
    ("ZeroInput", None, "kExpectedCborEd25519Cert_ZeroInput"),
    ("HashOnlyInput", None, "kExpectedCborEd25519Cert_HashOnlyInput"),
    ("ZeroInput", "android.18", "kExpectedCborEd25519Cert_AndroidZeroInput"),
    ("HashOnlyInput", "android.18", "kExpectedCborEd25519Cert_AndroidHashOnlyInput"),
    ("DescriptorInput", "android.18", "kExpectedCborEd25519Cert_AndroidDescriptorInput"),
]


@pytest.mark.parametrize("name, profile, cert_name", ED25519_CASES)
def test_ed25519_byte_for_byte(name: str, profile: str | None, cert_name: str) -> None:
    attest, seal, inputs = case(name, profile)
    next_attest, next_seal, cert = main_flow(attest, seal, inputs)
    assert next_attest.hex() == VECTORS[f"kExpectedCdiAttest_{name}"]
    assert next_seal.hex() == VECTORS[f"kExpectedCdiSeal_{name}"]
    assert cert.hex() == VECTORS[cert_name]


@pytest.mark.parametrize("alg, sig_size", [("p256", 64), ("p384", 96)])
@pytest.mark.parametrize("name", ["ZeroInput", "HashOnlyInput", "DescriptorInput"])
def test_ecdsa_all_but_signature(alg: str, sig_size: int, name: str) -> None:
    attest, seal, inputs = case(name, "opendice.example")
    next_attest, _, cert = main_flow(attest, seal, inputs, key_alg=alg)
    expected = bytes.fromhex(VECTORS[f"kExpectedCbor{alg.upper()}Cert_{name}"])
    assert next_attest.hex() == VECTORS[f"kExpectedCdiAttest_{name}"]
    assert len(cert) == len(expected)
    assert cert[:-sig_size] == expected[:-sig_size]
    cose.verify1_attached(cert, key_from_cdi(attest, alg).public_key())
    # and open-dice's own certificate verifies with the key we derived: same key, same algorithm
    cose.verify1_attached(expected, key_from_cdi(attest, alg).public_key())


def test_certificate_parses_back() -> None:
    attest, seal, inputs = case("DescriptorInput", "android.18")
    _, _, cert = main_flow(attest, seal, inputs)
    c = parse_certificate(cert)
    assert c.code_hash == inputs.code_hash and c.code_descriptor == inputs.code_descriptor
    assert c.config == hashlib.sha512(fake("config_desc", 40)).digest()
    assert c.profile_name == "android.18" and c.mode == 0


@pytest.mark.parametrize("alg, cert_name", [("ed25519", "kExpectedCborEd25519Cert_ZeroInput"),
                                            ("p256", "kExpectedCborP256Cert_ZeroInput"),
                                            ("p384", "kExpectedCborP384Cert_ZeroInput")])
def test_uds_key_is_the_issuer_of_open_dices_first_certificate(alg: str, cert_name: str) -> None:
    """With the all-zero UDS as the first current CDI, open-dice's certificate is issued and
    signed by the UDS key pair: its issuer is that key's ID and the signature verifies with it."""
    expected = bytes.fromhex(VECTORS[cert_name])
    root = root_public_key_from_uds(bytes(32), alg)
    cose.verify1_attached(expected, root)
    assert parse_certificate(expected).issuer == derive_id(raw_public_bytes(root)).hex()
    assert raw_public_bytes(uds_keypair(bytes(32), alg).public_key()) == raw_public_bytes(root)
    with pytest.raises(cose.CoseSignatureError):
        cose.verify1_attached(expected, root_public_key_from_uds(bytes([1]) * 32, alg))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(DiceInputError, match="UDS must be 32 bytes"):
        uds_keypair(bytes(16))
    with pytest.raises(DiceInputError, match="CDI_Attest must be 32 bytes"):
        derive_cdi_private_key_seed(bytes(31))
    with pytest.raises(DiceInputError, match="code_hash must be 64 bytes"):
        DiceInputs(code_hash=bytes(32))
    with pytest.raises(DiceInputError, match="inline config"):
        DiceInputs(config_value=bytes(3))
    with pytest.raises(DiceInputError, match="unknown DICE key algorithm"):
        main_flow(bytes(32), bytes(32), DiceInputs(), key_alg="rsa")
    with pytest.raises(DiceInputError, match="CDIs must be 32 bytes"):
        main_flow(bytes(31), bytes(32), DiceInputs())
    assert DiceInputs(config_value=None, config_descriptor=b"d").config_type is DiceConfigType.DESCRIPTOR
    assert DiceInputs().config_type is DiceConfigType.INLINE
