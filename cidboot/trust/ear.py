"""Appraisal results as an EAR (EAT Attestation Result, draft-ietf-rats-ear), signed as a JWT.

`agent attest --ear` prints this instead of (or beside) the project's checks list, so a relying
party that speaks EAR (Veraison's `ear` libraries, for one) can consume a cidboot verifier's
answer. The serialization is the JWT one (RFC 7519 compact JWS; `typ` "JWT"), signed with the
verifier's own key (Ed25519 -> "EdDSA" per RFC 8037, P-256 -> "ES256", P-384 -> "ES384"): JSON
is what EAR's deployed consumers read first, and a JWT needs nothing beyond what the project
has (the raw r||s ECDSA signatures COSE already uses are exactly JWS's).

Claims (draft-ietf-rats-ear-04 JSON names):

    {"eat_profile": "tag:ietf.org,2025-07:ear",
     "iat": <unix s>,
     "ear.verifier-id": {"developer": "cidboot", "build": "<version>"},
     "eat_nonce": <base64url of the challenge>,          (when there was one)
     "submods": {"cidboot": {
         "ear.status": "affirming" | "warning" | "contraindicated" | "none",
         "ear.trustworthiness-vector": {<AR4SI claim>: <int>, ...},
         "ear.appraisal-policy-id": "cidboot:appraisal/1",
         "cidboot.device-id": hex | null, "cidboot.manifest-cid": text | null,
         "cidboot.role": text | null, "cidboot.root": "dice" | "tpm",
         "cidboot.checks": [{"check", "status", "reason"}, ...]}}}

`ear.status` is the appraisal's status (the worst check); the trustworthiness vector maps the
checks to AR4SI's tiers (`trust_vector`): affirming values 2/3, warning 32/33, contraindicated
96/97/99, and a claim is left out when no check speaks to it (AR4SI: 0 = no claim).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from cidboot import __version__
from cidboot.errors import FormatError, VerificationError
from cidboot.trust import cose
from cidboot.trust.appraisal import AFFIRMING, CONTRAINDICATED, NONE, WARNING, AppraisalResult
from cidboot.trust.cose import PrivateKey, PublicKey
from cidboot.trust.cose_key import key_id

EAR_PROFILE = "tag:ietf.org,2025-07:ear"
POLICY_ID = "cidboot:appraisal/1"
SUBMOD = "cidboot"
STATUSES = (AFFIRMING, WARNING, CONTRAINDICATED, NONE)
MAX_TOKEN = 256 * 1024

# AR4SI trustworthiness claims (values as in the draft and Veraison's ear package)
NO_CLAIM, CRYPTO_FAILED = 0, 99
INSTANCE_OK, INSTANCE_UNTRUSTWORTHY, INSTANCE_UNRECOGNIZED = 2, 96, 97
CONFIG_OK, CONFIG_UNSAFE, CONFIG_UNSUPPORTABLE = 2, 32, 96
BOOT_OK, RUNTIME_UNRECOGNIZED, RUNTIME_CONTRAINDICATED = 3, 33, 96
HW_GENUINE, HW_UNSAFE, HW_CONTRAINDICATED, HW_UNRECOGNIZED = 2, 32, 96, 97
TV_CLAIMS = ("instance-identity", "configuration", "executables", "file-system", "hardware", "runtime-opaque",
             "storage-opaque", "sourced-data")


class EarFormatError(FormatError):
    """An EAR token is not a well-formed JWT carrying an EAR (the message names the part)."""


class EarSignatureError(VerificationError):
    """The EAR's JWS signature does not verify with the verifier's key."""


def _tier(status: str) -> int:
    return {AFFIRMING: 0, WARNING: 1, CONTRAINDICATED: 2}.get(status, -1)


def trust_vector(res: AppraisalResult) -> dict[str, int]:
    """The appraisal's checks as an AR4SI trustworthiness vector.

    - instance-identity: evidence format, nonce (freshness), the signature by the chain's leaf,
      the DICE chain, the device registered and its role: 2; unknown device or AK 97; a
      failed signature/nonce/chain/binding 99; a role other than the registry's 96.
    - hardware: DICE root key registered, or TPM AK enrolled and the quote signed by it: 2;
      not enrolled 97; quote signature or replay of the log failing 96.
    - configuration: no layer in debug mode 2, debug 96.
    - executables: every measured stage (firmware baseline, UKI / PCR 4 and 11, the manifest
      and layers / PCR 15, the DICE-measured layers, the booted manifest) as referenced: 3
      (ApprovedBoot); something not compared (a warning) 33; a mismatch 96.
    """
    by = {c.name: c.status for c in res.checks}
    tv: dict[str, int] = {}

    def worst(names: list[str]) -> str | None:
        seen = [by[n] for n in names if n in by]
        return max(seen, key=_tier) if seen else None

    ident = worst(["format", "nonce", "signature", "dice-chain", "device", "role", "tpm.nonce-binding"])
    if ident is not None:
        if ident == AFFIRMING:
            tv["instance-identity"] = INSTANCE_OK
        elif by.get("device") == CONTRAINDICATED:
            tv["instance-identity"] = INSTANCE_UNRECOGNIZED
        elif by.get("role") == CONTRAINDICATED and all(
                by.get(n, AFFIRMING) == AFFIRMING for n in ("format", "nonce", "signature", "dice-chain")):
            tv["instance-identity"] = INSTANCE_UNTRUSTWORTHY
        else:
            tv["instance-identity"] = CRYPTO_FAILED
    hw = worst(["tpm.ak-enrolled", "tpm.quote-signature", "tpm.replay"]) if "tpm.ak-enrolled" in by else by.get("device")
    if hw is not None:
        if hw == AFFIRMING:
            tv["hardware"] = HW_GENUINE
        elif by.get("tpm.ak-enrolled", by.get("device")) == CONTRAINDICATED:
            tv["hardware"] = HW_UNRECOGNIZED
        else:
            tv["hardware"] = HW_CONTRAINDICATED if hw == CONTRAINDICATED else HW_UNSAFE
    if "debug-mode" in by:
        tv["configuration"] = CONFIG_OK if by["debug-mode"] == AFFIRMING else CONFIG_UNSUPPORTABLE
    exe = worst(["measured-boot", "measurements", "manifest", "tpm.firmware", "tpm.pcr4-uki", "tpm.pcr11-sections",
                 "tpm.pcr15-manifest"])
    if exe is not None:
        tv["executables"] = {AFFIRMING: BOOT_OK, WARNING: RUNTIME_UNRECOGNIZED}.get(exe, RUNTIME_CONTRAINDICATED)
    return tv


def ear_claims(res: AppraisalResult, *, nonce: bytes | None = None, iat: int | None = None) -> dict[str, Any]:
    """The EAR claims set for one appraisal (see the module docstring)."""
    appraisal: dict[str, Any] = {
        "ear.status": res.status, "ear.trustworthiness-vector": trust_vector(res),
        "ear.appraisal-policy-id": POLICY_ID, "cidboot.device-id": res.device_id,
        "cidboot.manifest-cid": res.manifest_cid, "cidboot.role": res.role,
        "cidboot.root": "tpm" if any(c.name.startswith("tpm.") for c in res.checks) else "dice",
        "cidboot.checks": [c.to_obj() for c in res.checks]}
    claims: dict[str, Any] = {"eat_profile": EAR_PROFILE, "iat": int(time.time()) if iat is None else iat,
                              "ear.verifier-id": {"developer": "cidboot", "build": __version__},
                              "submods": {SUBMOD: appraisal}}
    if nonce is not None:
        claims["eat_nonce"] = _b64(nonce)
    return claims


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str, what: str) -> bytes:
    if not s or not all(c.isalnum() or c in "-_" for c in s) or len(s) % 4 == 1:
        raise EarFormatError(f"EAR: {what} is not base64url")
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _alg(key: PrivateKey | PublicKey) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384"}.get(key.curve.name, "?")
    raise EarFormatError(f"no JWS algorithm for a {type(key).__name__}")


def sign_ear(claims: Mapping[str, Any], key: PrivateKey) -> str:
    """The EAR as a compact JWS (JWT) signed by the verifier's `key`."""
    header = {"alg": _alg(key), "typ": "JWT", "kid": _b64(key_id(key.public_key()))}
    signing_input = _b64(json.dumps(header, separators=(",", ":")).encode()) + "." + \
        _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    return signing_input + "." + _b64(cose.raw_signature(key, signing_input.encode()))


