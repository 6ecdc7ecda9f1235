"""Issue 11 #7: the role in evidence is checked against the signed device registry.

On main appraisal copied the role the evidence claims into the result and never compared it
with anything, so a device registered as a "sensor" that claims "aggregator" was affirmed as an
aggregator (and peers send it an aggregator's inputs). Now the role comes from the registry,
and a claim that differs is contraindicated by a named check, "role".
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.verifier import Verifier
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, RAW
from cidboot.trust.appraisal import AFFIRMING, CONTRAINDICATED, DeviceRoots, appraise
from cidboot.trust.cose_key import encode_public_key_bytes, key_id, raw_public_bytes
from cidboot.trust.dice.derive import DiceInputs, derive_id
from cidboot.trust.dice.software import DerivedIdentity, derive_layers
from cidboot.trust.eat import build_evidence, ueid_for
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from cidboot.trust.measure import image_inputs
from cidboot.trust.registry import RegistryFormatError, sign_registry, verify_registry

SIGNER = ed25519.Ed25519PrivateKey.generate()
ROOT = RootOfTrust.from_public_keys([SIGNER.public_key()], 1)
FW, BS = bytes([1]) * 64, bytes([2]) * 64
SIGNED = sign_manifest(Manifest("flow", 1, int(time.time()) + 3600, (Layer(CID.of(b"agent", RAW), 5, "agent"),), ROOT,
                                {"firmware": FW, "bootstrap": BS}), [SIGNER])


def _device() -> DerivedIdentity:
    return derive_layers(os.urandom(32), [DiceInputs(code_hash=FW), DiceInputs(code_hash=BS),
                                          image_inputs(SIGNED.cid, SIGNED.manifest, [key_id(SIGNER.public_key())])])


def _evidence(dev: DerivedIdentity, nonce: bytes, role: str | None) -> bytes:
    return build_evidence(nonce=nonce, leaf_key=dev.leaf_key, chain=dev.chain,
                          ueid=ueid_for(raw_public_bytes(dev.root_public_key)), measurements={},
                          manifest_cid=SIGNED.cid, role=role)


def _signed_registry(dev: DerivedIdentity, role: str | None) -> DeviceRoots:
    roots = DeviceRoots()
    roots.add(dev.root_public_key, "board-7", role)
    return verify_registry(sign_registry(roots, [SIGNER]), ROOT)


def test_device_registered_as_sensor_claiming_aggregator_is_contraindicated() -> None:
    dev, nonce = _device(), os.urandom(16)
    roots = _signed_registry(dev, "sensor")
    res = appraise(_evidence(dev, nonce, "aggregator"), expected_nonce=nonce, roots=roots, manifest=SIGNED.manifest,
                   manifest_cid=SIGNED.cid)
    checks = {c.name: (c.status, c.reason) for c in res.checks}
    assert res.status == CONTRAINDICATED and checks["role"][0] == CONTRAINDICATED, checks
    assert "claims role 'aggregator'" in checks["role"][1] and "assigns 'sensor'" in checks["role"][1]
    assert res.role == "sensor" and res.claimed_role == "aggregator"  # the registry's word, never the claim


def test_the_verifier_peers_use_refuses_the_wrong_role_and_affirms_the_registered_one() -> None:
    """agent.verifier.Verifier is what PeerService/PeerClient appraise with (roots = the
    signed registry the agent booted with)."""
    dev = _device()
    v = Verifier(_signed_registry(dev, "sensor"), SIGNED.manifest, SIGNED.cid)
    nonce = os.urandom(16)
    assert v.appraise(_evidence(dev, nonce, "aggregator"), nonce).status == CONTRAINDICATED
    ok = v.appraise(_evidence(dev, nonce, "sensor"), nonce)
    assert ok.status == AFFIRMING and ok.role == "sensor", ok.to_obj()


@pytest.mark.parametrize("registered, claimed", [(None, "aggregator"), ("sensor", None)])
def test_a_role_claim_with_nothing_to_compare_is_not_affirmed(registered: str | None, claimed: str | None) -> None:
    dev, nonce = _device(), os.urandom(16)
    res = appraise(_evidence(dev, nonce, claimed), expected_nonce=nonce, roots=_signed_registry(dev, registered),
                   manifest=SIGNED.manifest, manifest_cid=SIGNED.cid)
    assert res.status == CONTRAINDICATED and [c.status for c in res.checks if c.name == "role"] == [CONTRAINDICATED]


def test_unregistered_device_gets_no_role() -> None:
    dev, nonce = _device(), os.urandom(16)
    res = appraise(_evidence(dev, nonce, "aggregator"), expected_nonce=nonce, roots=DeviceRoots())
    assert res.role is None and res.claimed_role == "aggregator"
    assert [c.status for c in res.checks if c.name == "role"] == [CONTRAINDICATED]


def test_roles_survive_the_signed_registry_and_the_roots_file(tmp_path: Path) -> None:
    dev = _device()
    roots = _signed_registry(dev, "sensor")
    did = derive_id(raw_public_bytes(dev.root_public_key)).hex()
    assert roots.roles == {did: "sensor"} and roots.names == {did: "board-7"}
    roots.save(tmp_path / "roots.json")
    assert DeviceRoots.load(tmp_path / "roots.json").roles == {did: "sensor"}


def test_registry_entry_role_must_be_text_and_old_entries_have_none() -> None:
    dev = _device()
    did = derive_id(raw_public_bytes(dev.root_public_key)).hex()
    key = encode_public_key_bytes(dev.root_public_key)

    def block(entry: dict[str, object]) -> bytes:
        from cidboot.trust.manifest import KIND_REGISTRY, sign_kind

        obj = {"devices": [entry]}
        sigs = sign_kind(dagcbor.encode(obj), [SIGNER], KIND_REGISTRY)
        return dagcbor.encode({"registry": obj, "signatures": sigs})

    with pytest.raises(RegistryFormatError, match="role must be non-empty text"):
        verify_registry(block({"id": did, "name": "b", "role": 7, "key": key}), ROOT)
    assert verify_registry(block({"id": did, "name": "b", "key": key}), ROOT).roles == {did: None}
