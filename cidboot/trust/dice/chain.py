"""Android-style DICE chains and the CDI handover between boot stages.

A chain is the CBOR array `[root COSE_Key, cert_0, cert_1, ...]` (certificates inline, as
COSE_Sign1 arrays); a handover is the map `{1: CDI_Attest, 2: CDI_Seal, 3: chain}` one stage
leaves for the next. `verify_chain` applies the rules Android's hwtrust checks, and every
error names the chain entry that failed.
"""

from __future__ import annotations

from typing import Any

import cbor2

from cidboot.errors import FormatError, VerificationError
from cidboot.trust import cose
from cidboot.trust.cose import CoseFormatError, PublicKey
from cidboot.trust.cose_key import decode_public_key, encode_public_key, raw_public_bytes
from cidboot.trust.dice.cert import KEY_USAGE_CERT_SIGN, DiceCert, parse_certificate
from cidboot.trust.dice.derive import CDI_SIZE, DiceMode, derive_id

MAX_CHAIN_LENGTH = 16


class DiceChainError(VerificationError):
    """A DICE chain does not verify; the message says which entry and why."""


class HandoverError(FormatError):
    """A handover blob is not `{1: CDI_Attest, 2: CDI_Seal, 3: chain}`."""


def encode_chain(root: PublicKey, certs: list[bytes]) -> bytes:
    items: list[Any] = [encode_public_key(root)]
    for c in certs:
        items.append(cose.cbor_loads_exact(c, "certificate"))
    return cbor2.dumps(items)


def append_to_chain(chain: bytes, cert: bytes) -> bytes:
    items = cose.cbor_loads_exact(chain, "DICE chain")
    if not isinstance(items, list) or not items:
        raise CoseFormatError("DICE chain must be a non-empty array")
    items.append(cose.cbor_loads_exact(cert, "certificate"))
    return cbor2.dumps(items)


class VerifiedChain:
    """A DICE chain whose every certificate verified: the root key and the entries, root side first.
    A value (compared by its fields, never changed), written out rather than a frozen dataclass:
    generating one's methods costs ~3 M guest instructions at import, in every stage."""

    __slots__ = ("root_public_key", "entries", "_root_id")

    def __init__(self, root_public_key: PublicKey, entries: list[DiceCert], root_id: str | None = None) -> None:
        self.root_public_key = root_public_key
        self.entries = entries
        self._root_id = root_id  # verify_chain derives it anyway (an HKDF); given, it is not derived twice

    def __eq__(self, other: object) -> bool:
        return (type(other) is VerifiedChain and self.root_public_key == other.root_public_key
                and self.entries == other.entries)

    __hash__ = None  # type: ignore[assignment]  # holds a list, as the dataclass did

    def __repr__(self) -> str:
        return f"VerifiedChain(root_public_key={self.root_public_key!r}, entries={self.entries!r})"

    @property
    def leaf_public_key(self) -> PublicKey:
        return self.entries[-1].subject_public_key if self.entries else self.root_public_key

    @property
    def root_id(self) -> str:
        if self._root_id is None:
            self._root_id = derive_id(raw_public_bytes(self.root_public_key)).hex()
        return self._root_id