def verify_ear(token: str, key: PublicKey) -> dict[str, Any]:
    """Check an EAR JWT's signature with `key` and its shape; returns the claims.

    EarFormatError: not a JWT carrying an EAR; EarSignatureError: the signature fails."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN:
        raise EarFormatError("EAR: not a JWT of at most 256 KiB")
    parts = token.split(".")
    if len(parts) != 3:
        raise EarFormatError(f"EAR: a JWT has 3 parts, got {len(parts)}")
    try:
        header = json.loads(_unb64(parts[0], "JWT header"))
        claims = json.loads(_unb64(parts[1], "JWT payload"))
    except (ValueError, UnicodeDecodeError) as e:
        raise EarFormatError(f"EAR: JWT header or payload is not JSON: {e}") from None
    if not isinstance(header, dict) or header.get("alg") != _alg(key) or header.get("typ") != "JWT":
        raise EarFormatError(f"EAR: JWT header must name alg {_alg(key)} and typ JWT, got {header!r}"[:200])
    sig = _unb64(parts[2], "JWT signature")
    try:
        cose.verify_raw_signature(key, cose.alg_for_key(key), sig, (parts[0] + "." + parts[1]).encode())
    except VerificationError as e:
        raise EarSignatureError(f"EAR: signature does not verify with the verifier's key: {e}") from None
    check_ear(claims)
    return claims


def check_ear(claims: Any) -> None:
    """The EAR shape this project emits (and what any EAR must have: profile, iat, verifier-id,
    submods each with a status and, when present, a vector of AR4SI claims in -128..127)."""
    if not isinstance(claims, dict):
        raise EarFormatError("EAR: claims must be a JSON object")
    if claims.get("eat_profile") != EAR_PROFILE:
        raise EarFormatError(f"EAR: eat_profile must be {EAR_PROFILE!r}")
    if not isinstance(claims.get("iat"), int) or isinstance(claims.get("iat"), bool):
        raise EarFormatError("EAR: iat must be an integer")
    vid = claims.get("ear.verifier-id")
    if not isinstance(vid, dict) or not isinstance(vid.get("developer"), str) or not isinstance(vid.get("build"), str):
        raise EarFormatError("EAR: ear.verifier-id must be {developer, build}")
    subs = claims.get("submods")
    if not isinstance(subs, dict) or not subs:
        raise EarFormatError("EAR: submods must be a non-empty object")
    for name, app in subs.items():
        if not isinstance(app, dict) or app.get("ear.status") not in STATUSES:
            raise EarFormatError(f"EAR: submod {name!r}: ear.status must be one of {STATUSES}")
        tv = app.get("ear.trustworthiness-vector", {})
        if not isinstance(tv, dict) or not all(k in TV_CLAIMS and type(v) is int and -128 <= v <= 127
                                               for k, v in tv.items()):
            raise EarFormatError(f"EAR: submod {name!r}: trustworthiness vector must map AR4SI claims to -128..127")
