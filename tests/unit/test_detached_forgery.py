"""Issue 11 #1: a detached signature moved onto attacker content.

The attack needs no key: take any published object whose COSE signature has a detached (nil)
payload, copy the bytes it signed into the message's payload slot, and pair the message with
your own content. A verifier that checks "the carried payload if any, else the re-derived
one" then verifies the genuine signature over the genuine bytes and accepts the attacker's
content. Each test below reproduces one forgery the issue reports; every one was accepted on
main (before `verify1_detached` / `verify_signature_detached`) and is refused now.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.audit import AuditLog, AuditLogError, MemoryBlocks, verify_log
from bootstrap.stage.verify import Refused, verify_signed
from cidboot.dataflow.provenance import ForgedSignature, decode, make_input, verify_signature
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.trust import cose, keys
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.cose_key import key_id
from cidboot.trust.manifest import (
    Layer,
    Manifest,
    RootOfTrust,
    RootRotationError,
    SignatureError,
    SignedManifest,
    SignedRoot,
    TrustState,
    sign_manifest,
    verify_manifest,
)
from cidboot.trust.manifest.model import MAX_VERSION
from cidboot.trust.registry import RegistryVerificationError, registry_obj, sign_registry, verify_registry

KEYS = [ed25519.Ed25519PrivateKey.generate() for _ in range(3)]
ROOT = RootOfTrust.from_public_keys([k.public_key() for k in KEYS], threshold=2)
EVIL = ed25519.Ed25519PrivateKey.generate()
NOW = int(time.time())


def attach(detached_msg: bytes, signed_bytes: bytes) -> bytes:
    """The attacker's whole trick: put the genuinely signed bytes into the nil payload slot."""
    obj = cbor2.loads(detached_msg)
    tagged = isinstance(obj, cbor2.CBORTag)
    arr = list(obj.value if tagged else obj)
    assert arr[2] is None, "the genuine message is detached"
    arr[2] = signed_bytes
    return cbor2.dumps(cbor2.CBORTag(obj.tag, arr) if tagged else arr, canonical=True)


def genuine(version: int = 1) -> SignedManifest:
    layer = Layer(CID.of(b"kernel", RAW), 6, "kernel")
    m = Manifest("hello", version, NOW + 3600, (layer,), ROOT, {"image": bytes(64)}, cmdline="console=ttyS0")
    return sign_manifest(m, KEYS[:2])


def forged_manifest(victim: SignedManifest) -> SignedManifest:
    """Attacker layers, a root shell and the highest version, under the victim's signatures."""
    evil = Manifest("hello", MAX_VERSION, NOW + 10 * 365 * 86400, (Layer(CID.of(b"evil", RAW), 4, "kernel"),),
                    ROOT, {"image": bytes(64)}, cmdline="init=/bin/sh")
    return SignedManifest(evil, attach(victim.signatures, victim.payload()))


def test_attached_payload_swapped_into_detached_manifest_is_refused_by_verify_manifest(tmp_path: Path) -> None:
    forged = SignedManifest.decode(forged_manifest(genuine()).encode())
    state = TrustState.load(tmp_path / "trust.json", ROOT)
    with pytest.raises(SignatureError, match="carries a payload"):
        verify_manifest(forged, state)
    assert state.highest == {}  # nothing recorded: the genuine next release still boots
    verify_manifest(genuine(2), state)
    assert state.highest == {"hello": 2}


def test_attached_payload_swapped_into_detached_manifest_is_refused_by_bootstrap_verify_signed(tmp_path: Path) -> None:
    forged = forged_manifest(genuine())
    with pytest.raises(Refused, match="carries a payload"):
        verify_signed(forged.cid, forged.encode(), TrustState(ROOT))