def verify_chain(chain: bytes, *, allow_debug: bool = False, expected_profile: str | None = None) -> VerifiedChain:
    try:
        items = cose.cbor_loads_exact(chain, "DICE chain")
    except CoseFormatError as e:
        raise DiceChainError(str(e)) from None
    if not isinstance(items, list) or not items:
        raise DiceChainError("DICE chain must be a non-empty array")
    if len(items) > MAX_CHAIN_LENGTH + 1:
        raise DiceChainError(f"DICE chain longer than {MAX_CHAIN_LENGTH} certificates")
    try:
        root = decode_public_key(items[0])
    except CoseFormatError as e:
        raise DiceChainError(f"chain entry 0 (root key): {e}") from None
    prev_key = root
    prev_subject = root_id = derive_id(raw_public_bytes(root)).hex()
    seen_subjects = {prev_subject}
    seen_keys = {raw_public_bytes(root)}
    entries: list[DiceCert] = []
    for i, item in enumerate(items[1:], start=1):
        where = f"chain entry {i}"
        try:
            cert = parse_certificate(cose.sign1_of_item(item))
        except FormatError as e:
            raise DiceChainError(f"{where}: {e}") from None
        try:
            cose.verify1_attached(cert.sign1, prev_key)
        except (VerificationError, CoseFormatError) as e:
            raise DiceChainError(f"{where}: not signed by the key of entry {i - 1}: {e}") from None
        if cert.issuer != prev_subject:
            raise DiceChainError(f"{where}: issuer {cert.issuer} does not match subject {prev_subject} of entry {i - 1}")
        key_raw = raw_public_bytes(cert.subject_public_key)
        if cert.subject != derive_id(key_raw).hex():
            raise DiceChainError(f"{where}: subject {cert.subject} is not the ID of its public key")
        if cert.subject in seen_subjects:
            raise DiceChainError(f"{where}: subject {cert.subject} repeats an earlier entry")
        if key_raw in seen_keys:
            raise DiceChainError(f"{where}: subject public key repeats an earlier entry")
        if cert.key_usage != KEY_USAGE_CERT_SIGN:
            raise DiceChainError(f"{where}: key usage must be keyCertSign")
        if cert.mode == DiceMode.DEBUG and not allow_debug:
            raise DiceChainError(f"{where}: layer booted in debug mode")
        if expected_profile is not None and cert.profile_name != expected_profile:
            raise DiceChainError(f"{where}: profile {cert.profile_name!r}, expected {expected_profile!r}")
        if entries and cert.profile_name != entries[0].profile_name:
            raise DiceChainError(f"{where}: profile {cert.profile_name!r} differs from entry 1's")
        seen_subjects.add(cert.subject)
        seen_keys.add(key_raw)
        entries.append(cert)
        prev_key, prev_subject = cert.subject_public_key, cert.subject
    return VerifiedChain(root, entries, root_id)


class Handover:
    """What one DICE layer gives the next: CDI_Attest, CDI_Seal and the chain up to it. Written
    out rather than a frozen dataclass (import cost, as VerifiedChain); its repr shows the CDIs'
    lengths only, so a log or traceback never carries the secrets."""

    __slots__ = ("cdi_attest", "cdi_seal", "chain")

    def __init__(self, cdi_attest: bytes, cdi_seal: bytes, chain: bytes) -> None:
        self.cdi_attest = cdi_attest
        self.cdi_seal = cdi_seal
        self.chain = chain

    def __eq__(self, other: object) -> bool:
        return (type(other) is Handover and self.cdi_attest == other.cdi_attest and self.cdi_seal == other.cdi_seal
                and self.chain == other.chain)

    def __hash__(self) -> int:
        return hash((self.cdi_attest, self.cdi_seal, self.chain))

    def __repr__(self) -> str:
        return (f"Handover(cdi_attest=<{len(self.cdi_attest)} bytes>, cdi_seal=<{len(self.cdi_seal)} bytes>, "
                f"chain=<{len(self.chain)} bytes>)")


def encode_handover(cdi_attest: bytes, cdi_seal: bytes, chain: bytes) -> bytes:
    return cbor2.dumps({1: cdi_attest, 2: cdi_seal, 3: cose.cbor_loads_exact(chain, "DICE chain")})


def decode_handover(data: bytes) -> Handover:
    try:
        m = cose.cbor_loads_exact(data, "DICE handover")
    except CoseFormatError as e:
        raise HandoverError(str(e)) from None
    if not isinstance(m, dict) or set(m) != {1, 2, 3}:
        raise HandoverError("DICE handover must be the map {1: CDI_Attest, 2: CDI_Seal, 3: chain}")
    a, s, chain = m[1], m[2], m[3]
    if not isinstance(a, bytes) or not isinstance(s, bytes) or len(a) != CDI_SIZE or len(s) != CDI_SIZE:
        raise HandoverError(f"DICE handover CDIs must be {CDI_SIZE}-byte strings")
    if not isinstance(chain, list) or not chain:
        raise HandoverError("DICE handover chain must be a non-empty array")
    return Handover(a, s, cbor2.dumps(chain))
