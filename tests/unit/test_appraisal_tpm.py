"""The one appraisal entry point on TPM-rooted evidence (software TPM; real swtpm quotes are in
tests/integration/test_tpm_evidence_integration.py): affirming with the same checks list as DICE
evidence, and each refusal named by its check."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from cidboot.ipld.cid import CID, RAW
from cidboot.trust.appraisal import AFFIRMING, CONTRAINDICATED, WARNING, DeviceRoots, TpmDevice, appraise
from cidboot.trust.cose_key import key_id
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from cidboot.trust.tpm.evidence import BootstrapEvent
from tests.support.soft_tpm import SoftTpmDevice

SIGNER = ed25519.Ed25519PrivateKey.generate()
MANIFEST = Manifest("hello", 1, int(time.time()) + 3600,
                    (Layer(CID.of(b"kernel", RAW), 6, "kernel"), Layer(CID.of(b"agent", RAW), 5, "agent")),
                    RootOfTrust.from_public_keys([SIGNER.public_key()], 1))
SIGNED = sign_manifest(MANIFEST, [SIGNER])
SIGNERS = [key_id(SIGNER.public_key())]

TPM_CHECKS = ["tpm.ak-enrolled", "tpm.quote-signature", "tpm.nonce-binding", "tpm.replay", "tpm.firmware",
              "tpm.pcr4-uki", "tpm.pcr15-manifest"]


@pytest.fixture(scope="module")
def dev() -> SoftTpmDevice:
    return SoftTpmDevice(SIGNED.cid, MANIFEST, SIGNERS, role="worker")


def roots_for(*devs: SoftTpmDevice, baseline: bool = True) -> DeviceRoots:
    roots = DeviceRoots()
    for d in devs:
        t = d.device()
        roots.add_tpm(t if baseline else dataclasses.replace(t, firmware_pcrs={}), "tpm-dev", "worker")
    return roots


def run(dev: SoftTpmDevice, evidence: bytes, nonce: bytes, roots: DeviceRoots | None = None, *,
        uki: bool = True, manifest: bool = True) -> dict[str, tuple[str, str]]:
    res = appraise(evidence, expected_nonce=nonce, roots=roots or roots_for(dev),
                   manifest=MANIFEST if manifest else None, manifest_cid=SIGNED.cid if manifest else None,
                   tpm_references=dev.references() if uki else None)
    out = {c.name: (c.status, c.reason) for c in res.checks}
    out["status"] = (res.status, "")
    return out


def test_clean_tpm_boot_is_affirming_with_the_whole_checks_list(dev: SoftTpmDevice) -> None:
    nonce = os.urandom(32)
    roots = roots_for(dev)
    res = appraise(dev.evidence(nonce), expected_nonce=nonce, roots=roots, manifest=MANIFEST, manifest_cid=SIGNED.cid,
                   tpm_references=dev.references())
    assert res.status == AFFIRMING, [c.to_obj() for c in res.checks if c.status != AFFIRMING]
    names = [c.name for c in res.checks]
    assert names == ["format", "nonce", "dice-chain", "device", "role", *TPM_CHECKS, "signature", "debug-mode",
                     "measured-boot", "measurements", "manifest"]
    assert res.device_id in roots.tpm and res.role == "worker"
    assert res.leaf_public_key is not None and res.measurements.keys() == {"image"}


def test_dice_evidence_still_takes_the_dice_path() -> None:
    from tests.unit.test_eat import SIGNED as DSIGNED
    from tests.unit.test_eat import device, evidence
    d = device()
    roots = DeviceRoots()
    roots.add(d.root_public_key, "d", "worker")
    nonce = os.urandom(32)
    res = appraise(evidence(d, nonce), expected_nonce=nonce, roots=roots, manifest=DSIGNED.manifest,
                   manifest_cid=DSIGNED.cid)
    assert res.status == AFFIRMING and not any(c.name.startswith("tpm.") for c in res.checks)


def test_replayed_quote_is_refused(dev: SoftTpmDevice) -> None:
    """A quote for an old challenge, even inside an EAT freshly signed for the new one."""
    old, new = os.urandom(32), os.urandom(32)
    out = run(dev, dev.evidence(new, quote_nonce=old), new)
    assert out["tpm.nonce-binding"][0] == CONTRAINDICATED and "replayed" in out["tpm.nonce-binding"][1]
    assert out["nonce"][0] == AFFIRMING and out["status"][0] == CONTRAINDICATED
    whole = run(dev, dev.evidence(old), new)  # the whole old evidence
    assert whole["nonce"][0] == CONTRAINDICATED and whole["tpm.nonce-binding"][0] == CONTRAINDICATED


def test_quote_bound_to_another_l1_key_is_refused(dev: SoftTpmDevice) -> None:
    """The chain of one boot on the quote of another: the binding names L1's key."""
    other = SoftTpmDevice(SIGNED.cid, MANIFEST, SIGNERS)
    other.tpm = dev.tpm
    nonce = os.urandom(32)
    ev = other.evidence(nonce)  # dev's TPM, but quoting other's L1 key... consistent: affirming
    assert run(dev, ev, nonce)["status"][0] == AFFIRMING
    from cidboot.trust.eat import TPM_MEASURED, build_evidence
    from cidboot.trust.tpm.evidence import ueid
    swapped = build_evidence(nonce=nonce, leaf_key=other.dice.leaf_key, chain=other.dice.chain, ueid=ueid(dev.tpm.name),
                             measurements={}, manifest_cid=SIGNED.cid, boot_mode=TPM_MEASURED, role="worker",
                             tpm=dev.tpm_evidence(nonce))  # dev's quote binds dev's L1, the chain is other's
    out = run(dev, swapped, nonce)
    assert out["tpm.nonce-binding"][0] == CONTRAINDICATED


