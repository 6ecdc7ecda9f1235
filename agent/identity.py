"""The agent's DICE identity: on a device from CDI_2, off-device a software one in a directory.

A device gets its alias key from CDI_Attest, handed over by the bootstrap with the DICE chain
(`from_cdi`). Off-device (`agent run --identity DIR`) the same derivation runs in one process
from a UDS kept in DIR/uds (0600, created once by `keygen` or on first use): firmware and
bootstrap layers with fixed development code hashes (which no real manifest references, so a
verifier never mistakes a development identity for a device), then the image layer from the
manifest when there is one. Same UDS + same manifest -> same alias key.

`self_attestation` is what the agent knows about itself without a verifier: its own chain
verifies and its measurements against the manifest's reference values, in the same
AppraisalResult shape a verifier's appraisal of a peer has, so the registry
(agent.attested) and the policies treat both alike.

Public API:
    uds(directory) -> bytes                                   # DIR/uds, created on first use
    keygen(directory) -> PublicKey                            # new DIR/uds (refuses to overwrite); root key
    development(directory, manifest_cid=None, manifest=None, signer_ids=None, *, role=None) -> Identity
    from_cdi(cdi_attest, chain, *, allow_debug=False) -> Identity
    references(manifest, own) -> {layer: bytes}
    self_attestation(ident, role, references, manifest_cid=None) -> AppraisalResult
    authority_key(directory) -> PrivateKey                    # DIR/authority.pem, for development seeds
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cidboot.errors import CidbootError
from cidboot.ipld.cid import CID
from cidboot.trust import keys
from cidboot.trust.appraisal import AFFIRMING, CONTRAINDICATED, WARNING, AppraisalResult
from cidboot.trust.cose import PrivateKey, PublicKey
from cidboot.trust.cose_key import raw_public_bytes
from cidboot.trust.dice.chain import DiceChainError, verify_chain
from cidboot.trust.dice.derive import DiceInputs, DiceMode, key_from_cdi, root_public_key_from_uds
from cidboot.trust.dice.software import derive_layers
from cidboot.trust.manifest import Manifest
from cidboot.trust.measure import image_code_hash, image_inputs

DEV_FIRMWARE = hashlib.sha512(b"cidboot development firmware").digest()
DEV_BOOTSTRAP = hashlib.sha512(b"cidboot development bootstrap").digest()
DEV_IMAGE = hashlib.sha512(b"cidboot development image").digest()
LAYERS = ("firmware", "bootstrap", "image")


@dataclass(frozen=True)
class Identity:
    key: PrivateKey  # the DICE alias (leaf) key: signs outputs, audit entries, evidence
    chain: bytes  # the encoded DICE chain [root COSE_Key, cert...]
    measurements: dict[str, bytes]  # what the chain measured, per layer (LAYERS order)
    root_public_key: PublicKey | None = None
    root_id: str | None = None  # DICE ID (hex) of the root key: the device id verifiers register


def uds(directory: Path) -> bytes:
    path = directory / "uds"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return path.read_bytes()


def keygen(directory: Path) -> PublicKey:
    """A new development device: DIR/uds. Refuses to replace one (that would be another
    device, and every registration of the old root would silently stop matching)."""
    if (directory / "uds").exists():
        raise CidbootError(f"{directory / 'uds'} exists; refusing to replace a device secret")
    return root_public_key_from_uds(uds(directory))


def _role_uds(secret: bytes, role: str | None) -> bytes:
    """`agent run` plays every role in one process; each role is its own development device
    (its own root and alias key), so placement checks ("produced on the role its producer was
    attested in") are real there too."""
    if role is None:
        return secret
    return hmac.new(secret, b"cidboot development role " + role.encode(), hashlib.sha256).digest()


def _identity(chain: bytes, key: PrivateKey, *, allow_debug: bool) -> Identity:
    vc = verify_chain(chain, allow_debug=allow_debug)
    if raw_public_bytes(vc.leaf_public_key) != raw_public_bytes(key.public_key()):
        raise DiceChainError("the alias key from CDI_Attest is not the DICE chain's leaf key")
    measured = {LAYERS[i]: e.code_hash for i, e in enumerate(vc.entries[:len(LAYERS)])}
    return Identity(key, chain, measured, vc.root_public_key, vc.root_id)


def development(directory: Path, manifest_cid: CID | None = None, manifest: Manifest | None = None,
                signer_ids: list[bytes] | None = None, *, role: str | None = None) -> Identity:
    layers = [DiceInputs(code_hash=DEV_FIRMWARE, mode=DiceMode.NORMAL),
              DiceInputs(code_hash=DEV_BOOTSTRAP, mode=DiceMode.NORMAL)]
    if manifest is not None and manifest_cid is not None:
        layers.append(image_inputs(manifest_cid, manifest, signer_ids or []))
    else:
        layers.append(DiceInputs(code_hash=DEV_IMAGE, mode=DiceMode.NORMAL))
    ident = derive_layers(_role_uds(uds(directory), role), layers)
    return _identity(ident.chain, ident.leaf_key, allow_debug=True)


def from_cdi(cdi_attest: bytes, chain: bytes, *, allow_debug: bool = False) -> Identity:
    """On a device: the alias key from the handed-over CDI_Attest, checked against the chain."""
    return _identity(chain, key_from_cdi(cdi_attest), allow_debug=allow_debug)


def references(manifest: Manifest | None, own: dict[str, bytes]) -> dict[str, bytes]:
    """The reference values policies compare with: the manifest's (image = its layer CIDs);
    without a manifest (a bare flow.yaml in development) the identity's own."""
    if manifest is None:
        return dict(own)
    return {**manifest.measurements, "image": image_code_hash(manifest)}


def self_attestation(ident: Identity, role: str, refs: Mapping[str, bytes],
                     manifest_cid: CID | None = None) -> AppraisalResult:
    """This agent's own appraisal: its chain verified (in `_identity`), each measured layer
    against the reference value; a layer with no reference is a warning, so only an identity
    whose every layer matches is affirming (and counts as a producer in agent.attested)."""
    res = AppraisalResult(device_id=ident.root_id, measurements={k: v.hex() for k, v in ident.measurements.items()},
                          manifest_cid=str(manifest_cid) if manifest_cid else None, role=role,
                          leaf_public_key=ident.key.public_key())
    res.add("chain", AFFIRMING, "own DICE chain verifies and its leaf is the alias key")
    for layer, value in sorted(ident.measurements.items()):
        ref = refs.get(layer)
        if ref is None:
            res.add(f"measurement.{layer}", WARNING, f"no reference value for {layer}")
        elif hmac.compare_digest(ref, value):
            res.add(f"measurement.{layer}", AFFIRMING, f"{layer} measured as the manifest says")
        else:
            res.add(f"measurement.{layer}", CONTRAINDICATED, f"{layer} measured {value.hex()[:16]}..., "
                    f"the manifest says {ref.hex()[:16]}...")
    return res


def authority_key(directory: Path) -> PrivateKey:
    """A development flow authority (DIR/authority.pem, made on first use) that signs the seeds
    of a flow.yaml run without trust keys beside it."""
    stem = directory / "authority"
    if not stem.with_suffix(".pem").exists():
        keys.write_keypair(keys.generate(), stem)
    return keys.load_private_key(stem.with_suffix(".pem"))
