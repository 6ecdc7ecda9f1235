"""COSE_Sign1 and COSE_Sign (RFC 9052) with EdDSA (Ed25519), ES256 and ES384.

Everything signed in cidboot (DICE certificates, manifests, EAT evidence, provenance nodes)
goes through here.

Verification has one entry point per payload placement and no other, so a caller cannot get
it wrong: `verify1_detached(msg, key, payload)` / `verify_signature_detached(...)` require a
nil payload slot and verify over exactly the bytes the caller re-derived;
`verify1_attached(msg, key)` / `verify_signature_attached(...)` require a carried payload and
return the bytes the signature covers. (The old single `verify1(..., detached_payload=)` used
a carried payload when there was one, so any published signature could be moved onto
attacker content by copying its signed bytes into the payload slot.) Parsing is strict: a message must be exactly the COSE structure, with a
protected header that is a byte string holding a map, no label in both header buckets, no
unknown critical headers and no trailing bytes; anything else is a `CoseFormatError`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from cidboot.errors import FormatError, VerificationError

ALG_EDDSA = -8
ALG_ES256 = -7
ALG_ES384 = -35
HDR_ALG = 1
HDR_CRIT = 2
HDR_CONTENT_TYPE = 3
HDR_KID = 4
TAG_SIGN1 = 18
TAG_SIGN = 98
MAX_MESSAGE = 1 << 20

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

_EC = {ALG_ES256: (ec.SECP256R1, hashes.SHA256, 32), ALG_ES384: (ec.SECP384R1, hashes.SHA384, 48)}
_KNOWN_HEADERS = {HDR_ALG, HDR_CRIT, HDR_CONTENT_TYPE, HDR_KID}


class CoseFormatError(FormatError):
    """Bytes are not a well-formed COSE message of the expected kind."""


class CoseSignatureError(VerificationError):
    """A COSE signature does not verify (or its algorithm does not match the key)."""


class CosePayloadSlotError(CoseSignatureError):
    """The message's payload slot is not what the verifier expects: a payload carried where the
    caller re-derives a detached one (the signature would cover the carried bytes, not the
    caller's: the forgery of issue 11 #1), or nil where the payload must be attached.

    A VerificationError, not a FormatError: every caller that refuses a bad signature refuses it.
    """


def alg_for_key(key: PrivateKey | PublicKey) -> int:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return ALG_EDDSA
    if isinstance(key.curve, ec.SECP256R1):
        return ALG_ES256
    if isinstance(key.curve, ec.SECP384R1):
        return ALG_ES384
    raise CoseFormatError(f"unsupported key curve {key.curve.name}")


def cbor_loads_exact(data: bytes, what: str) -> Any:
    """Decode one CBOR item that must fill `data` exactly; any decoder failure is a CoseFormatError."""
    if not isinstance(data, bytes | bytearray):
        raise CoseFormatError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE:
        raise CoseFormatError(f"{what}: {len(data)} bytes exceeds {MAX_MESSAGE}")
    end = _scan_item(bytes(data), 0, 0, what)
    if end != len(data):
        raise CoseFormatError(f"{what}: {len(data) - end} trailing bytes")
    fp = io.BytesIO(bytes(data))
    try:
        obj = cbor2.CBORDecoder(fp).decode()
    except Exception as e:
        raise CoseFormatError(f"{what}: not valid CBOR: {type(e).__name__}: {e}") from None
    if fp.tell() != len(data):
        raise CoseFormatError(f"{what}: {len(data) - fp.tell()} trailing bytes")
    return obj


MAX_DEPTH = 32
_MIN_FOR_AI = {24: 24, 25: 1 << 8, 26: 1 << 16, 27: 1 << 32}


def _scan_head(buf: bytes, pos: int, what: str) -> tuple[int, int, int, int]:
    """Read one CBOR head: (major type, additional info, argument, next position).

    Rejects what cbor2 tolerates but a signed format must not: indefinite lengths, reserved
    additional info and integers/lengths not in their shortest form (RFC 8949 section 4.2.1).
    """
    if pos >= len(buf):
        raise CoseFormatError(f"{what}: not valid CBOR: truncated at byte {pos}")
    major, ai = buf[pos] >> 5, buf[pos] & 0x1F
    pos += 1
    if ai < 24:
        return major, ai, ai, pos
    if ai == 31:
        raise CoseFormatError(f"{what}: not valid CBOR: indefinite-length item at byte {pos - 1}")
    if ai > 27:
        raise CoseFormatError(f"{what}: not valid CBOR: reserved additional information {ai} at byte {pos - 1}")
    n = 1 << (ai - 24)
    if pos + n > len(buf):
        raise CoseFormatError(f"{what}: not valid CBOR: truncated at byte {pos}")
    arg = int.from_bytes(buf[pos:pos + n], "big")
    if major != 7 and arg < _MIN_FOR_AI[ai]:
        raise CoseFormatError(f"{what}: not valid CBOR: non-shortest encoding of {arg} at byte {pos - 1}")
    if major == 7 and ai == 24 and arg < 32:
        raise CoseFormatError(f"{what}: not valid CBOR: badly encoded simple value at byte {pos - 1}")
    return major, ai, arg, pos + n


def _scan_item(buf: bytes, pos: int, depth: int, what: str) -> int:
    """Check one well-formed, deterministic-headed CBOR item at pos (maps without repeated keys);
    return where it ends. cbor2 then decodes the same bytes into Python values."""
    if depth > MAX_DEPTH:
        raise CoseFormatError(f"{what}: not valid CBOR: nested deeper than {MAX_DEPTH}")
    major, _, arg, pos = _scan_head(buf, pos, what)
    if major in (2, 3):
        if pos + arg > len(buf):
            raise CoseFormatError(f"{what}: not valid CBOR: truncated string at byte {pos}")
        return pos + arg
    if major == 4:
        for _ in range(arg):
            pos = _scan_item(buf, pos, depth + 1, what)
        return pos
    if major == 5:
        keys: set[bytes] = set()
        for _ in range(arg):
            start = pos
            pos = _scan_item(buf, pos, depth + 1, what)
            if buf[start:pos] in keys:
                raise CoseFormatError(f"{what}: not valid CBOR: duplicate map key at byte {start}")
            keys.add(buf[start:pos])
            pos = _scan_item(buf, pos, depth + 1, what)
        return pos
    if major == 6:
        return _scan_item(buf, pos, depth + 1, what)
    return pos  # unsigned/negative integers and simple values/floats: the head is the item


def raw_signature(key: PrivateKey, data: bytes) -> bytes:
    """Sign `data`; ECDSA signatures are returned as fixed-size r||s, as COSE wants."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    _, h, size = _EC[alg_for_key(key)]
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(h())))
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def verify_raw_signature(key: PublicKey, alg: int, signature: bytes, data: bytes) -> None:
    if alg != alg_for_key(key):
        raise CoseSignatureError(f"algorithm {alg} does not match the key ({alg_for_key(key)})")
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
            return
        _, h, size = _EC[alg]
        if len(signature) != 2 * size:
            raise CoseSignatureError(f"ECDSA signature must be {2 * size} bytes, got {len(signature)}")
        r, s = int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(h()))
    except InvalidSignature:
        raise CoseSignatureError("signature does not verify") from None