def test_ak_not_enrolled_is_refused(dev: SoftTpmDevice) -> None:
    stranger = SoftTpmDevice(SIGNED.cid, MANIFEST, SIGNERS)
    nonce = os.urandom(32)
    out = run(stranger, stranger.evidence(nonce), nonce, roots_for(dev))
    assert out["device"][0] == CONTRAINDICATED and out["tpm.ak-enrolled"][0] == CONTRAINDICATED
    assert out["role"][0] == CONTRAINDICATED and "tpm.quote-signature" not in out


def test_event_log_that_does_not_replay_is_refused(dev: SoftTpmDevice) -> None:
    from cidboot.trust.tpm import eventlog
    nonce = os.urandom(32)
    cut = eventlog.build(dev.tpm.events[:-1])  # the kernel's application event dropped
    out = run(dev, dev.evidence(nonce, log=cut), nonce)
    assert out["tpm.replay"][0] == CONTRAINDICATED and "pcr4" not in " ".join(out)


@pytest.mark.parametrize("field", ["digest", "cid"])
def test_one_flipped_byte_in_a_layer_event_is_refused(dev: SoftTpmDevice, field: str) -> None:
    nonce = os.urandom(32)
    evs = list(dev.boot_events)
    raw = bytearray(getattr(evs[2], field))
    raw[-1] ^= 0x01
    evs[2] = dataclasses.replace(evs[2], **{field: bytes(raw)})  # type: ignore[arg-type]
    out = run(dev, dev.evidence(nonce, events=evs), nonce)
    failed = "tpm.replay" if field == "digest" else "tpm.pcr15-manifest"
    assert out[failed][0] == CONTRAINDICATED, out
    if field == "cid":
        assert "layer 1" in out[failed][1]


