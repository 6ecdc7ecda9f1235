"""CBOR DICE certificates: a COSE_Sign1 (untagged) over a CWT, byte-identical to open-dice.

The CWT's entries are written in open-dice's order (issuer, subject, code hash, code
descriptor, config descriptor, config hash, authority hash, authority descriptor, mode,
subject public key, key usage, profile name), which is not CBOR's canonical order, so the
map is built as an ordered dict and encoded as is.
"""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2

from cidboot.trust import cose
from cidboot.trust.cose import CoseFormatError, PrivateKey, PublicKey
from cidboot.trust.cose_key import decode_public_key, encode_public_key_bytes
from cidboot.trust.dice.derive import HASH_SIZE, DiceInputs, DiceMode, id_of_key

ISS, SUB = 1, 2
CODE_HASH, CODE_DESC = -4670545, -4670546
CONFIG_HASH, CONFIG_DESC = -4670547, -4670548
AUTH_HASH, AUTH_DESC = -4670549, -4670550
MODE, SUBJECT_PUBLIC_KEY, KEY_USAGE, PROFILE_NAME = -4670551, -4670552, -4670553, -4670554
KEY_USAGE_CERT_SIGN = b"\x20"


class DiceCertError(CoseFormatError):
    """A DICE certificate is malformed (the message names the field)."""


def encode_cwt(inputs: DiceInputs, authority_id: bytes, subject_id: bytes, subject_pub: PublicKey) -> bytes:
    m: dict[int, Any] = {ISS: authority_id.hex(), SUB: subject_id.hex(), CODE_HASH: inputs.code_hash}
    if inputs.code_descriptor:
        m[CODE_DESC] = inputs.code_descriptor
    if inputs.config_descriptor is not None:
        m[CONFIG_DESC] = inputs.config_descriptor
        m[CONFIG_HASH] = hashlib.sha512(inputs.config_descriptor).digest()
    else:
        assert inputs.config_value is not None
        m[CONFIG_DESC] = inputs.config_value
    m[AUTH_HASH] = inputs.authority_hash
    if inputs.authority_descriptor:
        m[AUTH_DESC] = inputs.authority_descriptor
    m[MODE] = bytes([inputs.mode])
    m[SUBJECT_PUBLIC_KEY] = encode_public_key_bytes(subject_pub)
    m[KEY_USAGE] = KEY_USAGE_CERT_SIGN
    if inputs.profile_name is not None:
        m[PROFILE_NAME] = inputs.profile_name
    return cbor2.dumps(m)


def generate_certificate(subject_key: PrivateKey, authority_key: PrivateKey, inputs: DiceInputs) -> bytes:
    cwt = encode_cwt(inputs, id_of_key(authority_key), id_of_key(subject_key), subject_key.public_key())
    return cose.sign1(cwt, authority_key, tagged=False)


class DiceCert:
    """A parsed DICE certificate (signature not yet checked: see chain.verify_chain). A value
    (compared by its fields, never changed), written out rather than a frozen dataclass, whose
    generated methods cost ~3 M guest instructions at import in each stage (all three import it)."""

    __slots__ = ("sign1", "issuer", "subject", "code_hash", "code_descriptor", "config_descriptor", "config_hash",
                 "authority_hash", "authority_descriptor", "mode", "subject_public_key", "subject_public_key_raw",
                 "key_usage", "profile_name", "claims")

    def __init__(self, *, sign1: cose.Sign1, issuer: str, subject: str, code_hash: bytes, code_descriptor: bytes | None,
                 config_descriptor: bytes | None, config_hash: bytes | None, authority_hash: bytes,
                 authority_descriptor: bytes | None, mode: DiceMode, subject_public_key: PublicKey,
                 subject_public_key_raw: bytes, key_usage: bytes, profile_name: str | None,
                 claims: dict[int, Any]) -> None:
        self.sign1 = sign1
        self.issuer = issuer
        self.subject = subject
        self.code_hash = code_hash
        self.code_descriptor = code_descriptor
        self.config_descriptor = config_descriptor
        self.config_hash = config_hash
        self.authority_hash = authority_hash
        self.authority_descriptor = authority_descriptor
        self.mode = mode
        self.subject_public_key = subject_public_key
        self.subject_public_key_raw = subject_public_key_raw
        self.key_usage = key_usage
        self.profile_name = profile_name
        self.claims = claims

    def __eq__(self, other: object) -> bool:
        return type(other) is DiceCert and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # holds the claims dict, as the dataclass did

    def __repr__(self) -> str:
        return f"DiceCert(issuer={self.issuer!r}, subject={self.subject!r}, mode={self.mode!r}, code_hash={self.code_hash.hex()})"

    @property
    def config(self) -> bytes:
        """What went into the CDI as config: the inline value, or the descriptor's SHA-512."""
        if self.config_hash is not None:
            return self.config_hash
        return self.config_descriptor or b""


def _field(claims: dict[int, Any], label: int, typ: type, name: str, *, required: bool = True) -> Any:
    if label not in claims:
        if required:
            raise DiceCertError(f"DICE certificate: missing {name}")
        return None
    v = claims[label]
    if not isinstance(v, typ):
        raise DiceCertError(f"DICE certificate: {name} must be {typ.__name__}")
    return v


def parse_certificate(data: bytes | cose.Sign1) -> DiceCert:
    s1 = data if isinstance(data, cose.Sign1) else cose.decode_sign1(data)
    if s1.payload is None:
        raise DiceCertError("DICE certificate: no payload")
    claims = cose.cbor_loads_exact(s1.payload, "DICE certificate CWT")
    if not isinstance(claims, dict):
        raise DiceCertError("DICE certificate: CWT must be a map")
    code_hash = _field(claims, CODE_HASH, bytes, "code hash")
    auth_hash = _field(claims, AUTH_HASH, bytes, "authority hash")
    if len(code_hash) != HASH_SIZE or len(auth_hash) != HASH_SIZE:
        raise DiceCertError(f"DICE certificate: code and authority hashes must be {HASH_SIZE} bytes")
    mode_b = _field(claims, MODE, bytes, "mode")
    if len(mode_b) != 1 or mode_b[0] > 3:
        raise DiceCertError("DICE certificate: mode must be one byte, 0..3")
    pk_raw = _field(claims, SUBJECT_PUBLIC_KEY, bytes, "subject public key")
    pub = decode_public_key(pk_raw)
    config_hash = _field(claims, CONFIG_HASH, bytes, "config hash", required=False)
    return DiceCert(
        sign1=s1,
        issuer=_field(claims, ISS, str, "issuer"),
        subject=_field(claims, SUB, str, "subject"),
        code_hash=code_hash,
        code_descriptor=_field(claims, CODE_DESC, bytes, "code descriptor", required=False),
        config_descriptor=_field(claims, CONFIG_DESC, bytes, "config descriptor", required=False),
        config_hash=config_hash,
        authority_hash=auth_hash,
        authority_descriptor=_field(claims, AUTH_DESC, bytes, "authority descriptor", required=False),
        mode=DiceMode(mode_b[0]),
        subject_public_key=pub,
        subject_public_key_raw=pk_raw,
        key_usage=_field(claims, KEY_USAGE, bytes, "key usage"),
        profile_name=_field(claims, PROFILE_NAME, str, "profile name", required=False),
        claims=claims,
    )