def _sig_structure(context: str, body_protected: bytes, sign_protected: bytes | None, aad: bytes, payload: bytes) -> bytes:
    items: list[Any] = [context, body_protected]
    if sign_protected is not None:
        items.append(sign_protected)
    items += [aad, payload]
    return cbor2.dumps(items)


def _encode_protected(h: dict[int, Any]) -> bytes:
    return cbor2.dumps(h, canonical=True) if h else b""


def _check_headers(protected: Any, unprotected: Any, where: str) -> None:
    if not isinstance(protected, Mapping) or not isinstance(unprotected, Mapping):
        raise CoseFormatError(f"{where}: headers must be maps")
    both = set(protected) & set(unprotected)
    if both:
        raise CoseFormatError(f"{where}: header labels {sorted(both)} in both protected and unprotected")
    crit = protected.get(HDR_CRIT)
    if crit is not None:
        if not isinstance(crit, list) or not crit:
            raise CoseFormatError(f"{where}: crit must be a non-empty array")
        unknown = [c for c in crit if c not in _KNOWN_HEADERS]
        if unknown:
            raise CoseFormatError(f"{where}: unknown critical headers {unknown}")
    if HDR_CRIT in unprotected:
        raise CoseFormatError(f"{where}: crit must be protected")


def _decode_protected(raw: Any, where: str) -> dict[int, Any]:
    if not isinstance(raw, bytes):
        raise CoseFormatError(f"{where}: protected header must be a byte string")
    if raw == b"":
        return {}
    h = cbor_loads_exact(raw, f"{where} protected header")
    if not isinstance(h, dict):
        raise CoseFormatError(f"{where}: protected header must encode a map")
    return h


