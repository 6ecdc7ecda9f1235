"""Issue 11 #2: appraisal must not affirm stages the signed manifest never pinned.

A workload built without `--reference` has no reference value for firmware and bootstrap; on
main `_check_measurements` skipped those layers and still reported "firmware, bootstrap, image
match the signed manifest", so any firmware and bootstrap were affirmed. Now an unpinned
measured layer makes the result at best `warning`, naming the layers; `imagebuilder build`
warns on stderr and `inspect`/`verify` say which layers are pinned.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from cidboot.ipld.cid import CID, RAW
from cidboot.trust.appraisal import AFFIRMING, WARNING, DeviceRoots, appraise, unpinned_layers
from cidboot.trust.cose_key import key_id, raw_public_bytes
from cidboot.trust.dice.derive import DiceInputs
from cidboot.trust.dice.software import DerivedIdentity, derive_layers
from cidboot.trust.eat import build_evidence, ueid_for
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, SignedManifest, sign_manifest
from cidboot.trust.measure import image_inputs

REPO = Path(__file__).resolve().parents[2]
SIGNER = ed25519.Ed25519PrivateKey.generate()
ROOT = RootOfTrust.from_public_keys([SIGNER.public_key()], 1)
ATTACKER_FW, ATTACKER_BS = os.urandom(64), os.urandom(64)  # whatever the attacker flashed


def _manifest(measurements: dict[str, bytes]) -> SignedManifest:
    m = Manifest("hello", 1, int(time.time()) + 3600, (Layer(CID.of(b"agent", RAW), 5, "agent"),), ROOT, measurements)
    return sign_manifest(m, [SIGNER])


def _device(signed: SignedManifest) -> DerivedIdentity:
    return derive_layers(os.urandom(32), [DiceInputs(code_hash=ATTACKER_FW), DiceInputs(code_hash=ATTACKER_BS),
                                          image_inputs(signed.cid, signed.manifest, [key_id(SIGNER.public_key())])])


def _appraise(signed: SignedManifest, dev: DerivedIdentity) -> dict[str, tuple[str, str]]:
    nonce = os.urandom(16)
    ev = build_evidence(nonce=nonce, leaf_key=dev.leaf_key, chain=dev.chain,
                        ueid=ueid_for(raw_public_bytes(dev.root_public_key)), measurements={}, manifest_cid=signed.cid)
    roots = DeviceRoots()
    roots.add(dev.root_public_key)
    res = appraise(ev, expected_nonce=nonce, roots=roots, manifest=signed.manifest, manifest_cid=signed.cid)
    checks = {c.name: (c.status, c.reason) for c in res.checks}
    checks["overall"] = (res.status, "")
    return checks


def test_workload_without_references_does_not_affirm_any_firmware_and_bootstrap() -> None:
    signed = _manifest({})
    checks = _appraise(signed, _device(signed))
    assert checks["overall"][0] == WARNING, checks
    status, reason = checks["measurements"]
    assert status == WARNING and "unpinned layer(s) firmware, bootstrap" in reason and "image match" in reason
    assert unpinned_layers(signed.manifest) == ["firmware", "bootstrap"]


def test_one_unpinned_stage_is_named_and_pinned_stages_still_affirm() -> None:
    signed = _manifest({"firmware": ATTACKER_FW})
    status, reason = _appraise(signed, _device(signed))["measurements"]
    assert status == WARNING and "unpinned layer(s) bootstrap:" in reason
    signed = _manifest({"firmware": ATTACKER_FW, "bootstrap": ATTACKER_BS})
    checks = _appraise(signed, _device(signed))
    assert checks["measurements"][0] == AFFIRMING and checks["overall"][0] == AFFIRMING, checks


