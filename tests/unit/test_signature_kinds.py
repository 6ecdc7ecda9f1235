"""The root keys sign manifests, root rotations and device registries. Each signature carries
its kind in the protected content-type header, and a verifier accepts only the kind it asked
for: a signature made for one kind is never counted for another (domain separation)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, RAW
from cidboot.trust import cose
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.cose_key import key_id
from cidboot.trust.manifest import (
    KIND_MANIFEST,
    KIND_REGISTRY,
    KIND_ROOT,
    Layer,
    Manifest,
    RootOfTrust,
    RootRotationError,
    SignatureKindError,
    SignedManifest,
    SignedRoot,
    TrustState,
    sign_kind,
    sign_manifest,
    verify_manifest,
    verify_threshold,
)
from cidboot.trust.registry import RegistryVerificationError, sign_registry, verify_registry

KEYS = [ed25519.Ed25519PrivateKey.generate() for _ in range(2)]
ROOT = RootOfTrust.from_public_keys([k.public_key() for k in KEYS], threshold=2, version=1)
NOW = 1_800_000_000


def _manifest(root: RootOfTrust = ROOT) -> Manifest:
    return Manifest("hello", 1, NOW + 3600, (Layer(CID.of(b"k", RAW), 1, "kernel"),), root)


@pytest.mark.parametrize("kind", [KIND_MANIFEST, KIND_ROOT, KIND_REGISTRY])
def test_every_kind_verifies_only_as_itself(kind: str) -> None:
    sigs = sign_kind(b"payload", KEYS, kind)
    assert len(verify_threshold(sigs, b"payload", ROOT, "x", kind=kind)) == 2
    for other in {KIND_MANIFEST, KIND_ROOT, KIND_REGISTRY} - {kind}:
        with pytest.raises(SignatureKindError, match="made for another kind"):
            verify_threshold(sigs, b"payload", ROOT, "x", kind=other)


def test_unlabelled_signatures_are_refused() -> None:
    """Signatures from before the label (or from a tool that leaves it out) count for nothing."""
    sigs = cose.sign_multi(b"payload", [(k, key_id(k.public_key())) for k in KEYS], detached=True)
    with pytest.raises(SignatureKindError, match="labelled None"):
        verify_threshold(sigs, b"payload", ROOT, "manifest", kind=KIND_MANIFEST)


def test_registry_signatures_presented_as_a_manifests_are_refused(tmp_path: Path) -> None:
    """A manifest whose signatures were made by the root keys for a device registry over the
    same bytes: the label says registry, the verifier asks for a manifest."""
    m = _manifest()
    forged = SignedManifest(m, sign_kind(m.encode(), KEYS, KIND_REGISTRY))
    with pytest.raises(SignatureKindError):
        verify_manifest(SignedManifest.decode(forged.encode()), TrustState.load(tmp_path / "t.json", ROOT), now=NOW)
    assert verify_manifest(sign_manifest(m, KEYS), TrustState.load(tmp_path / "u.json", ROOT), now=NOW)


def test_manifest_signatures_presented_as_a_root_rotation_are_refused(tmp_path: Path) -> None:
    new_root = RootOfTrust.from_public_keys([k.public_key() for k in KEYS], threshold=2, version=2)
    rot = SignedRoot(new_root, sign_kind(dagcbor.encode(new_root.to_obj()), KEYS, KIND_MANIFEST))
    signed = sign_manifest(_manifest(new_root), KEYS, rotations=(rot,))
    with pytest.raises(RootRotationError, match="made for another kind"):
        verify_manifest(SignedManifest.decode(signed.encode()), TrustState.load(tmp_path / "t.json", ROOT), now=NOW)


def test_manifest_signatures_presented_as_a_registrys_are_refused() -> None:
    roots = DeviceRoots()
    roots.add(ed25519.Ed25519PrivateKey.generate().public_key(), "sensor-1", "sensor")
    env = dagcbor.decode(sign_registry(roots, KEYS))
    env["signatures"] = sign_kind(dagcbor.encode(env["registry"]), KEYS, KIND_MANIFEST)
    with pytest.raises(RegistryVerificationError, match="made for another kind"):
        verify_registry(dagcbor.encode(env), ROOT)
    assert verify_registry(sign_registry(roots, KEYS), ROOT).roles
