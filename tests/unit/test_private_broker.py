"""The key broker's core (cidboot.trust.private.broker) with real in-process DICE evidence: keys go
only to registered devices that attest affirming as the policy allows, wrapped to the ephemeral
key the evidence binds; every refusal names its check and is logged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from cidboot.ipld.cid import CID, RAW
from cidboot.trust.appraisal import (
    AFFIRMING,
    CONTRAINDICATED,
    ROOT_CAUSE_ORDER,
    WARNING,
    AppraisalResult,
    DeviceRoots,
    root_cause_first,
    tpm_check_names,
)
from cidboot.trust.cose_key import key_id
from cidboot.trust.manifest import Manifest, sign_manifest
from cidboot.trust.measure import code_hash_of_blobs
from cidboot.trust.private import keys, stream
from cidboot.trust.private.broker import (
    Challenges,
    JsonLinesLog,
    KeyBroker,
    KeyRelease,
    KeyRequest,
    KeyRequestFormatError,
    ManifestNotTrusted,
    Policy,
    PolicyFormatError,
    UnwrapError,
    request_nonce,
)
from tests.support.private_devices import (
    MANIFEST,
    MARKER,
    OPS,
    OPS_LAYER,
    POLICY,
    ROOT,
    SECRET,
    SIGNED,
    SIGNER,
    Device,
    Log,
    broker_for,
)


def test_affirming_device_gets_keys_that_decrypt_the_layer() -> None:
    dev = Device()
    broker, log = broker_for(dev)
    ch = broker.challenge()
    req, eph = dev.ask(ch)
    d = broker.request(KeyRequest.from_json(json.loads(json.dumps(req.to_json()))))  # over the wire shape
    assert d.released, d.reason
    release = KeyRelease.from_json(json.loads(json.dumps(d.release.to_json())))  # type: ignore[union-attr]
    got = release.open(eph, ch)
    assert set(got) == {str(OPS_LAYER.cid)}  # only the encrypted layer has a key
    assert b"".join(keys.decrypt_layer(got[str(OPS_LAYER.cid)], [OPS.ciphertext], sha256=OPS.sha256,
                                       size=OPS.size)) == MARKER
    entry = log[-1]
    assert entry["decision"] == "release" and entry["status"] == "affirming"
    assert {c["check"] for c in entry["checks"]} >= {"nonce", "dice-chain", "device", "measurements", "manifest"}
    assert OPS.key.hex() not in json.dumps(list(log))  # the log never holds a key


@pytest.mark.parametrize("kw, check", [
    ({"debug": True}, "debug-mode"),
    ({"boot_mode": "unmeasured"}, "measured-boot"),
    ({"bootstrap": code_hash_of_blobs([b"tampered bootstrap"])}, "measurements"),
])
def test_contraindicated_gets_no_key_and_the_log_names_the_check(kw: dict[str, Any], check: str) -> None:
    dev = Device(**kw)
    broker, log = broker_for(dev)
    req, _ = dev.ask(broker.challenge())
    d = broker.request(req)
    assert not d.released and d.release is None
    assert d.check == check, d.reason
    assert log[-1]["decision"] == "refuse" and log[-1]["check"] == check and log[-1]["status"] == "contraindicated"


def test_unregistered_device_and_policy() -> None:
    stranger, worker, sensor = Device(), Device(), Device("sensor")
    broker, _ = broker_for(worker, sensor)
    d = broker.request(stranger.ask(broker.challenge())[0])
    assert not d.released and d.check == "device"
    d = broker.request(sensor.ask(broker.challenge())[0])  # affirming, but the policy is for workers
    assert not d.released and d.check == "policy" and d.appraisal is not None and d.appraisal.affirming
    by_id = {"version": 1, "manifests": {"private-hello": {"devices": [_did(sensor)]}}}
    broker2, _ = broker_for(sensor, policy=by_id)
    assert broker2.request(sensor.ask(broker2.challenge())[0]).released
    broker3, _ = broker_for(worker, policy={"version": 1, "manifests": {"other": {"roles": ["worker"]}}})
    d = broker3.request(worker.ask(broker3.challenge())[0])
    assert not d.released and d.check == "policy" and "no rule" in d.reason


@pytest.mark.parametrize("kw, check", [
    ({"boot_mode": "unmeasured"}, "measured-boot"),  # the lab's unmeasured boot: its root key is no registered one
    ({"debug": True}, "debug-mode"),
    ({"bootstrap": code_hash_of_blobs([b"tampered bootstrap"])}, "device"),  # who, before what code ran
])
def test_an_unregistered_device_is_refused_for_the_root_cause(kw: dict[str, Any], check: str) -> None:
    """Several checks fail; the decision names the most fundamental (appraisal.ROOT_CAUSE_ORDER), the
    reason lists it first, then the others (an unmeasured boot also fails `device`: its effect)."""
    dev, registered = Device(**kw), Device()
    broker, log = broker_for(registered)
    d = broker.request(dev.ask(broker.challenge())[0])
    assert not d.released and d.check == check and log[-1]["check"] == check
    named = d.reason.split(": ", 1)[1]
    assert named.startswith(f"{check}: ") and "device: unknown device" in named, d.reason
    assert d.appraisal is not None and len(d.appraisal.failing()) >= 2


def test_root_cause_order() -> None:
    res = AppraisalResult()
    for name, status in [("nonce", AFFIRMING), ("new-check", CONTRAINDICATED), ("manifest", CONTRAINDICATED),
                         ("device", CONTRAINDICATED), ("measurements", WARNING), ("measured-boot", CONTRAINDICATED),
                         ("other-new", WARNING)]:
        res.add(name, status, "")
    assert [c.name for c in res.failing()] == ["measured-boot", "device", "measurements", "manifest", "new-check",
                                                "other-new"]  # unlisted ones last, in appraisal order
    assert [c.name for c in root_cause_first([])] == []
    assert len(set(ROOT_CAUSE_ORDER)) == len(ROOT_CAUSE_ORDER)
    assert set(tpm_check_names().values()) <= set(ROOT_CAUSE_ORDER)  # every TPM check has its place


def _did(dev: Device) -> str:
    r = DeviceRoots()
    return r.add(dev.ident.root_public_key)


def test_replayed_evidence_gets_no_key() -> None:
    dev = Device()
    broker, log = broker_for(dev)
    ch = broker.challenge()
    req, _ = dev.ask(ch)
    assert broker.request(req).released
    again = broker.request(req)  # the same request again: its challenge is spent
    assert not again.released and again.check == "challenge" and "already used" in again.reason
    fresh = broker.challenge()  # old evidence under a new challenge: the nonce does not match
    d = broker.request(KeyRequest(fresh, req.ephemeral_public, req.evidence))
    assert not d.released and d.check == "nonce"
    assert [e["decision"] for e in log] == ["release", "refuse", "refuse"]


def test_swapped_ephemeral_key_gets_no_key() -> None:
    """Someone in the path replaces the device's ephemeral key with their own: the nonce breaks."""
    dev = Device()
    broker, _ = broker_for(dev)
    ch = broker.challenge()
    req, _ = dev.ask(ch)
    mine = X25519PrivateKey.generate().public_key().public_bytes_raw()
    d = broker.request(KeyRequest(ch, mine, req.evidence))
    assert not d.released and d.check == "nonce"


