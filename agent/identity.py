"""A software DICE identity for developing flows off-device (`agent run --identity DIR`).

A device gets its alias key from CDI_2, handed over by the bootstrap. Off-device the same
derivation runs in one process from a UDS kept in DIR/uds (0600, created once): firmware and
bootstrap layers with fixed development code hashes (which no real manifest references, so a
verifier never mistakes a development identity for a device), then the image layer from the
manifest when there is one. Same UDS + same manifest -> same alias key.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cidboot.cid import CID
from cidboot.cose import PrivateKey
from cidboot.dice.chain import verify_chain
from cidboot.dice.derive import DiceInputs, DiceMode
from cidboot.dice.software import derive_layers
from cidboot.manifest import Manifest
from cidboot.measure import image_code_hash, image_inputs

DEV_FIRMWARE = hashlib.sha512(b"cidboot development firmware").digest()
DEV_BOOTSTRAP = hashlib.sha512(b"cidboot development bootstrap").digest()
LAYERS = ("firmware", "bootstrap", "image")


@dataclass(frozen=True)
class Identity:
    key: PrivateKey
    chain: bytes
    measurements: dict[str, bytes]  # what the chain measured, per layer


def uds(directory: Path) -> bytes:
    path = directory / "uds"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return path.read_bytes()


def development(directory: Path, manifest_cid: CID | None = None, manifest: Manifest | None = None,
                signer_ids: list[bytes] | None = None) -> Identity:
    layers = [DiceInputs(code_hash=DEV_FIRMWARE, mode=DiceMode.NORMAL),
              DiceInputs(code_hash=DEV_BOOTSTRAP, mode=DiceMode.NORMAL)]
    if manifest is not None and manifest_cid is not None:
        layers.append(image_inputs(manifest_cid, manifest, signer_ids or []))
    else:
        layers.append(DiceInputs(code_hash=hashlib.sha512(b"cidboot development image").digest(), mode=DiceMode.NORMAL))
    ident = derive_layers(uds(directory), layers)
    entries = verify_chain(ident.chain, allow_debug=True).entries
    return Identity(ident.leaf_key, ident.chain, {LAYERS[i]: e.code_hash for i, e in enumerate(entries[:3])})


def references(manifest: Manifest | None, own: dict[str, bytes]) -> dict[str, bytes]:
    """The reference values policies compare with: the manifest's (image = its layer CIDs);
    without a manifest (a bare flow.yaml in development) the identity's own."""
    if manifest is None:
        return dict(own)
    return {**manifest.measurements, "image": image_code_hash(manifest)}