def test_another_manifest_is_refused_at_pcr15(dev: SoftTpmDevice) -> None:
    other = Manifest("hello", 2, MANIFEST.expires, MANIFEST.layers[:1], MANIFEST.root)
    osigned = sign_manifest(other, [SIGNER])
    nonce = os.urandom(32)
    res = appraise(dev.evidence(nonce), expected_nonce=nonce, roots=roots_for(dev), manifest=other,
                   manifest_cid=osigned.cid, tpm_references=dev.references())
    by = {c.name: c for c in res.checks}
    assert by["tpm.pcr15-manifest"].status == CONTRAINDICATED and by["manifest"].status == CONTRAINDICATED


def test_no_baseline_no_uki_no_manifest_are_never_affirming(dev: SoftTpmDevice) -> None:
    nonce = os.urandom(32)
    ev = dev.evidence(nonce)
    assert run(dev, ev, nonce, roots_for(dev, baseline=False))["tpm.firmware"][0] == WARNING
    assert run(dev, ev, nonce, roots_for(dev, baseline=False))["status"][0] == WARNING
    assert run(dev, ev, nonce, uki=False)["tpm.pcr4-uki"][0] == WARNING
    no_manifest = run(dev, ev, nonce, manifest=False)
    assert no_manifest["tpm.pcr15-manifest"][0] == WARNING and no_manifest["status"][0] == WARNING


def test_changed_firmware_or_uki_is_contraindicated(dev: SoftTpmDevice) -> None:
    nonce = os.urandom(32)
    roots = roots_for(dev)
    did = next(iter(roots.tpm))
    roots.tpm[did] = TpmDevice(dev.tpm.public, {0: bytes(32)})
    assert run(dev, dev.evidence(nonce), nonce, roots)["tpm.firmware"][0] == CONTRAINDICATED
    from cidboot.trust.tpm.appraise import TpmReferences
    res = appraise(dev.evidence(nonce), expected_nonce=nonce, roots=roots_for(dev), manifest=MANIFEST,
                   manifest_cid=SIGNED.cid, tpm_references=TpmReferences([os.urandom(32), dev.apps[1]]))
    pcr4 = next(c for c in res.checks if c.name == "tpm.pcr4-uki")
    assert pcr4.status == CONTRAINDICATED and "application 0" in pcr4.reason


def test_role_comes_from_the_registry(dev: SoftTpmDevice) -> None:
    nonce = os.urandom(32)
    roots = roots_for(dev)
    roots.roles[next(iter(roots.tpm))] = "aggregator"
    out = run(dev, dev.evidence(nonce), nonce, roots)
    assert out["role"][0] == CONTRAINDICATED


def test_evidence_pcr_list_must_be_the_quotes_selection(dev: SoftTpmDevice) -> None:
    from cidboot.trust.eat import TPM_MEASURED, build_evidence
    from cidboot.trust.tpm.evidence import ueid
    nonce = os.urandom(32)
    tev = dataclasses.replace(dev.tpm_evidence(nonce), pcrs=(0, 4, 7))
    ev = build_evidence(nonce=nonce, leaf_key=dev.dice.leaf_key, chain=dev.dice.chain, ueid=ueid(dev.tpm.name),
                        measurements={}, manifest_cid=SIGNED.cid, boot_mode=TPM_MEASURED, role="worker", tpm=tev)
    assert run(dev, ev, nonce)["tpm.replay"][0] == CONTRAINDICATED


def test_extra_bootstrap_event_is_refused(dev: SoftTpmDevice) -> None:
    """An event the manifest does not explain (the quote covers it: the device extended it)."""
    extra = BootstrapEvent.measure("layer", CID.of(b"extra", RAW), 2)
    d = SoftTpmDevice(SIGNED.cid, MANIFEST, SIGNERS)
    d.boot_events = [*d.boot_events, extra]
    nonce = os.urandom(32)
    out = run(d, d.evidence(nonce), nonce)
    assert out["tpm.replay"][0] == AFFIRMING and out["tpm.pcr15-manifest"][0] == CONTRAINDICATED
    assert "unexpected extra event" in out["tpm.pcr15-manifest"][1]