def test_a_release_for_another_device_is_useless() -> None:
    a, b = Device(), Device()
    broker, _ = broker_for(a, b)
    ca, cb = broker.challenge(), broker.challenge()
    (ra, eph_a), (_, eph_b) = a.ask(ca), b.ask(cb)
    release = broker.request(ra).release
    assert release is not None
    with pytest.raises(UnwrapError):
        release.open(eph_b, ca)  # b's ephemeral key
    with pytest.raises(UnwrapError):
        release.open(eph_a, cb)  # a's key, but another exchange
    tampered = KeyRelease(release.manifest_cid, release.broker_public, release.sealed[:-1] + b"\0")
    with pytest.raises(UnwrapError):
        tampered.open(eph_a, ca)
    moved = KeyRelease(CID.of(b"other manifest", RAW), release.broker_public, release.sealed)
    with pytest.raises(UnwrapError):
        moved.open(eph_a, ca)
    assert release.open(eph_a, ca)


def test_challenges_expire_and_are_ours() -> None:
    now = [1000.0]
    broker, _ = broker_for(dev := Device(), challenges=Challenges(clock=lambda: now[0]))
    ch = broker.challenge()
    now[0] += 61
    d = broker.request(dev.ask(ch)[0])
    assert not d.released and d.check == "challenge" and "expired" in d.reason
    forged = bytearray(broker.challenge())
    forged[0] ^= 1
    d = broker.request(dev.ask(bytes(forged))[0])
    assert not d.released and d.check == "challenge" and "not a challenge" in d.reason


def test_manifests_must_be_signed_and_have_a_secret() -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    forged = sign_manifest(MANIFEST, [other])
    broker, _ = broker_for()
    with pytest.raises(ManifestNotTrusted):
        broker.add_manifest(forged, ROOT)
    unknown = sign_manifest(Manifest("nameless", 1, MANIFEST.expires, (OPS_LAYER,), ROOT), [SIGNER])
    with pytest.raises(ManifestNotTrusted, match="no flow secret"):
        broker.add_manifest(unknown, ROOT)


