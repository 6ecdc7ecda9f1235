"""COSE_Sign1 / COSE_Sign and COSE_Key: round trips, tampering, strict parsing."""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from cidboot.trust import cose
from cidboot.trust.cose import CoseFormatError, CoseSignatureError
from cidboot.trust.cose_key import decode_public_key, encode_public_key, encode_public_key_bytes, key_id

KEYS: dict[str, cose.PrivateKey] = {
    "ed25519": ed25519.Ed25519PrivateKey.generate(),
    "es256": ec.generate_private_key(ec.SECP256R1()),
    "es384": ec.generate_private_key(ec.SECP384R1()),
}


@pytest.mark.parametrize("name", list(KEYS))
def test_sign1_round_trip_and_tamper(name: str) -> None:
    key = KEYS[name]
    msg = cose.sign1(b"payload", key, kid=b"k1", external_aad=b"aad")
    assert cose.verify1_attached(msg, key.public_key(), external_aad=b"aad") == b"payload"
    s = cose.decode_sign1(msg)
    assert s.payload == b"payload" and s.kid == b"k1" and s.alg == cose.alg_for_key(key)
    with pytest.raises(CoseSignatureError):
        cose.verify1_attached(msg, key.public_key(), external_aad=b"other")
    arr = list(cbor2.loads(msg).value)
    arr[2] = b"payloaD"
    with pytest.raises(CoseSignatureError):
        cose.verify1_attached(cbor2.dumps(cbor2.CBORTag(18, arr)), key.public_key())


def test_wrong_key_type_is_refused() -> None:
    msg = cose.sign1(b"x", KEYS["ed25519"])
    with pytest.raises(CoseSignatureError, match="does not match the key"):
        cose.verify1_attached(msg, KEYS["es256"].public_key())
    with pytest.raises(CoseSignatureError):
        cose.verify1_attached(msg, ed25519.Ed25519PrivateKey.generate().public_key())


@pytest.mark.parametrize(
    "obj, why",
    [
        (cbor2.CBORTag(17, [b"", {}, b"", b""]), "wrong tag"),
        ([b"", {}, b""], "array of 4"),
        (["not bytes", {}, b"", b""], "protected header must be a byte string"),
        ([cbor2.dumps([1]), {}, b"", b""], "encode a map"),
        ([cbor2.dumps({1: -8}), {1: -8}, b"", b""], "in both"),
        ([cbor2.dumps({1: -8, 2: [99]}), {}, b"", b""], "unknown critical"),
        ([cbor2.dumps({1: -8}), {}, 5, b""], "payload"),
        ([cbor2.dumps({1: -8}), {}, b"", "sig"], "signature must be"),
        ([cbor2.dumps({3: 0}), {}, b"", b""], "no integer alg"),
        ([cbor2.dumps({1: -8}), [], b"", b""], "must be maps"),
    ],
)
def test_strict_sign1_parsing(obj: object, why: str) -> None:
    with pytest.raises(CoseFormatError, match=why):
        cose.decode_sign1(cbor2.dumps(obj))


def test_trailing_bytes_and_garbage() -> None:
    msg = cose.sign1(b"x", KEYS["ed25519"])
    with pytest.raises(CoseFormatError, match="trailing"):
        cose.decode_sign1(msg + b"\x00")
    with pytest.raises(CoseFormatError, match="not valid CBOR"):
        cose.decode_sign1(b"\x9f")


def test_multi_signer() -> None:
    signers = [(KEYS["ed25519"], b"a"), (KEYS["es256"], b"b")]
    msg = cose.decode_sign(cose.sign_multi(b"manifest", signers))
    assert [s.kid for s in msg.signatures] == [b"a", b"b"]
    assert cose.verify_signature_attached(msg, msg.signatures[0], KEYS["ed25519"].public_key()) == b"manifest"
    cose.verify_signature_attached(msg, msg.signatures[1], KEYS["es256"].public_key())
    with pytest.raises(CoseSignatureError):
        cose.verify_signature_attached(msg, msg.signatures[0], KEYS["es256"].public_key())
    with pytest.raises(CoseFormatError, match="non-empty"):
        cose.decode_sign(cbor2.dumps(cbor2.CBORTag(98, [b"", {}, b"p", []])))


@pytest.mark.parametrize("name", list(KEYS))
def test_cose_key_round_trip(name: str) -> None:
    pub = KEYS[name].public_key()
    assert encode_public_key_bytes(decode_public_key(encode_public_key_bytes(pub))) == encode_public_key_bytes(pub)
    assert len(key_id(pub)) == 32
    assert list(encode_public_key(pub))[:4] == [1, 3, 4, -1]  # open-dice's order: kty, alg, key_ops, crv


