"""Verifying a signed manifest, one explicit step at a time.

Each step is recorded as a `Check` (name, ok, detail) so `imagebuilder verify` can print what
was checked, and each failure raises its own exception type. The attacks defended, as TUF
names them: arbitrary software (signatures), threshold (distinct trusted keys only), key
compromise below threshold, revoked keys (rotation), rollback (persisted highest version),
fast-forward (versions are bounded; a root rotation resets the high-water marks, TUF's
recovery), indefinite freeze (expiry), mix-and-match and endless data (`check_layer`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cidboot import cose
from cidboot.cid import CID
from cidboot.errors import FormatError, VerificationError
from cidboot.manifest.errors import (
    ExpiredError,
    LayerNotListedError,
    RollbackError,
    RootMismatchError,
    RootRotationError,
    SignatureError,
    SizeLimitError,
    ThresholdError,
)
from cidboot.manifest.model import Layer, Manifest, ManifestFormatError, RootOfTrust
from cidboot.manifest.signed import SignedManifest


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def to_obj(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class TrustState:
    """What a verifier remembers between runs: the current root and the highest versions seen.

    Persisted atomically as JSON; a device keeps it where an attacker cannot roll it back
    (on QEMU the harness's per-device state, on hardware an RPMB-like store).
    """

    root: RootOfTrust
    highest: dict[str, int] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str], anchor: RootOfTrust) -> TrustState:
        p = Path(path)
        try:
            obj = json.loads(p.read_text())
        except FileNotFoundError:
            return cls(anchor, {}, p)
        except ValueError as e:
            raise ManifestFormatError(f"{p}: damaged trust state: {e}") from None
        try:
            r = obj["root"]
            root = RootOfTrust(tuple(bytes.fromhex(k) for k in r["keys"]), r["threshold"], r["version"])
            highest = {str(k): int(v) for k, v in obj.get("highest", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestFormatError(f"{p}: damaged trust state: {type(e).__name__}: {e}") from None
        if root.version < anchor.version:
            root = anchor
        return cls(root, highest, p)

    def to_bytes(self) -> bytes:
        """The state as canonical JSON bytes (sorted keys, no spaces): the same fields `save`
        writes, for stores that are not files (the bootstrap's raw NVRAM block device)."""
        doc = {"root": {"keys": [k.hex() for k in self.root.keys], "threshold": self.root.threshold,
                        "version": self.root.version}, "highest": dict(sorted(self.highest.items()))}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, anchor: RootOfTrust, where: str = "trust state") -> TrustState:
        """Inverse of `to_bytes` (also reads what `save` writes). Damage raises ManifestFormatError
        naming `where`, never a silent reset; a stored root older than `anchor` is replaced by it."""
        try:
            obj = json.loads(raw.decode("utf-8"))
            r = obj["root"]
            root = RootOfTrust(tuple(bytes.fromhex(k) for k in r["keys"]), r["threshold"], r["version"])
            highest = {str(k): int(v) for k, v in obj.get("highest", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestFormatError(f"{where}: damaged trust state: {type(e).__name__}: {e}") from None
        if root.version < anchor.version:
            root = anchor
        return cls(root, highest, None)

    def save(self) -> None:
        if self.path is None:
            return
        doc = {"root": {"keys": [k.hex() for k in self.root.keys], "threshold": self.root.threshold,
                        "version": self.root.version}, "highest": dict(sorted(self.highest.items()))}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def verify_threshold(signatures: bytes, payload: bytes, root: RootOfTrust, what: str) -> list[str]:
    """Return the key ids (hex) of distinct trusted keys whose signatures verify; raise if too few."""
    try:
        msg = cose.decode_sign(signatures)
    except FormatError as e:
        raise SignatureError(f"{what}: malformed signatures: {e}") from None
    if msg.payload is not None:  # the signatures must cover `payload`, re-derived, never carried bytes
        raise SignatureError(f"{what}: the COSE_Sign carries a payload; only a detached (nil) payload is accepted")
    trusted = root.public_keys()
    good: set[bytes] = set()
    for sig in msg.signatures:
        kid = sig.kid
        if kid is None or kid not in trusted or kid in good:
            continue  # unknown keys are ignored; one key counts once
        try:
            cose.verify_signature_detached(msg, sig, trusted[kid], payload)
        except VerificationError:
            continue
        good.add(kid)
    if len(good) < root.threshold:
        raise ThresholdError(f"{what}: {len(good)} valid signature(s) from trusted keys, threshold is {root.threshold}")
    return sorted(k.hex() for k in good)


def verify_manifest(signed: SignedManifest, state: TrustState, *, now: int | None = None, persist: bool = True) -> list[Check]:
    """Run every check; on success record the version (and any rotation) in `state`."""
    checks: list[Check] = []
    now = int(time.time()) if now is None else now
    root = state.root
    reset_versions = False
    for i, rot in enumerate(signed.rotations):
        if rot.root.version <= root.version:
            continue  # already applied
        if rot.root.version != root.version + 1:
            raise RootRotationError(f"rotation {i}: root version {rot.root.version} skips from {root.version}")
        try:
            verify_threshold(rot.signatures, rot.payload(), root, f"rotation to root v{rot.root.version} (old root)")
            verify_threshold(rot.signatures, rot.payload(), rot.root, f"rotation to root v{rot.root.version} (new root)")
        except (ThresholdError, SignatureError) as e:  # too few, or a malformed or payload-carrying COSE_Sign
            raise RootRotationError(str(e)) from None
        checks.append(Check("root-rotation", True, f"root v{root.version} -> v{rot.root.version}"))
        root = rot.root
        reset_versions = True
    if signed.manifest.root != root:
        raise RootMismatchError(f"manifest is under root v{signed.manifest.root.version}, the trusted root is "
                                f"v{root.version} with other keys: signed by revoked or unknown keys")
    checks.append(Check("root", True, f"manifest names the trusted root v{root.version}"))
    signers = verify_threshold(signed.signatures, signed.payload(), root, "manifest")
    checks.append(Check("signatures", True, f"{len(signers)} of threshold {root.threshold}: {', '.join(s[:16] for s in signers)}"))
    m = signed.manifest
    if m.expires <= now:
        raise ExpiredError(f"manifest {m.name} v{m.version} expired at {m.expires} (now {now})")
    checks.append(Check("expiry", True, f"expires in {m.expires - now} s"))
    highest = {} if reset_versions else dict(state.highest)
    seen = highest.get(m.name)
    if seen is not None and m.version < seen:
        raise RollbackError(f"manifest {m.name} v{m.version} is older than v{seen}, already accepted")
    checks.append(Check("rollback", True, f"v{m.version} >= highest seen {seen if seen is not None else '(none)'}"))
    state.root = root
    highest[m.name] = max(m.version, seen or 0)
    state.highest = highest
    if persist:
        state.save()
    return checks


def check_layer(manifest: Manifest, cid: CID, size: int) -> Layer:
    """A layer handed to the device must be in the signed manifest and no bigger than listed."""
    layer = manifest.layer(cid)
    if layer is None:
        raise LayerNotListedError(f"layer {cid} is not listed in manifest {manifest.name} v{manifest.version}")
    if size > layer.size:
        raise SizeLimitError(f"layer {cid} is {size} bytes, the manifest allows {layer.size}")
    return layer