def test_unknown_manifest_and_malformed_requests() -> None:
    dev = Device()
    roots = DeviceRoots()
    roots.add(dev.ident.root_public_key, "", "worker")
    empty = KeyBroker(roots, Policy.from_obj(POLICY), {"private-hello": SECRET}, log=Log())  # holds no manifest
    d = empty.request(dev.ask(empty.challenge())[0])
    assert not d.released and d.check == "manifest"
    broker, _ = broker_for(dev)
    ch = broker.challenge()
    d = broker.request(KeyRequest(ch, bytes(32), b"not evidence"))
    assert not d.released and d.check == "format"
    for bad in ({}, {"challenge": "00", "ephemeral": "00" * 32, "evidence": "00"},
                {"challenge": ch.hex(), "ephemeral": "zz", "evidence": "00"}):
        with pytest.raises(KeyRequestFormatError):
            KeyRequest.from_json(bad)


def test_low_order_ephemeral_key_is_refused() -> None:
    dev = Device()
    broker, _ = broker_for(dev)
    ch = broker.challenge()
    zero = bytes(32)  # the all-zero point: X25519 with it gives an all-zero shared secret
    req = KeyRequest(ch, zero, dev.attester.evidence(request_nonce(ch, zero)))
    d = broker.request(req)
    assert not d.released and d.check == "ephemeral-key"


@pytest.mark.parametrize("obj", [
    {"manifests": {}},
    {"version": 1, "manifests": {"x": {}}},
    {"version": 1, "manifests": {"x": {"roles": ["a"], "min_status": "contraindicated"}}},
    {"version": 1, "manifests": {"x": {"roles": "a"}}},
    {"version": 1, "manifests": {"x": {"roles": ["a"], "keys": []}}},
])
def test_policy_is_strict(obj: Any) -> None:
    with pytest.raises(PolicyFormatError):
        Policy.from_obj(obj)


def test_policy_file_and_json_log(tmp_path: Path) -> None:
    p = tmp_path / "keys.policy.json"
    p.write_text(json.dumps(POLICY))
    assert Policy.load(p).to_obj()["manifests"]["private-hello"]["roles"] == ["worker"]
    dev = Device(debug=True)
    roots = DeviceRoots()
    roots.add(dev.ident.root_public_key, "", "worker")
    log = JsonLinesLog(tmp_path / "keys.log")
    b = KeyBroker(roots, Policy.load(p), {"private-hello": SECRET}, log=log)
    b.add_manifest(SIGNED, ROOT)
    b.request(dev.ask(b.challenge())[0])
    entry = json.loads((tmp_path / "keys.log").read_text().splitlines()[-1])
    assert entry["decision"] == "refuse" and entry["check"] == "debug-mode"


def test_stream_sizes_in_the_manifest_are_the_real_ones() -> None:
    assert OPS_LAYER.size == stream.ciphertext_size(len(MARKER))


def test_tpm_rooted_device_through_the_same_broker() -> None:
    """TPM evidence takes the same entry point: the quote's qualifying data carries the request
    nonce, so it binds the ephemeral key too; a changed firmware baseline gets no key."""
    import dataclasses

    from tests.support.soft_tpm import SoftTpmDevice
    tdev = SoftTpmDevice(SIGNED.cid, MANIFEST, [key_id(SIGNER.public_key())], role="worker")
    roots = DeviceRoots()
    roots.add_tpm(tdev.device(), "tpm-dev", "worker")
    log = Log()
    broker = KeyBroker(roots, Policy.from_obj(POLICY), {"private-hello": SECRET}, log=log,
                       tpm_references=tdev.references())
    broker.add_manifest(SIGNED, ROOT)

    def ask() -> tuple[KeyRequest, X25519PrivateKey, bytes]:
        ch = broker.challenge()
        eph = X25519PrivateKey.generate()
        pub = eph.public_key().public_bytes_raw()
        return KeyRequest(ch, pub, tdev.evidence(request_nonce(ch, pub))), eph, ch

    req, eph, ch = ask()
    d = broker.request(req)
    assert d.released, d.reason
    assert any(c["check"] == "tpm.quote-signature" for c in log[-1]["checks"])
    assert d.release is not None and str(OPS_LAYER.cid) in d.release.open(eph, ch)
    did = next(iter(roots.tpm))
    roots.tpm[did] = dataclasses.replace(roots.tpm[did], firmware_pcrs={0: bytes(32)})
    req, _, _ = ask()
    d = broker.request(req)
    assert not d.released and d.check == "tpm.firmware"


_FUZZ_DEV = Device()
_FUZZ_BROKER, _ = broker_for(_FUZZ_DEV)


@given(pos=st.integers(0, 4000), xor=st.integers(1, 255), cut=st.integers(0, 50))
@settings(max_examples=50, deadline=None)
def test_fuzz_mutated_evidence_never_raises_and_never_releases_unappraised(pos: int, xor: int, cut: int) -> None:
    req, _ = _FUZZ_DEV.ask(_FUZZ_BROKER.challenge())
    ev = bytearray(req.evidence)
    ev[pos % len(ev)] ^= xor
    d = _FUZZ_BROKER.request(KeyRequest(req.challenge, req.ephemeral_public, bytes(ev[:len(ev) - cut])))
    assert not d.released or (d.appraisal is not None and d.appraisal.affirming)