_DEV = SoftTpmDevice(SIGNED.cid, MANIFEST, SIGNERS)
_NONCE = b"\x07" * 32
_EAT = _DEV.evidence(_NONCE)
_ROOTS = roots_for(_DEV)
_REFS = _DEV.references()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_EAT) - 1), st.integers(1, 255), st.integers(0, len(_EAT) - 1))
def test_fuzz_mutated_tpm_evidence_is_never_affirming_and_never_raises(pos: int, xor: int, cut: int) -> None:
    """Whatever the bytes, appraisal answers with a result (a verifier keeps serving), and a
    change anywhere in the signed EAT is never affirming."""
    data = bytearray(_EAT)
    data[pos] ^= xor
    for candidate in (bytes(data), _EAT[:cut]):
        res = appraise(candidate, expected_nonce=_NONCE, roots=_ROOTS, manifest=MANIFEST, manifest_cid=SIGNED.cid,
                       tpm_references=_REFS)
        assert res.status != AFFIRMING


def test_own_boot_references_accept_a_peer_of_the_same_uki_only() -> None:
    """A device without the UKI appraises peers against what it booted itself."""
    from cidboot.trust.tpm.appraise import own_boot_references
    from tests.support.soft_tpm import small_uki

    me = SoftTpmDevice(SIGNED.cid, MANIFEST, SIGNERS, uki=small_uki())
    peer = SoftTpmDevice(SIGNED.cid, MANIFEST, SIGNERS, uki=small_uki())
    other = SoftTpmDevice(SIGNED.cid, MANIFEST, SIGNERS, uki=small_uki(b"console=ttyS1"))
    refs = own_boot_references(me.tpm.log())
    assert list(refs.applications) == list(me.references().applications)
    nonce = os.urandom(32)
    roots = roots_for(peer, other)
    good = appraise(peer.evidence(nonce), expected_nonce=nonce, roots=roots, manifest=MANIFEST,
                    manifest_cid=SIGNED.cid, tpm_references=refs)
    assert good.status == AFFIRMING, [c.to_obj() for c in good.checks if c.status != AFFIRMING]
    bad = appraise(other.evidence(nonce), expected_nonce=nonce, roots=roots, manifest=MANIFEST,
                   manifest_cid=SIGNED.cid, tpm_references=refs)
    assert {c.name: c.status for c in bad.checks}["tpm.pcr4-uki"] == CONTRAINDICATED


def test_references_per_arch_are_chosen_by_the_uki_the_log_shows(dev: SoftTpmDevice) -> None:
    """A registry's references, one set per arch: the set whose UKI digest is the log's first PCR 4
    application; else (another UKI, no application, a log that does not parse) the first by arch
    name, so that PCR 4 (or the replay) names what differs; one set is taken as it is."""
    from cidboot.trust.tpm.appraise import TpmReferences, references_for_log

    mine: TpmReferences = dev.references()
    other = TpmReferences([os.urandom(32), os.urandom(32)])
    log = dev.tpm.log()
    assert references_for_log({"arm64": other, "x86_64": mine}, log) is mine
    assert references_for_log({"arm64": mine, "x86_64": other}, log) is mine
    third = TpmReferences([os.urandom(32)])
    assert references_for_log({"x86_64": other, "arm64": third}, log) is third  # "arm64" sorts first
    assert references_for_log({"x86_64": other, "arm64": third}, b"garbage") is third
    assert references_for_log({}, log) is None
    assert references_for_log(other, log) is other
    nonce = os.urandom(32)
    cases: list[tuple[dict[str, TpmReferences], str]] = [
        ({"arm64": other, "x86_64": mine}, AFFIRMING), ({"arm64": other}, CONTRAINDICATED), ({}, WARNING)]
    for refs, status in cases:
        res = appraise(dev.evidence(nonce), expected_nonce=nonce, roots=roots_for(dev), manifest=MANIFEST,
                       manifest_cid=SIGNED.cid, tpm_references=refs)
        assert res.status == status, (refs, res.to_obj())
