"""Issue 11 "Prove it": every COSE verify entry point x {genuine, payload attached, payload
swapped, signature from another object}.

Detached entry points (the verifier re-derives the signed bytes from the object it holds):
  genuine    - the object as signed verifies (the control);
  attached   - the genuine object with the bytes it signed copied into the payload slot: refused,
               a detached signature must carry nil;
  swapped    - attacker content with the genuine signature, its signed bytes in the slot (the
               issue's forgery): refused;
  other      - attacker content with a genuine detached signature of another object of the
               same kind, by the same keys: refused.
Attached entry points (EAT evidence, DICE certificates, bare attached COSE):
  genuine; attached -> the payload slot set to nil: refused; swapped -> other bytes in the slot:
  refused; other -> the signature of another message by the same key: refused.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.audit import AuditLog, MemoryBlocks, verify_log
from bootstrap.stage.verify import Refused, verify_signed
from cidboot.dataflow.provenance import decode, make_input, verify_signature
from cidboot.errors import CidbootError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.trust import cose, keys
from cidboot.trust.appraisal import AFFIRMING, DeviceRoots, appraise
from cidboot.trust.cose_key import raw_public_bytes
from cidboot.trust.dice.chain import verify_chain
from cidboot.trust.dice.derive import DiceInputs
from cidboot.trust.dice.software import derive_layers
from cidboot.trust.eat import build_evidence, ueid_for
from cidboot.trust.manifest import (
    Layer,
    Manifest,
    RootOfTrust,
    SignedManifest,
    SignedRoot,
    TrustState,
    sign_manifest,
    sign_root,
    verify_manifest,
)
from cidboot.trust.registry import sign_registry, verify_registry
from imagebuilder.commands import verify as ib_verify

KEYS = [ed25519.Ed25519PrivateKey.generate() for _ in range(3)]
ROOT = RootOfTrust.from_public_keys([k.public_key() for k in KEYS], threshold=2)
NEW_KEYS = [ed25519.Ed25519PrivateKey.generate() for _ in range(2)]
NEW_ROOT = RootOfTrust.from_public_keys([k.public_key() for k in NEW_KEYS], threshold=1, version=2)
NOW = int(time.time())
ALIAS = keys.generate()
FLOW = CID.of(dagcbor.encode({"flow": 1}), DAG_CBOR)
CASES = ("genuine", "attached", "swapped", "other")


def put_in_slot(msg: bytes, payload: bytes | None) -> bytes:
    """The message with its payload slot replaced (keeps tagging and everything else)."""
    obj = cbor2.loads(msg)
    tagged = isinstance(obj, cbor2.CBORTag)
    arr = list(obj.value if tagged else obj)
    arr[2] = payload
    return cbor2.dumps(cbor2.CBORTag(obj.tag, arr) if tagged else arr, canonical=True)


def slot(msg: bytes) -> Any:
    obj = cbor2.loads(msg)
    return (obj.value if isinstance(obj, cbor2.CBORTag) else obj)[2]


@dataclass(frozen=True)
class Detached:
    """One entry point whose signature covers bytes the verifier re-derives.

    sign(i): content number i and its genuine signature; payload(content): the bytes signed;
    verify(content, sig): raises CidbootError (a Verification/Format error) on refusal."""

    sign: Callable[[int], tuple[Any, bytes]]
    payload: Callable[[Any], bytes]
    verify: Callable[[Any, bytes], object]
    refused: type[Exception] = CidbootError


def _manifest(i: int, root: RootOfTrust = ROOT) -> Manifest:
    return Manifest("hello", i + 1, NOW + 3600, (Layer(CID.of(b"kernel%d" % i, RAW), 7, "kernel"),), root,
                    {"image": bytes(64)}, cmdline="init=/bin/sh" if i else "console=ttyS0")


def _manifest_sign(i: int) -> tuple[Any, bytes]:
    s = sign_manifest(_manifest(i), KEYS[:2])
    return s.manifest, s.signatures


def _verify_manifest(m: Manifest, sig: bytes) -> None:
    verify_manifest(SignedManifest.decode(SignedManifest(m, sig).encode()), TrustState(ROOT), persist=False)


def _verify_signed(m: Manifest, sig: bytes) -> None:
    sm = SignedManifest(m, sig)
    verify_signed(sm.cid, sm.encode(), TrustState(ROOT))


def _imagebuilder_verify(m: Manifest, sig: bytes) -> None:
    d = Path(tempfile.mkdtemp(prefix="cose-matrix-"))
    keys.write_root(ROOT, d / "root.json")
    (d / "m.cbor").write_bytes(SignedManifest(m, sig).encode())
    args = argparse.Namespace(manifest=str(d / "m.cbor"), root=d / "root.json", state=None, name=None, store=d / "store",
                              no_layers=True, json=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = ib_verify.run(args)
    if rc != 0:
        raise CidbootError(f"imagebuilder verify refused: {out.getvalue()}")


def _rotation_sign(i: int) -> tuple[Any, bytes]:
    r = sign_root(RootOfTrust(NEW_ROOT.keys, NEW_ROOT.threshold + i, 2) if i else NEW_ROOT, KEYS[:2], NEW_KEYS)
    return r.root, r.signatures


def _verify_rotation(root: RootOfTrust, sig: bytes) -> None:
    m = sign_manifest(_manifest(0, root), NEW_KEYS)
    sm = SignedManifest(m.manifest, m.signatures, (SignedRoot(root, sig),))
    verify_manifest(SignedManifest.decode(sm.encode()), TrustState(ROOT), persist=False)


def _registry_sign(i: int) -> tuple[Any, bytes]:
    roots = DeviceRoots()
    roots.add(ed25519.Ed25519PrivateKey.generate().public_key(), f"device-{i}")
    env = dagcbor.decode(sign_registry(roots, KEYS[:2]))
    return env["registry"], env["signatures"]


def _verify_registry(obj: Any, sig: bytes) -> None:
    verify_registry(dagcbor.encode({"registry": obj, "signatures": sig}), ROOT)


def _provenance_sign(i: int) -> tuple[Any, bytes]:
    _, block = make_input(value=i, definition="reading", flow=FLOW, parents=[FLOW], key=ALIAS,
                          operation="read", output="value")
    doc = dagcbor.decode(block)
    return doc["input"], doc["sig"]


def _verify_provenance(inp: Any, sig: bytes) -> None:
    verify_signature(decode(dagcbor.encode({"input": inp, "sig": sig})))


def _audit_sign(i: int) -> tuple[Any, bytes]:
    store = MemoryBlocks()
    log = AuditLog(ALIAS, store)
    log.record("run" if i else "refused", f"entry {i}")
    assert log.head is not None
    doc = dagcbor.decode(store.get(log.head))
    return doc["entry"], doc["sig"]


def _verify_audit(entry: Any, sig: bytes) -> None:
    store = MemoryBlocks()
    block = dagcbor.encode({"entry": entry, "sig": sig})
    cid = CID.of(block, DAG_CBOR)
    store.put(cid, block)
    list(verify_log(cid, store.get, ALIAS.public_key()))


def _raw1_sign(i: int) -> tuple[Any, bytes]:
    return b"content %d" % i, cose.sign1(b"content %d" % i, ALIAS, detached=True)


def _rawm_sign(i: int) -> tuple[Any, bytes]:
    return b"content %d" % i, cose.sign_multi(b"content %d" % i, [(ALIAS, b"k")], detached=True)


def _verify_rawm(content: bytes, sig: bytes) -> None:
    msg = cose.decode_sign(sig)
    cose.verify_signature_detached(msg, msg.signatures[0], ALIAS.public_key(), content)


DETACHED: dict[str, Detached] = {
    "cose.verify1_detached": Detached(_raw1_sign, lambda c: c, lambda c, s: cose.verify1_detached(s, ALIAS.public_key(), c)),
    "cose.verify_signature_detached": Detached(_rawm_sign, lambda c: c, _verify_rawm),
    "manifest.verify_manifest": Detached(_manifest_sign, lambda m: m.encode(), _verify_manifest),
    "bootstrap.verify_signed": Detached(_manifest_sign, lambda m: m.encode(), _verify_signed, Refused),
    "imagebuilder verify": Detached(_manifest_sign, lambda m: m.encode(), _imagebuilder_verify),
    "manifest root rotation": Detached(_rotation_sign, lambda r: dagcbor.encode(r.to_obj()), _verify_rotation),
    "registry.verify_registry": Detached(_registry_sign, dagcbor.encode, _verify_registry),
    "provenance.verify_signature": Detached(_provenance_sign, dagcbor.encode, _verify_provenance),
    "audit.verify_log": Detached(_audit_sign, dagcbor.encode, _verify_audit),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("entry", list(DETACHED))
def test_detached_entry_point(entry: str, case: str) -> None:
    ep = DETACHED[entry]
    content, sig = ep.sign(0)
    assert slot(sig) is None  # every signer in cidboot writes detached signatures as nil
    if case == "genuine":
        ep.verify(content, sig)
        return
    evil, evil_sig = ep.sign(1)
    forged = {"attached": (content, put_in_slot(sig, ep.payload(content))),
              "swapped": (evil, put_in_slot(sig, ep.payload(content))),
              "other": (evil, sig)}[case]
    ep.verify(evil, evil_sig)  # the attacker content is itself well formed: only the signature is wrong
    # a carried payload is refused as such, before any signature is looked at
    with pytest.raises(ep.refused, match="carries a payload" if case != "other" else None):
        ep.verify(*forged)


# -- attached -------------------------------------------------------------------------------

DEVICE = derive_layers(os.urandom(32), [DiceInputs(code_hash=bytes([i]) * 64) for i in range(3)])


def _evidence(nonce: bytes) -> bytes:
    return build_evidence(nonce=nonce, leaf_key=DEVICE.leaf_key, chain=DEVICE.chain,
                          ueid=ueid_for(raw_public_bytes(DEVICE.root_public_key)), measurements={}, manifest_cid=None)


def _appraise(ev: bytes) -> None:
    roots = DeviceRoots()
    roots.add(DEVICE.root_public_key)
    res = appraise(ev, expected_nonce=b"n" * 16, roots=roots, allow_unmeasured=True)
    bad = [c for c in res.checks if c.name in ("format", "signature") and c.status != AFFIRMING]
    if bad or "signature" not in {c.name for c in res.checks}:
        raise CidbootError(f"evidence refused: {bad}")


def _chain_with_cert(cert: bytes) -> bytes:
    items = cbor2.loads(DEVICE.chain)
    items[-1] = cbor2.loads(cert)
    return cbor2.dumps(items)


def _last_cert() -> bytes:
    return cbor2.dumps(cbor2.loads(DEVICE.chain)[-1])


@dataclass(frozen=True)
class Attached:
    genuine: Callable[[], bytes]  # a signed message carrying its payload
    other: Callable[[], bytes]  # another message by the same key
    verify: Callable[[bytes], object]


ATTACHED: dict[str, Attached] = {
    "cose.verify1_attached": Attached(lambda: cose.sign1(b"one", ALIAS), lambda: cose.sign1(b"two", ALIAS),
                                      lambda m: cose.verify1_attached(m, ALIAS.public_key())),
    "cose.verify_signature_attached": Attached(
        lambda: cose.sign_multi(b"one", [(ALIAS, b"k")]), lambda: cose.sign_multi(b"two", [(ALIAS, b"k")]),
        lambda m: cose.verify_signature_attached(cose.decode_sign(m), cose.decode_sign(m).signatures[0],
                                                 ALIAS.public_key())),
    "appraisal (EAT evidence)": Attached(lambda: _evidence(b"n" * 16), lambda: _evidence(b"m" * 16), _appraise),
    "dice.verify_chain (certificate)": Attached(_last_cert, lambda: cbor2.dumps(cbor2.loads(DEVICE.chain)[-2]),
                                                lambda c: verify_chain(_chain_with_cert(c))),
}


def _with_signature_of(msg: bytes, other: bytes) -> bytes:
    obj, o = cbor2.loads(msg), cbor2.loads(other)
    tagged = isinstance(obj, cbor2.CBORTag)
    arr, oarr = list(obj.value if tagged else obj), list(o.value if isinstance(o, cbor2.CBORTag) else o)
    arr[3] = oarr[3]
    return cbor2.dumps(cbor2.CBORTag(obj.tag, arr) if tagged else arr, canonical=True)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("entry", list(ATTACHED))
def test_attached_entry_point(entry: str, case: str) -> None:
    ep = ATTACHED[entry]
    msg = ep.genuine()
    if case == "genuine":
        ep.verify(msg)
        return
    forged = {"attached": put_in_slot(msg, None),  # nil where the payload must be carried
              "swapped": put_in_slot(msg, slot(ep.other())),  # another object's (well-formed) payload
              "other": _with_signature_of(msg, ep.other())}[case]
    with pytest.raises(CidbootError):
        ep.verify(forged)