def _signer_headers(key: PrivateKey, kid: bytes | None, protected: Mapping[int, Any] | None) -> dict[int, Any]:
    """The protected header a signer writes: alg from the key (a conflicting alg is refused), kid."""
    alg = alg_for_key(key)
    prot: dict[int, Any] = {HDR_ALG: alg, **(protected or {})}
    if prot[HDR_ALG] != alg:
        raise CoseFormatError(f"protected alg {prot[HDR_ALG]} does not match the signing key ({alg})")
    if kid is not None:
        prot[HDR_KID] = kid
    return prot


# -- COSE_Sign1 -------------------------------------------------------------------------


class _Decoded:
    """What the decoders below return: values, compared field by field (never changed once
    made), shown with their fields. Written out, not frozen dataclasses: generating a frozen
    dataclass's methods costs ~3 M guest instructions per class at import, in every stage (all
    three import this module), for records that are only ever built here and read."""

    __slots__: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # the headers are dicts: as unhashable as the dataclasses were

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self.__slots__)})"


class _HeaderAccess(_Decoded):
    """alg and kid as a verifier reads them (kid may sit in either header bucket)."""

    __slots__ = ()
    protected: dict[int, Any]
    unprotected: dict[int, Any]

    @property
    def alg(self) -> int | None:
        return self.protected.get(HDR_ALG)

    @property
    def kid(self) -> bytes | None:
        kid = self.protected.get(HDR_KID, self.unprotected.get(HDR_KID))
        return kid if isinstance(kid, bytes) else None


class Sign1(_HeaderAccess):
    """A decoded COSE_Sign1: headers as sent (`protected_raw` is what the signature covers), the
    payload (None when detached) and the signature."""

    __slots__ = ("protected", "protected_raw", "unprotected", "payload", "signature")

    def __init__(self, protected: dict[int, Any], protected_raw: bytes, unprotected: dict[int, Any],
                 payload: bytes | None, signature: bytes) -> None:
        self.protected = protected
        self.protected_raw = protected_raw
        self.unprotected = unprotected
        self.payload = payload
        self.signature = signature


def sign1(
    payload: bytes, key: PrivateKey, *, kid: bytes | None = None, protected: dict[int, Any] | None = None,
    unprotected: dict[int, Any] | None = None, external_aad: bytes = b"", tagged: bool = True,
    detached: bool = False,
) -> bytes:
    """COSE_Sign1 over `payload`; `detached` leaves the payload out (nil), for containers that
    carry it beside the signature (provenance nodes, whose payload is itself DAG-CBOR)."""
    prot = _signer_headers(key, kid, protected)
    _check_headers(prot, unprotected or {}, "COSE_Sign1")
    prot_raw = _encode_protected(prot)
    sig = raw_signature(key, _sig_structure("Signature1", prot_raw, None, external_aad, payload))
    msg = [prot_raw, dict(unprotected or {}), None if detached else payload, sig]
    return cbor2.dumps(cbor2.CBORTag(TAG_SIGN1, msg) if tagged else msg, canonical=True)