def test_attached_payload_swapped_into_detached_manifest_is_refused_by_imagebuilder_verify(tmp_path: Path) -> None:
    keys.write_root(ROOT, tmp_path / "root.json")
    (tmp_path / "forged.cbor").write_bytes(forged_manifest(genuine()).encode())
    r = subprocess.run([sys.executable, "-m", "imagebuilder", "verify", str(tmp_path / "forged.cbor"),
                        "--root", str(tmp_path / "root.json"), "--no-layers"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "CIDBOOT_STORE": str(tmp_path / "store")})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "✗ SignatureError" in r.stdout and "carries a payload" in r.stdout


def test_root_rotation_to_attacker_keys_under_moved_signatures_is_refused(tmp_path: Path) -> None:
    """The old root's signatures (over a published manifest) carried in the slot, plus the
    attacker's own signatures over the same bytes for the new root's threshold."""
    victim = genuine()
    payload = victim.payload()
    evil_root = RootOfTrust.from_public_keys([EVIL.public_key()], threshold=1, version=ROOT.version + 1)
    theirs = cbor2.loads(attach(victim.signatures, payload)).value
    mine = cbor2.loads(cose.sign_multi(payload, [(EVIL, key_id(EVIL.public_key()))])).value
    merged = cbor2.dumps(cbor2.CBORTag(cose.TAG_SIGN, [theirs[0], {}, payload, list(theirs[3]) + list(mine[3])]),
                         canonical=True)
    evil_m = Manifest("hello", 1, NOW + 3600, (Layer(CID.of(b"evil", RAW), 4, "kernel"),), evil_root,
                      cmdline="init=/bin/sh")
    forged = sign_manifest(evil_m, [EVIL], rotations=(SignedRoot(evil_root, merged),))
    state = TrustState.load(tmp_path / "trust.json", ROOT)
    with pytest.raises(RootRotationError, match="carries a payload"):
        verify_manifest(SignedManifest.decode(forged.encode()), state)
    assert state.root == ROOT and not (tmp_path / "trust.json").exists()  # nothing persisted


def test_device_registry_under_moved_signatures_is_refused() -> None:
    roots = DeviceRoots()
    roots.add(ed25519.Ed25519PrivateKey.generate().public_key(), "sensor-1")
    block = dagcbor.decode(sign_registry(roots, KEYS[:2]))
    evil = DeviceRoots()
    evil.add(EVIL.public_key(), "sensor-1")
    forged = dagcbor.encode({"registry": registry_obj(evil),
                             "signatures": attach(block["signatures"], dagcbor.encode(block["registry"]))})
    with pytest.raises(RegistryVerificationError, match="carries a payload"):
        verify_registry(forged, ROOT)


def test_rewritten_audit_entry_under_moved_signature_is_refused() -> None:
    key = keys.generate()
    store = MemoryBlocks()
    log = AuditLog(key, store)
    log.record("refused", "ForgedSignature: input x: not signed by its producer")
    assert log.head is not None
    doc = dagcbor.decode(store.get(log.head))
    signed_bytes = dagcbor.encode(doc["entry"])
    doc["entry"]["decision"], doc["entry"]["reason"] = "run", "all inputs validated"
    doc["sig"] = attach(doc["sig"], signed_bytes)
    forged = dagcbor.encode(doc)
    head = CID.of(forged, DAG_CBOR)
    store.put(head, forged)
    with pytest.raises(AuditLogError, match="carries a payload"):
        list(verify_log(head, store.get, key.public_key()))


def test_forged_provenance_node_under_moved_signature_is_refused() -> None:
    """A sensor's genuine reading, re-valued by the attacker: the aggregator would compute on it."""
    flow = CID.of(dagcbor.encode({"flow": 1}), DAG_CBOR)
    sensor = keys.generate()
    _, block = make_input(value=21, definition="temperature", flow=flow, parents=[flow], key=sensor,
                          operation="read", output="celsius")
    doc = dagcbor.decode(block)
    signed_bytes = dagcbor.encode(doc["input"])
    doc["input"]["value"] = 9999
    doc["sig"] = attach(doc["sig"], signed_bytes)
    with pytest.raises(ForgedSignature, match="carries a payload"):
        verify_signature(decode(dagcbor.encode(doc)))
