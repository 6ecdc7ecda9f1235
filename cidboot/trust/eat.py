"""EAT (RFC 9711) attestation evidence: a CWT signed by the device's DICE leaf (alias) key.

Claims: `eat_nonce` (10, 8 to 64 bytes, binds the evidence to one challenge), `ueid` (256),
`iat` (6), and cidboot's private claims: per-layer measurements, the manifest CID, the DICE
chain and whether the boot was measured (an ordinary PXE ROM boot is not).

Two roots of trust, one format. A DICE device's chain starts at its UDS-derived root key
(boot mode "measured"). A TPM device (boot mode "tpm-measured") also carries the TPM claim
(-75005, cidboot.trust.tpm.evidence: quote, AK, UEFI log, the bootstrap's PCR 15 events) and its
DICE chain starts at L1's key, which the quote binds (`qualifying_data`). The claim is present
exactly when the boot mode is "tpm-measured".
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cbor2

from cidboot.errors import FormatError
from cidboot.ipld.cid import CID
from cidboot.trust import cose
from cidboot.trust.cose import CoseFormatError, PrivateKey

if TYPE_CHECKING:  # imported where TPM evidence is parsed: not every agent's start
    from cidboot.trust.tpm.evidence import TpmEvidence

EAT_NONCE, UEID, IAT = 10, 256, 6
MEASUREMENTS, MANIFEST_CID, DICE_CHAIN, BOOT_MODE, ROLE = -75000, -75001, -75002, -75003, -75004
TPM_EVIDENCE = -75005
NONCE_MIN, NONCE_MAX = 8, 64
TPM_MEASURED = "tpm-measured"
BOOT_MODES = ("measured", "unmeasured", TPM_MEASURED)
UEID_RAND = 0x01


class EvidenceFormatError(FormatError):
    """Evidence is not a well-formed cidboot EAT (the message names the claim)."""


def check_nonce(nonce: bytes) -> bytes:
    if not isinstance(nonce, bytes) or not NONCE_MIN <= len(nonce) <= NONCE_MAX:
        n = len(nonce) if isinstance(nonce, bytes) else type(nonce).__name__
        raise EvidenceFormatError(f"eat_nonce must be {NONCE_MIN} to {NONCE_MAX} bytes, got {n}")
    return nonce


def ueid_for(root_public_key_raw: bytes) -> bytes:
    """A RAND-type UEID derived from the device root key: stable per device, reveals no more."""
    return bytes([UEID_RAND]) + hashlib.sha256(root_public_key_raw).digest()[:16]


@dataclass(frozen=True)
class Evidence:
    """A parsed cidboot EAT's claims (the COSE signature is checked by the appraisal, not here)."""

    nonce: bytes
    ueid: bytes
    iat: int
    measurements: dict[str, bytes]
    manifest_cid: CID | None
    chain: bytes
    boot_mode: str
    role: str | None
    sign1: cose.Sign1
    tpm: TpmEvidence | None = None  # present exactly when boot_mode is "tpm-measured"


def build_evidence(*, nonce: bytes, leaf_key: PrivateKey, chain: bytes, ueid: bytes, measurements: Mapping[str, bytes],
                   manifest_cid: CID | None, boot_mode: str = "measured", role: str | None = None,
                   iat: int | None = None, tpm: TpmEvidence | None = None) -> bytes:
    """The signed EAT. For a TPM device give `tpm` (and boot_mode "tpm-measured") and a `chain`
    whose root is L1's key, the key the quote's qualifying data binds."""
    check_nonce(nonce)
    if boot_mode not in BOOT_MODES:
        raise EvidenceFormatError(f"boot mode must be one of {BOOT_MODES}")
    if (tpm is not None) != (boot_mode == TPM_MEASURED):
        raise EvidenceFormatError(f"TPM evidence goes with boot mode {TPM_MEASURED!r}, and only with it")
    claims: dict[int, Any] = {
        EAT_NONCE: nonce, UEID: ueid, IAT: int(time.time()) if iat is None else iat,
        MEASUREMENTS: dict(measurements), DICE_CHAIN: cose.cbor_loads_exact(chain, "DICE chain"), BOOT_MODE: boot_mode,
    }
    if manifest_cid is not None:
        claims[MANIFEST_CID] = str(manifest_cid)
    if role is not None:
        claims[ROLE] = role
    if tpm is not None:
        claims[TPM_EVIDENCE] = tpm.to_obj()
    return cose.sign1(cbor2.dumps(claims), leaf_key)


def parse_evidence(data: bytes) -> Evidence:
    """Parse (not verify) evidence; appraisal does the verifying."""
    try:
        s1 = cose.decode_sign1(data)
    except CoseFormatError as e:
        raise EvidenceFormatError(f"evidence: {e}") from None
    if s1.payload is None:
        raise EvidenceFormatError("evidence: no payload")
    try:
        c = cose.cbor_loads_exact(s1.payload, "evidence claims")
    except CoseFormatError as e:
        raise EvidenceFormatError(str(e)) from None
    if not isinstance(c, Mapping):
        raise EvidenceFormatError("evidence claims must be a map")
    nonce = check_nonce(c.get(EAT_NONCE))  # type: ignore[arg-type]
    ueid, iat, meas = c.get(UEID), c.get(IAT), c.get(MEASUREMENTS)
    if not isinstance(ueid, bytes) or not ueid:
        raise EvidenceFormatError("evidence: ueid must be a non-empty byte string")
    if not isinstance(iat, int) or isinstance(iat, bool):
        raise EvidenceFormatError("evidence: iat must be an integer")
    if not isinstance(meas, Mapping) or not all(isinstance(k, str) and isinstance(v, bytes) for k, v in meas.items()):
        raise EvidenceFormatError("evidence: measurements must map layer names to byte strings")
    chain = c.get(DICE_CHAIN)
    if not isinstance(chain, list | tuple) or not chain:
        raise EvidenceFormatError("evidence: DICE chain claim missing")
    mode = c.get(BOOT_MODE)
    if mode not in BOOT_MODES:
        raise EvidenceFormatError(f"evidence: boot mode must be one of {BOOT_MODES}")
    mcid_s = c.get(MANIFEST_CID)
    mcid = None
    if mcid_s is not None:
        if not isinstance(mcid_s, str):
            raise EvidenceFormatError("evidence: manifest CID must be text")
        try:
            mcid = CID.parse(mcid_s)
        except FormatError as e:
            raise EvidenceFormatError(f"evidence: manifest CID: {e}") from None
    role = c.get(ROLE)
    if role is not None and not isinstance(role, str):
        raise EvidenceFormatError("evidence: role must be text")
    tpm = None
    if (TPM_EVIDENCE in c) != (mode == TPM_MEASURED):
        raise EvidenceFormatError(f"evidence: the TPM claim must be present exactly when the boot mode is {TPM_MEASURED!r}")
    if TPM_EVIDENCE in c:
        from cidboot.trust.tpm.evidence import TpmEvidence

        try:
            tpm = TpmEvidence.from_obj(c[TPM_EVIDENCE])
        except FormatError as e:
            raise EvidenceFormatError(f"evidence: {e}") from None
    return Evidence(nonce, ueid, iat, dict(meas), mcid, cbor2.dumps(list(chain)), str(mode), role, s1, tpm)
