"""EAT evidence and appraisal: the affirming path, and each way evidence must be refused."""

from __future__ import annotations

import os
import time

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from cidboot.ipld.cid import CID, RAW
from cidboot.trust.appraisal import AFFIRMING, CONTRAINDICATED, WARNING, DeviceRoots, appraise
from cidboot.trust.cose_key import key_id, raw_public_bytes
from cidboot.trust.dice.derive import DiceInputs, DiceMode
from cidboot.trust.dice.software import DerivedIdentity, derive_layers
from cidboot.trust.eat import EvidenceFormatError, build_evidence, parse_evidence, ueid_for
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from cidboot.trust.measure import code_hash_of_blobs, image_inputs

SIGNER = ed25519.Ed25519PrivateKey.generate()
FW, BS = code_hash_of_blobs([b"firmware image"]), code_hash_of_blobs([b"bootstrap kernel", b"bootstrap initrd"])
MANIFEST = Manifest("hello", 1, int(time.time()) + 3600, (Layer(CID.of(b"agent", RAW), 5, "agent"),),
                    RootOfTrust.from_public_keys([SIGNER.public_key()], 1), {"firmware": FW, "bootstrap": BS})
SIGNED = sign_manifest(MANIFEST, [SIGNER])
UDS = os.urandom(32)


def device(uds: bytes = UDS, modes: tuple[DiceMode, ...] = (DiceMode.NORMAL,) * 3, fw: bytes = FW) -> DerivedIdentity:
    layers = [DiceInputs(code_hash=fw, mode=modes[0]), DiceInputs(code_hash=BS, mode=modes[1]),
              image_inputs(SIGNED.cid, MANIFEST, [key_id(SIGNER.public_key())], mode=modes[2])]
    return derive_layers(uds, layers)


def evidence(dev: DerivedIdentity, nonce: bytes, boot_mode: str = "measured") -> bytes:
    return build_evidence(nonce=nonce, leaf_key=dev.leaf_key, chain=dev.chain, ueid=ueid_for(raw_public_bytes(dev.root_public_key)),
                          measurements={"firmware": FW, "bootstrap": BS}, manifest_cid=SIGNED.cid, boot_mode=boot_mode, role="worker")


def roots_for(*devs: DerivedIdentity) -> DeviceRoots:
    r = DeviceRoots()
    for d in devs:
        r.add(d.root_public_key, "dev", "worker")
    return r


def run(ev: bytes, nonce: bytes, roots: DeviceRoots, **kw: object) -> tuple[str, dict[str, tuple[str, str]]]:
    res = appraise(ev, expected_nonce=nonce, roots=roots, manifest=MANIFEST, manifest_cid=SIGNED.cid, **kw)  # type: ignore[arg-type]
    return res.status, {c.name: (c.status, c.reason) for c in res.checks}


def test_affirming() -> None:
    dev, nonce = device(), os.urandom(32)
    status, checks = run(evidence(dev, nonce), nonce, roots_for(dev))
    assert status == AFFIRMING, checks
    assert set(checks) == {"format", "nonce", "dice-chain", "device", "role", "signature", "debug-mode", "measured-boot",
                           "measurements", "manifest"}


def test_replay_wrong_nonce() -> None:
    dev = device()
    status, checks = run(evidence(dev, b"old-nonce-123"), os.urandom(16), roots_for(dev))
    assert status == CONTRAINDICATED and checks["nonce"][0] == CONTRAINDICATED and "replayed" in checks["nonce"][1]


def test_unknown_device() -> None:
    dev, nonce = device(), os.urandom(16)
    status, checks = run(evidence(dev, nonce), nonce, roots_for(device(uds=os.urandom(32))))
    assert status == CONTRAINDICATED and "unknown device" in checks["device"][1]


def test_wrong_measurement() -> None:
    dev, nonce = device(fw=code_hash_of_blobs([b"patched firmware"])), os.urandom(16)
    ev = build_evidence(nonce=nonce, leaf_key=dev.leaf_key, chain=dev.chain, ueid=b"\x01" * 17, measurements={},
                        manifest_cid=SIGNED.cid)
    status, checks = run(ev, nonce, roots_for(dev))
    assert status == CONTRAINDICATED and "firmware measurement" in checks["measurements"][1]


def test_debug_mode() -> None:
    dev, nonce = device(modes=(DiceMode.NORMAL, DiceMode.DEBUG, DiceMode.NORMAL)), os.urandom(16)
    status, checks = run(evidence(dev, nonce), nonce, roots_for(dev))
    assert status == CONTRAINDICATED and "debug" in checks["debug-mode"][1]


def test_broken_chain() -> None:
    dev, nonce = device(), os.urandom(16)
    items = cbor2.loads(dev.chain)
    del items[2]  # drop the bootstrap's certificate: the image cert no longer chains
    ev = build_evidence(nonce=nonce, leaf_key=dev.leaf_key, chain=cbor2.dumps(items), ueid=b"\x01" * 17,
                        measurements={}, manifest_cid=SIGNED.cid)
    status, checks = run(ev, nonce, roots_for(dev))
    assert status == CONTRAINDICATED and "chain entry 2" in checks["dice-chain"][1]


def test_evidence_signed_by_other_key() -> None:
    dev, other, nonce = device(), device(uds=os.urandom(32)), os.urandom(16)
    ev = build_evidence(nonce=nonce, leaf_key=other.leaf_key, chain=dev.chain, ueid=b"\x01" * 17, measurements={},
                        manifest_cid=SIGNED.cid)
    status, checks = run(ev, nonce, roots_for(dev))
    assert status == CONTRAINDICATED and checks["signature"][0] == CONTRAINDICATED


def test_unmeasured_boot_is_not_affirming() -> None:
    dev, nonce = device(), os.urandom(16)
    status, checks = run(evidence(dev, nonce, boot_mode="unmeasured"), nonce, roots_for(dev))
    assert status == CONTRAINDICATED and "unmeasured" in checks["measured-boot"][1]
    status, _ = run(evidence(dev, nonce, boot_mode="unmeasured"), nonce, roots_for(dev), allow_unmeasured=True)
    assert status == WARNING


def test_other_manifest() -> None:
    dev, nonce = device(), os.urandom(16)
    res = appraise(evidence(dev, nonce), expected_nonce=nonce, roots=roots_for(dev), manifest=MANIFEST,
                   manifest_cid=CID.of(b"another manifest", RAW))
    assert res.status == CONTRAINDICATED


@pytest.mark.parametrize("n", [0, 7, 65])
def test_nonce_length_limits(n: int) -> None:
    dev = device()
    with pytest.raises(EvidenceFormatError, match="8 to 64"):
        evidence(dev, b"n" * n)


def test_round_trip_claims() -> None:
    dev, nonce = device(), os.urandom(64)
    ev = parse_evidence(evidence(dev, nonce))
    assert ev.nonce == nonce and ev.manifest_cid == SIGNED.cid and ev.role == "worker" and ev.chain == dev.chain


GOOD = evidence(device(), b"12345678")


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_parse_random_bytes(data: bytes) -> None:
    try:
        parse_evidence(data)
    except EvidenceFormatError:
        pass


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_appraise_mutated_evidence_never_crashes(data: st.DataObject) -> None:
    buf = bytearray(GOOD)
    i = data.draw(st.integers(0, len(buf) - 1))
    buf[i] ^= data.draw(st.integers(1, 255))
    res = appraise(bytes(buf), expected_nonce=b"12345678", roots=DeviceRoots(), manifest=MANIFEST)
    assert res.status != AFFIRMING  # unknown device at the very least