@pytest.mark.parametrize(
    "m, why",
    [
        ({1: 1, -1: 6, -2: b"short"}, "32-byte"),
        ({1: 1, -1: 1, -2: bytes(32)}, "Ed25519"),
        ({1: 2, -1: 1, -2: bytes(32), -3: bytes(32)}, "not on the curve"),
        ({1: 2, -1: 9, -2: bytes(32), -3: bytes(32)}, "unsupported EC2 curve"),
        ({1: 4, -2: b""}, "unsupported kty"),
        ({1: 1, 3: -7, -1: 6, -2: bytes(32)}, "does not fit"),
        ([1], "must be a map"),
    ],
)
def test_bad_cose_keys(m: object, why: str) -> None:
    with pytest.raises(CoseFormatError, match=why):
        decode_public_key(cbor2.dumps(m))


@pytest.mark.parametrize(
    "data, why",
    [
        (bytes.fromhex("d2 9f 40 a0 40 40 ff".replace(" ", "")), "indefinite-length"),
        (bytes.fromhex("d2 84 44 a1 18 01 27 a0 40 40".replace(" ", "")), "non-shortest"),
        (bytes.fromhex("d2 84 45 a2 01 27 01 26 a0 40 40".replace(" ", "")), "duplicate map key"),
        (bytes.fromhex("d2 84 40 a2 04 40 04 41 00 40 40".replace(" ", "")), "duplicate map key"),
        (bytes.fromhex("d8 12 84 40 a0 40 40"), "non-shortest"),
        (b"\x81" * 40 + b"\x00", "nested deeper"),
        (bytes.fromhex("d2 84 40 a0 5a 00 01 00 00"), "truncated"),
        (bytes.fromhex("d2 84 40 a0 f8 00 40"), "simple value"),
        (bytes.fromhex("d2 84 40 a0 40 5c"), "reserved"),
    ],
)
def test_strict_cbor_encoding(data: bytes, why: str) -> None:
    """cbor2 would accept all of these; a signed format must not (one meaning per message)."""
    with pytest.raises(CoseFormatError, match=why):
        cose.decode_sign1(data)


def test_protected_header_is_deterministic_and_alg_conflict_refused() -> None:
    key = KEYS["ed25519"]
    msg = cose.sign1(b"x", key, kid=b"k", protected={cose.HDR_CONTENT_TYPE: 60})
    assert cose.decode_sign1(msg).protected_raw == cbor2.dumps({1: -8, 3: 60, 4: b"k"})
    with pytest.raises(CoseFormatError, match="does not match the signing key"):
        cose.sign1(b"x", key, protected={cose.HDR_ALG: cose.ALG_ES256})
    with pytest.raises(CoseFormatError, match="in both"):
        cose.sign1(b"x", key, kid=b"k", unprotected={cose.HDR_KID: b"k"})


def test_detached_payload() -> None:
    key = KEYS["es256"]
    msg = cose.decode_sign(cose.sign_multi(b"body", [(key, b"a")], detached=True))
    assert msg.payload is None
    cose.verify_signature_detached(msg, msg.signatures[0], key.public_key(), b"body")
    with pytest.raises(CoseSignatureError):
        cose.verify_signature_detached(msg, msg.signatures[0], key.public_key(), b"bodY")
    with pytest.raises(cose.CosePayloadSlotError, match="attached payload is required"):
        cose.verify_signature_attached(msg, msg.signatures[0], key.public_key())


def test_ecdsa_signature_is_raw_r_s() -> None:
    for name, size in (("es256", 64), ("es384", 96)):
        s = cose.decode_sign1(cose.sign1(b"x", KEYS[name]))
        assert len(s.signature) == size
        with pytest.raises(CoseSignatureError, match=f"must be {size} bytes"):
            cose.verify1_attached(cose.Sign1(s.protected, s.protected_raw, s.unprotected, s.payload, s.signature[1:]),
                         KEYS[name].public_key())


@pytest.mark.parametrize(
    "m, why",
    [
        ({1: 1, -1: 6, -2: bytes(32), -4: bytes(32)}, "private key material"),
        ({1: 1, 4: [1], -1: 6, -2: bytes(32)}, "does not allow verify"),
    ],
)
def test_cose_key_refuses_private_or_non_verify_keys(m: object, why: str) -> None:
    with pytest.raises(CoseFormatError, match=why):
        decode_public_key(cbor2.dumps(m))