def _decode_envelope(data: bytes, what: str, tag: int) -> tuple[dict[int, Any], bytes, Any, bytes | None, Any]:
    """The part COSE_Sign1 and COSE_Sign share: optional tag, 4-item array, protected and
    unprotected headers, payload. Returns (protected, protected_raw, unprotected, payload, 4th item)."""
    return _envelope_of_item(cbor_loads_exact(data, what), what, tag)


def _envelope_of_item(obj: Any, what: str, tag: int) -> tuple[dict[int, Any], bytes, Any, bytes | None, Any]:
    """`_decode_envelope` of an item already decoded (and scanned) as part of a larger message."""
    if isinstance(obj, cbor2.CBORTag):
        if obj.tag != tag:
            raise CoseFormatError(f"{what}: wrong tag {obj.tag} (expected {tag})")
        obj = obj.value
    if not isinstance(obj, list | tuple) or len(obj) != 4:  # cbor2 gives tuples inside tags
        raise CoseFormatError(f"{what}: must be an array of 4 items")
    prot_raw, unprot, payload, last = obj
    prot = _decode_protected(prot_raw, what)
    _check_headers(prot, unprot, what)
    if payload is not None and not isinstance(payload, bytes):
        raise CoseFormatError(f"{what}: payload must be a byte string or nil")
    return prot, prot_raw, unprot, payload, last


def decode_sign1(data: bytes) -> Sign1:
    return _sign1(_decode_envelope(data, "COSE_Sign1", TAG_SIGN1))


def sign1_of_item(obj: Any) -> Sign1:
    """A COSE_Sign1 nested in a message the caller decoded with `cbor_loads_exact` (a DICE
    chain's certificates): the same checks as `decode_sign1`, without encoding the item again
    to decode it a second time."""
    return _sign1(_envelope_of_item(obj, "COSE_Sign1", TAG_SIGN1))


def _sign1(envelope: tuple[dict[int, Any], bytes, Any, bytes | None, Any]) -> Sign1:
    prot, prot_raw, unprot, payload, sig = envelope
    if not isinstance(sig, bytes):
        raise CoseFormatError("COSE_Sign1: signature must be a byte string")
    if not isinstance(prot.get(HDR_ALG), int):
        raise CoseFormatError("COSE_Sign1: protected header has no integer alg")
    return Sign1(prot, prot_raw, dict(unprot), payload, sig)


def _detached_bytes(payload: bytes, what: str) -> bytes:
    if not isinstance(payload, bytes | bytearray):
        raise CosePayloadSlotError(f"{what}: the expected detached payload must be bytes, "
                                   f"got {type(payload).__name__}")
    return bytes(payload)


def verify1_detached(msg: bytes | Sign1, public_key: PublicKey, payload: bytes, *,
                     external_aad: bytes = b"") -> Sign1:
    """Verify a COSE_Sign1 whose payload is detached over exactly `payload`, the bytes the
    caller re-derived. A message that carries a payload is refused (CosePayloadSlotError)."""
    s = msg if isinstance(msg, Sign1) else decode_sign1(msg)
    payload = _detached_bytes(payload, "COSE_Sign1")
    if s.payload is not None:
        raise CosePayloadSlotError("COSE_Sign1: carries a payload where a detached one (nil) is required")
    verify_raw_signature(public_key, s.alg or 0, s.signature,
                         _sig_structure("Signature1", s.protected_raw, None, external_aad, payload))
    return s


def verify1_attached(msg: bytes | Sign1, public_key: PublicKey, *, external_aad: bytes = b"") -> bytes:
    """Verify a COSE_Sign1 that carries its payload; return that payload (the only bytes the
    signature vouches for). A nil payload is refused (CosePayloadSlotError)."""
    s = msg if isinstance(msg, Sign1) else decode_sign1(msg)
    if s.payload is None:
        raise CosePayloadSlotError("COSE_Sign1: payload is nil where an attached payload is required")
    verify_raw_signature(public_key, s.alg or 0, s.signature,
                         _sig_structure("Signature1", s.protected_raw, None, external_aad, s.payload))
    return s.payload


