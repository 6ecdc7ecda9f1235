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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cidboot.errors import FormatError, VerificationError
from cidboot.ipld.cid import CID
from cidboot.trust import cose
from cidboot.trust.manifest.errors import (
    ExpiredError,
    LayerNotListedError,
    ManifestNameError,
    RegistryRollbackError,
    RollbackError,
    RootMismatchError,
    RootRotationError,
    SignatureError,
    SignatureKindError,
    SizeLimitError,
    ThresholdError,
    VersionConflictError,
)
from cidboot.trust.manifest.model import Layer, Manifest, ManifestFormatError, RootOfTrust
from cidboot.trust.manifest.signed import KIND_MANIFEST, KIND_ROOT, SignedManifest


class Check:
    """One named verification step and its outcome, for reports that list every check. A plain
    record with field equality (a dataclass's generated methods cost ~2 M guest instructions at
    import, in the bootstrap and the agent)."""

    __slots__ = ("name", "ok", "detail")

    def __init__(self, name: str, ok: bool, detail: str) -> None:
        self.name = name
        self.ok = ok
        self.detail = detail

    def __eq__(self, other: object) -> bool:
        return type(other) is Check and (self.name, self.ok, self.detail) == (other.name, other.ok, other.detail)

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass was

    def __repr__(self) -> str:
        return f"Check(name={self.name!r}, ok={self.ok!r}, detail={self.detail!r})"

    def to_obj(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class TrustState:
    """What a verifier remembers between runs: the current root, the highest version accepted
    per manifest name and the CID accepted at that version, the manifest name this device boots,
    and the highest device registry version accepted.

    Persisted atomically as JSON; a device keeps it where an attacker cannot roll it back
    (the bootstrap's NVRAM, bootstrap.stage.nvram; on hardware an RPMB-like store). States
    written before `booted`, `name` and `registry` existed load with those empty: the CID and
    the name are then learnt at the next accepted manifest (docs/trust.md).
    """

    root: RootOfTrust
    highest: dict[str, int] = field(default_factory=dict)
    path: Path | None = None
    booted: dict[str, str] = field(default_factory=dict)  # name -> CID accepted at highest[name]
    name: str | None = None  # the manifest name this device boots (pinned at first acceptance)
    registry: int = 0  # highest device registry version accepted

    def _doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"root": {"keys": [k.hex() for k in self.root.keys], "threshold": self.root.threshold,
                                        "version": self.root.version}, "highest": dict(sorted(self.highest.items())),
                               "booted": dict(sorted(self.booted.items())), "registry": self.registry}
        if self.name is not None:
            doc["name"] = self.name
        return doc

    @classmethod
    def _from_obj(cls, obj: Any, anchor: RootOfTrust, where: str, path: Path | None) -> TrustState:
        try:
            r = obj["root"]
            root = RootOfTrust(tuple(bytes.fromhex(k) for k in r["keys"]), r["threshold"], r["version"])
            highest = {str(k): int(v) for k, v in obj.get("highest", {}).items()}
            booted = {str(k): str(CID.parse(v)) for k, v in obj.get("booted", {}).items()}
            name = obj.get("name")
            registry = obj.get("registry", 0)
            if (name is not None and (not isinstance(name, str) or not name)) or not isinstance(registry, int) \
                    or isinstance(registry, bool) or registry < 0:
                raise ValueError("name must be non-empty text, registry a version >= 0")
        except (KeyError, TypeError, ValueError, AttributeError, FormatError) as e:
            raise ManifestFormatError(f"{where}: damaged trust state: {type(e).__name__}: {e}") from None
        if root.version < anchor.version:
            root = anchor
        return cls(root, highest, path, booted, name, registry)

    @classmethod
    def load(cls, path: str | os.PathLike[str], anchor: RootOfTrust) -> TrustState:
        p = Path(path)
        try:
            obj = json.loads(p.read_text())
        except FileNotFoundError:
            return cls(anchor, {}, p)
        except ValueError as e:
            raise ManifestFormatError(f"{p}: damaged trust state: {e}") from None
        return cls._from_obj(obj, anchor, str(p), p)

    def to_bytes(self) -> bytes:
        """The state as canonical JSON bytes (sorted keys, no spaces): the same fields `save`
        writes, for stores that are not files (the bootstrap's raw NVRAM block device)."""
        return json.dumps(self._doc(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, anchor: RootOfTrust, where: str = "trust state") -> TrustState:
        """Inverse of `to_bytes` (also reads what `save` writes). Damage raises ManifestFormatError
        naming `where`, never a silent reset; a stored root older than `anchor` is replaced by it."""
        try:
            obj = json.loads(raw.decode("utf-8"))
        except ValueError as e:
            raise ManifestFormatError(f"{where}: damaged trust state: {type(e).__name__}: {e}") from None
        return cls._from_obj(obj, anchor, where, None)

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        import tempfile  # here: tempfile pulls in shutil, random, bz2, lzma; the guests keep their state in NVRAM

        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        with os.fdopen(fd, "w") as f:
            json.dump(self._doc(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def accept_registry(self, version: int, what: str = "device registry") -> None:
        """Record a verified device registry's version; an older one than already accepted is a
        replay (it could give the device an old role) and raises RegistryRollbackError."""
        if version < self.registry:
            raise RegistryRollbackError(f"{what} version {version} is older than version {self.registry}, "
                                        f"already accepted")
        self.registry = version


def verify_threshold(signatures: bytes, payload: bytes, root: RootOfTrust, what: str, *, kind: str) -> list[str]:
    """Return the key ids (hex) of distinct trusted keys whose signatures verify; raise if too few.

    `kind` is the content-type label (signed.KIND_*) the signatures must carry: a manifest's
    signatures never count for a root rotation or a device registry, nor the reverse."""
    try:
        msg = cose.decode_sign(signatures)
    except FormatError as e:
        raise SignatureError(f"{what}: malformed signatures: {e}") from None
    if msg.payload is not None:  # the signatures must cover `payload`, re-derived, never carried bytes
        raise SignatureError(f"{what}: the COSE_Sign carries a payload; only a detached (nil) payload is accepted")
    label = msg.protected.get(cose.HDR_CONTENT_TYPE)
    if label != kind:
        raise SignatureKindError(f"{what}: signatures are labelled {label!r}, not {kind!r}: "
                                 f"made for another kind of object")
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


def rotated_root(signed: SignedManifest, root: RootOfTrust) -> tuple[RootOfTrust, list[Check]]:
    """Apply the root rotations `signed` carries to `root`: each must be the next version, signed
    by the threshold of the old root and of the new one. Returns the resulting root (`root` when
    nothing rotates) and one check per rotation applied. Lets a caller verify other objects (the
    device registry) under the root the manifest is about to establish."""
    checks: list[Check] = []
    for i, rot in enumerate(signed.rotations):
        if rot.root.version <= root.version:
            continue  # already applied
        if rot.root.version != root.version + 1:
            raise RootRotationError(f"rotation {i}: root version {rot.root.version} skips from {root.version}")
        try:
            verify_threshold(rot.signatures, rot.payload(), root, f"rotation to root v{rot.root.version} (old root)",
                             kind=KIND_ROOT)
            verify_threshold(rot.signatures, rot.payload(), rot.root, f"rotation to root v{rot.root.version} (new root)",
                             kind=KIND_ROOT)
        except (ThresholdError, SignatureError) as e:  # too few, or a malformed or payload-carrying COSE_Sign
            raise RootRotationError(str(e)) from None
        checks.append(Check("root-rotation", True, f"root v{root.version} -> v{rot.root.version}"))
        root = rot.root
    return root, checks


def verify_manifest(signed: SignedManifest, state: TrustState, *, now: int | None = None, persist: bool = True,
                    cid: CID | None = None, expected_name: str | None = None) -> list[Check]:
    """Run every check; on success record the version, its CID, the name (and any rotation) in
    `state`; returns the checks (`verify_manifest_signers`, which also says who signed)."""
    return verify_manifest_signers(signed, state, now=now, persist=persist, cid=cid, expected_name=expected_name)[0]


def verify_manifest_signers(signed: SignedManifest, state: TrustState, *, now: int | None = None, persist: bool = True,
                            cid: CID | None = None, expected_name: str | None = None) -> tuple[list[Check], list[str]]:
    """Run every check; on success record the version, its CID, the name (and any rotation) in `state`.
    Returns the checks and the key ids (hex, sorted) of the trusted keys whose signatures verified
    (a caller that needs them does not verify the signatures a second time).

    `cid` is the CID the manifest was fetched by (default: the CID of its encoding).
    `expected_name` is the manifest name this device may boot, from a signed source (its role's
    entry in the device registry); without it the name pinned in `state` applies, and a state
    with no name yet pins the name of the first manifest it accepts. Another name is refused
    (ManifestNameError); so is a second CID for an already accepted name and version
    (VersionConflictError)."""
    now = int(time.time()) if now is None else now
    root, checks = rotated_root(signed, state.root)
    reset_versions = root != state.root
    if signed.manifest.root != root:
        raise RootMismatchError(f"manifest is under root v{signed.manifest.root.version}, the trusted root is "
                                f"v{root.version} with other keys: signed by revoked or unknown keys")
    checks.append(Check("root", True, f"manifest names the trusted root v{root.version}"))
    signers = verify_threshold(signed.signatures, signed.payload(), root, "manifest", kind=KIND_MANIFEST)
    checks.append(Check("signatures", True, f"{len(signers)} of threshold {root.threshold}: {', '.join(s[:16] for s in signers)}"))
    m = signed.manifest
    if m.expires <= now:
        raise ExpiredError(f"manifest {m.name} v{m.version} expired at {utc(m.expires)} (now {utc(now)})")
    checks.append(Check("expiry", True, f"expires {utc(m.expires)} (in {_span(m.expires - now)})"))
    cid = signed.cid if cid is None else cid
    allowed, source = (expected_name, "the device registry") if expected_name is not None else (state.name, "the trust state")
    if allowed is not None and m.name != allowed:
        raise ManifestNameError(f"manifest {cid} is named {m.name!r}; this device boots only {allowed!r} "
                                f"(from {source})")
    checks.append(Check("name", True, f"{m.name!r} is the manifest this device boots (from {source})" if allowed
                        else f"{m.name!r} pinned: the first manifest this trust state accepts"))
    highest = {} if reset_versions else dict(state.highest)
    booted = {} if reset_versions else dict(state.booted)
    seen = highest.get(m.name)
    if seen is not None and m.version < seen:
        raise RollbackError(f"manifest {m.name} v{m.version} is older than v{seen}, already accepted")
    before = booted.get(m.name)
    if seen == m.version and before is not None and CID.parse(before).multihash != cid.multihash:
        raise VersionConflictError(f"manifest {cid} ({m.name} v{m.version}) is not {before}, the manifest already "
                                   f"accepted at v{m.version}: one version, one content")
    checks.append(Check("rollback", True, f"v{m.version} >= highest seen {seen if seen is not None else '(none)'}"))
    state.root = root
    highest[m.name] = m.version
    booted[m.name] = str(cid)
    state.highest, state.booted, state.name = highest, booted, m.name
    if reset_versions:
        state.registry = 0  # TUF's recovery after a rotation, as for the manifest versions
    if persist:
        state.save()
    return checks, signers


def check_layer(manifest: Manifest, cid: CID, size: int) -> Layer:
    """A layer handed to the device must be in the signed manifest and no bigger than listed."""
    layer = manifest.layer(cid)
    if layer is None:
        raise LayerNotListedError(f"layer {cid} is not listed in manifest {manifest.name} v{manifest.version}")
    if size > layer.size:
        raise SizeLimitError(f"layer {cid} is {size} bytes, the manifest allows {layer.size}")
    return layer


def utc(t: int) -> str:
    """An ISO 8601 UTC time for people (seconds since the epoch stay in the signed data)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _span(seconds: int) -> str:
    days, rest = divmod(max(seconds, 0), 86400)
    return f"{days} days" if days >= 2 else f"{rest // 3600 + 24 * days} h" if seconds >= 3600 else f"{seconds} s"
