"""COSE_Key (RFC 9053) encoding of public keys, in open-dice's field order.

open-dice writes kty, alg, key_ops [verify], crv, x (and y for EC2) in that order, and DICE
certificates embed those bytes, so we reproduce the order exactly rather than sorting.
A key's id is SHA-256 of its encoded COSE_Key: stable, and the same on every machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from cidboot.trust.cose import (
    ALG_EDDSA,
    ALG_ES256,
    ALG_ES384,
    CoseFormatError,
    PublicKey,
    alg_for_key,
    cbor_loads_exact,
)
from cidboot.trust.rawkey import public_raw

KTY, ALG, KEY_OPS, CRV, X, Y, D = 1, 3, 4, -1, -2, -3, -4
KTY_OKP, KTY_EC2 = 1, 2
CRV_P256, CRV_P384, CRV_ED25519 = 1, 2, 6
OP_VERIFY = 2
_EC_CURVES = {CRV_P256: (ec.SECP256R1(), ALG_ES256, 32), CRV_P384: (ec.SECP384R1(), ALG_ES384, 48)}


def raw_public_bytes(pub: PublicKey) -> bytes:
    """Ed25519: the 32-byte key; EC: x||y (what open-dice hashes into a certificate ID).

    Without `cryptography.hazmat.primitives.serialization` (for its Encoding enums): that package
    imports its SSH module, and with it ciphers, RSA, DSA and padding, ~0.1 s at a stage's start
    under TCG for a stage that only needs these bytes."""
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return public_raw(pub)
    n = pub.public_numbers()
    size = (pub.curve.key_size + 7) // 8
    return n.x.to_bytes(size, "big") + n.y.to_bytes(size, "big")


def encode_public_key(pub: PublicKey) -> dict[int, Any]:
    alg = alg_for_key(pub)
    raw = raw_public_bytes(pub)
    if alg == ALG_EDDSA:
        return {KTY: KTY_OKP, ALG: alg, KEY_OPS: [OP_VERIFY], CRV: CRV_ED25519, X: raw}
    crv = CRV_P256 if alg == ALG_ES256 else CRV_P384
    half = len(raw) // 2
    return {KTY: KTY_EC2, ALG: alg, KEY_OPS: [OP_VERIFY], CRV: crv, X: raw[:half], Y: raw[half:]}


def encode_public_key_bytes(pub: PublicKey) -> bytes:
    return cbor2.dumps(encode_public_key(pub))


def decode_public_key(obj: Mapping[int, Any] | bytes) -> PublicKey:
    m = cbor_loads_exact(obj, "COSE_Key") if isinstance(obj, bytes | bytearray) else obj
    if not isinstance(m, Mapping):
        raise CoseFormatError("COSE_Key must be a map")
    kty, crv, x = m.get(KTY), m.get(CRV), m.get(X)
    alg = m.get(ALG)
    if D in m:
        raise CoseFormatError("COSE_Key: carries private key material (d); only public keys are accepted")
    ops = m.get(KEY_OPS)
    if ops is not None and (not isinstance(ops, list | tuple) or OP_VERIFY not in ops):
        raise CoseFormatError(f"COSE_Key: key_ops {ops!r} does not allow verify")
    if not isinstance(x, bytes):
        raise CoseFormatError("COSE_Key: x must be a byte string")
    if kty == KTY_OKP:
        if crv != CRV_ED25519 or len(x) != 32:
            raise CoseFormatError(f"COSE_Key: OKP key must be Ed25519 with a 32-byte x (crv {crv}, {len(x)} bytes)")
        if alg not in (None, ALG_EDDSA):
            raise CoseFormatError(f"COSE_Key: alg {alg} does not fit an Ed25519 key")
        return ed25519.Ed25519PublicKey.from_public_bytes(x)
    if kty == KTY_EC2:
        if crv not in _EC_CURVES:
            raise CoseFormatError(f"COSE_Key: unsupported EC2 curve {crv}")
        curve, want_alg, size = _EC_CURVES[crv]
        y = m.get(Y)
        if not isinstance(y, bytes) or len(x) != size or len(y) != size:
            raise CoseFormatError(f"COSE_Key: EC2 x and y must be {size}-byte strings")
        if alg not in (None, want_alg):
            raise CoseFormatError(f"COSE_Key: alg {alg} does not fit curve {crv}")
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + x + y)
        except ValueError:
            raise CoseFormatError("COSE_Key: point is not on the curve") from None
    raise CoseFormatError(f"COSE_Key: unsupported kty {kty!r}")


def key_id(pub: PublicKey) -> bytes:
    """SHA-256 of the key's COSE_Key bytes as `encode_public_key_bytes` writes them (fixed field
    order), so one public key has one id everywhere: manifests name their signers by it."""
    return hashlib.sha256(encode_public_key_bytes(pub)).digest()