# -- COSE_Sign (several signers over one payload) -----------------------------------------


class Signature(_HeaderAccess):
    """One signer's entry of a COSE_Sign: its own headers (raw bytes kept for the Sig_structure) and signature."""

    __slots__ = ("protected", "protected_raw", "unprotected", "signature")

    def __init__(self, protected: dict[int, Any], protected_raw: bytes, unprotected: dict[int, Any],
                 signature: bytes) -> None:
        self.protected = protected
        self.protected_raw = protected_raw
        self.unprotected = unprotected
        self.signature = signature


class SignMulti(_Decoded):
    """A decoded COSE_Sign: body headers, payload and one `Signature` per signer."""

    __slots__ = ("protected", "protected_raw", "unprotected", "payload", "signatures")

    def __init__(self, protected: dict[int, Any], protected_raw: bytes, unprotected: dict[int, Any],
                 payload: bytes | None, signatures: list[Signature]) -> None:
        self.protected = protected
        self.protected_raw = protected_raw
        self.unprotected = unprotected
        self.payload = payload  # None when detached (the manifest keeps its payload beside it)
        self.signatures = signatures


def sign_multi(payload: bytes, signers: list[tuple[PrivateKey, bytes]], *, protected: dict[int, Any] | None = None,
               detached: bool = False) -> bytes:
    body_raw = _encode_protected(dict(protected or {}))
    sigs = []
    for key, kid in signers:
        sp = _encode_protected(_signer_headers(key, kid, None))
        sig = raw_signature(key, _sig_structure("Signature", body_raw, sp, b"", payload))
        sigs.append([sp, {}, sig])
    return cbor2.dumps(cbor2.CBORTag(TAG_SIGN, [body_raw, {}, None if detached else payload, sigs]), canonical=True)


def decode_sign(data: bytes) -> SignMulti:
    prot, prot_raw, unprot, payload, sigs = _decode_envelope(data, "COSE_Sign", TAG_SIGN)
    if not isinstance(sigs, list | tuple) or not sigs:
        raise CoseFormatError("COSE_Sign: signatures must be a non-empty array")
    out = []
    for i, s in enumerate(sigs):
        where = f"COSE_Sign signature {i}"
        if not isinstance(s, list | tuple) or len(s) != 3:
            raise CoseFormatError(f"{where}: must be an array of 3 items")
        sp_raw, sunprot, sig = s
        sp = _decode_protected(sp_raw, where)
        _check_headers(sp, sunprot, where)
        if not isinstance(sig, bytes) or not isinstance(sp.get(HDR_ALG), int):
            raise CoseFormatError(f"{where}: needs a byte-string signature and an integer alg")
        out.append(Signature(sp, sp_raw, dict(sunprot), sig))
    return SignMulti(prot, prot_raw, dict(unprot), payload, out)


def verify_signature_detached(msg: SignMulti, sig: Signature, public_key: PublicKey, payload: bytes) -> None:
    """Verify one signer of a COSE_Sign with a detached payload over exactly `payload`, the
    bytes the caller re-derived. A message that carries a payload is refused."""
    payload = _detached_bytes(payload, "COSE_Sign")
    if msg.payload is not None:
        raise CosePayloadSlotError("COSE_Sign: carries a payload where a detached one (nil) is required")
    verify_raw_signature(public_key, sig.alg or 0, sig.signature,
                         _sig_structure("Signature", msg.protected_raw, sig.protected_raw, b"", payload))


def verify_signature_attached(msg: SignMulti, sig: Signature, public_key: PublicKey) -> bytes:
    """Verify one signer of a COSE_Sign that carries its payload; return that payload."""
    if msg.payload is None:
        raise CosePayloadSlotError("COSE_Sign: payload is nil where an attached payload is required")
    verify_raw_signature(public_key, sig.alg or 0, sig.signature,
                         _sig_structure("Signature", msg.protected_raw, sig.protected_raw, b"", msg.payload))
    return msg.payload
