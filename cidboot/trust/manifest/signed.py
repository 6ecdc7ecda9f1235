"""Signing manifests and root rotations, and the stored envelope.

A signed manifest is stored as one DAG-CBOR block, `{"manifest": <manifest map>,
"signatures": <COSE_Sign with detached payload>, "rotations": [<signed root>...]}`. The
detached payload is the canonical encoding of the manifest map, so the signatures cover
exactly the bytes anyone re-derives from the block, and the manifest's CIDs stay links.
The block's CID is the manifest CID the bootstrap is told to boot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.trust import cose
from cidboot.trust.cose import PrivateKey
from cidboot.trust.cose_key import key_id
from cidboot.trust.manifest.model import Manifest, ManifestFormatError, RootOfTrust

MAX_ENVELOPE = 1024 * 1024  # bytes: a manifest is small; anything bigger is refused unread

# The root keys sign three kinds of object. Each signature says which kind it covers in its
# protected content-type header (COSE label 3), and a verifier asks for the kind it expects, so
# a signature made for one kind can never be presented as another's, whatever the decoders
# accept (domain separation; the strict decoders alone were the only guard before).
KIND_MANIFEST = "application/vnd.cidboot.manifest+dag-cbor"
KIND_ROOT = "application/vnd.cidboot.root+dag-cbor"
KIND_REGISTRY = "application/vnd.cidboot.device-registry+dag-cbor"


@dataclass(frozen=True)
class SignedRoot:
    """A root of trust signed by the threshold of the root before it (a rotation)."""

    root: RootOfTrust
    signatures: bytes  # COSE_Sign, detached payload = canonical root encoding

    def payload(self) -> bytes:
        return dagcbor.encode(self.root.to_obj())

    def to_obj(self) -> dict[str, Any]:
        return {"root": self.root.to_obj(), "signatures": self.signatures}


@dataclass(frozen=True)
class SignedManifest:
    """A manifest with its COSE_Sign signatures (detached: they cover the manifest's encoding) and
    the signed root rotations a device needs to get from its trusted root to the signing one."""

    manifest: Manifest
    signatures: bytes
    rotations: tuple[SignedRoot, ...] = field(default_factory=tuple)

    def payload(self) -> bytes:
        return self.manifest.encode()

    def to_obj(self) -> dict[str, Any]:
        return {"manifest": self.manifest.to_obj(), "signatures": self.signatures,
                "rotations": [r.to_obj() for r in self.rotations]}

    def encode(self) -> bytes:
        return dagcbor.encode(self.to_obj())

    @property
    def cid(self) -> CID:
        return CID.of(self.encode(), DAG_CBOR)

    @classmethod
    def decode(cls, block: bytes) -> SignedManifest:
        if len(block) > MAX_ENVELOPE:
            raise ManifestFormatError(f"signed manifest of {len(block)} bytes exceeds {MAX_ENVELOPE}")
        obj = dagcbor.decode(block)
        if not isinstance(obj, dict) or set(obj) != {"manifest", "signatures", "rotations"}:
            raise ManifestFormatError("signed manifest must be {manifest, signatures, rotations}")
        if not isinstance(obj["signatures"], bytes) or not isinstance(obj["rotations"], list):
            raise ManifestFormatError("signed manifest: signatures must be bytes and rotations a list")
        rots = []
        for i, r in enumerate(obj["rotations"]):
            if not isinstance(r, dict) or set(r) != {"root", "signatures"} or not isinstance(r["signatures"], bytes):
                raise ManifestFormatError(f"signed manifest: rotation {i} must be {{root, signatures}}")
            rots.append(SignedRoot(RootOfTrust.from_obj(r["root"], f"rotation {i} root"), r["signatures"]))
        return cls(Manifest.from_obj(obj["manifest"]), obj["signatures"], tuple(rots))


def sign_kind(payload: bytes, keys: Sequence[PrivateKey], kind: str) -> bytes:
    """A detached COSE_Sign over `payload` by each of `keys`, labelled with `kind` (KIND_*)."""
    return cose.sign_multi(payload, [(k, key_id(k.public_key())) for k in keys],
                           protected={cose.HDR_CONTENT_TYPE: kind}, detached=True)


def sign_manifest(manifest: Manifest, keys: Sequence[PrivateKey], rotations: tuple[SignedRoot, ...] = ()) -> SignedManifest:
    return SignedManifest(manifest, sign_kind(manifest.encode(), keys, KIND_MANIFEST), rotations)


def sign_root(new_root: RootOfTrust, old_root_keys: Sequence[PrivateKey], new_root_keys: Sequence[PrivateKey] | None = None) -> SignedRoot:
    """Rotate: the new root is signed by the old root's keys (and, as TUF asks, its own)."""
    payload = dagcbor.encode(new_root.to_obj())
    return SignedRoot(new_root, sign_kind(payload, [*old_root_keys, *(new_root_keys or [])], KIND_ROOT))
