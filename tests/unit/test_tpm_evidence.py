"""The TPM evidence format (cidboot.trust.tpm.evidence): round trip, the one strict encoding, the
qualifying-data rule, how it rides in the EAT, and TPM devices in the device roots / signed
registry. Hypothesis: decoding arbitrary or mutated bytes raises only TpmEvidenceFormatError."""

from __future__ import annotations

import hashlib
import os

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from cidboot.errors import FormatError
from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.trust.appraisal import DeviceRoots, TpmDevice
from cidboot.trust.cose_key import encode_public_key_bytes
from cidboot.trust.eat import TPM_EVIDENCE, TPM_MEASURED, EvidenceFormatError, build_evidence, parse_evidence
from cidboot.trust.manifest import RootOfTrust
from cidboot.trust.registry import RegistryFormatError, sign_registry, verify_signed_registry
from cidboot.trust.tpm import eventlog
from cidboot.trust.tpm.evidence import (
    BootstrapEvent,
    TpmEvidence,
    TpmEvidenceFormatError,
    device_id,
    measure_manifest,
    qualifying_data,
)
from cidboot.trust.tpm.reference import BOOTSTRAP_PCR, bootstrap_event_data
from tests.support.soft_tpm import SoftTpm

MCID = CID.of(b"manifest", DAG_CBOR)
LAYERS = [CID.of(b"layer0", RAW), CID.of(b"layer1", RAW)]


def sample(**kw: object) -> TpmEvidence:
    args: dict[str, object] = dict(quote=b"\xff\x54\x43\x47" + bytes(60), signature=b"\x00\x14" + bytes(40),
                                   ak_public=b"\x00\x10" + bytes(16), uefi_log=eventlog.build([(0, 8, bytes(32), b"x")]),
                                   bootstrap_events=tuple(measure_manifest(MCID, LAYERS)), pcrs=(0, 4, 11, 15))
    args.update(kw)
    return TpmEvidence(**args)  # type: ignore[arg-type]


def test_round_trip_and_one_encoding() -> None:
    ev = sample()
    data = ev.encode()
    assert TpmEvidence.decode(data) == ev
    assert TpmEvidence.from_obj(cbor2.loads(data)) == ev
    # the same values in another map order are not the canonical bytes
    obj = ev.to_obj()
    reordered = cbor2.dumps(dict(reversed(list(obj.items()))))
    assert reordered != data
    with pytest.raises(TpmEvidenceFormatError, match="canonical"):
        TpmEvidence.decode(reordered)


def test_bootstrap_events_are_the_reference_events() -> None:
    """The device's events (measure_manifest) are exactly the ones the verifier derives from the
    manifest (reference.bootstrap_event_data): same data lines, digest = SHA-256(data)."""
    ev = sample()
    log = ev.log_events(first_index=38)
    want = bootstrap_event_data(MCID, LAYERS)
    assert [e.data for e in log] == want
    assert [e.sha256 for e in log] == [hashlib.sha256(d).digest() for d in want]
    assert [e.index for e in log] == [38, 39, 40] and all(e.pcr == BOOTSTRAP_PCR for e in log)
    assert [e.kind for e in ev.bootstrap_events] == ["manifest", "layer", "layer"]
    assert ev.bootstrap_events[1].cid == bytes(LAYERS[0])


def test_qualifying_data_is_sha256_of_nonce_and_l1_cose_key() -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    nonce = os.urandom(32)
    assert qualifying_data(nonce, key) == hashlib.sha256(nonce + encode_public_key_bytes(key)).digest()
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    assert qualifying_data(nonce, other) != qualifying_data(nonce, key)
    assert qualifying_data(os.urandom(32), key) != qualifying_data(nonce, key)
    with pytest.raises(TpmEvidenceFormatError):
        qualifying_data(b"", key)


@pytest.mark.parametrize("change, match", [
    (dict(quote=b""), "quote"),
    (dict(quote=bytes(1025)), "quote"),
    (dict(signature=bytearray(b"ab")), "signature"),
    (dict(ak_public=bytes(2000)), "ak-public"),
    (dict(uefi_log=bytes(768 * 1024 + 1)), "uefi-log"),
    (dict(pcrs=()), "at least one"),
    (dict(pcrs=(4, 0)), "ascending"),
    (dict(pcrs=(0, 0)), "ascending"),
    (dict(pcrs=(24,)), "PCR index"),
    (dict(pcrs=(True,)), "PCR index"),
    (dict(bootstrap_events=(BootstrapEvent(15, "kernel", bytes(MCID), bytes(32)),)), "type"),
    (dict(bootstrap_events=(BootstrapEvent(15, "layer", b"\x01\x55", bytes(32)),)), "cid"),
    (dict(bootstrap_events=(BootstrapEvent(15, "layer", bytes(MCID), bytes(31)),)), "digest"),
    (dict(bootstrap_events=(BootstrapEvent(-1, "layer", bytes(MCID), bytes(32)),)), "pcr"),
])
def test_malformed_fields_are_refused(change: dict[str, object], match: str) -> None:
    with pytest.raises(TpmEvidenceFormatError, match=match):
        sample(**change)


@pytest.mark.parametrize("edit", [
    lambda o: o.pop(6),
    lambda o: o.update({7: b""}),
    lambda o: o.update({5: {}}),
    lambda o: o.update({6: 15}),
    lambda o: o[5][0].pop(4),
    lambda o: o[5][0].update({"1": 15}),
    lambda o: o.update({1: "text"}),
])
def test_malformed_maps_are_refused(edit: object) -> None:
    obj = sample().to_obj()
    edit(obj)  # type: ignore[operator]
    with pytest.raises(TpmEvidenceFormatError):
        TpmEvidence.decode(cbor2.dumps(obj, canonical=True))


def test_non_shortest_and_tagged_encodings_are_refused() -> None:
    data = sample().encode()
    with pytest.raises(TpmEvidenceFormatError):
        TpmEvidence.decode(data + b"\x00")
    with pytest.raises(TpmEvidenceFormatError):
        TpmEvidence.decode(cbor2.dumps(cbor2.CBORTag(24, data)))
    obj = sample().to_obj()
    obj[6] = [cbor2.CBORTag(2, b"\x04")]  # a bignum 4: an int to cbor2, not to us
    with pytest.raises(TpmEvidenceFormatError):
        TpmEvidence.decode(cbor2.dumps(obj, canonical=True))


def test_rides_in_the_eat_beside_the_chain() -> None:
    l1 = ed25519.Ed25519PrivateKey.generate()
    chain = cbor2.dumps([cbor2.loads(encode_public_key_bytes(l1.public_key()))])
    nonce = os.urandom(32)
    ev = sample()
    eat = build_evidence(nonce=nonce, leaf_key=l1, chain=chain, ueid=b"\x01" + bytes(16), measurements={},
                         manifest_cid=MCID, boot_mode=TPM_MEASURED, tpm=ev)
    parsed = parse_evidence(eat)
    assert parsed.tpm == ev and parsed.boot_mode == TPM_MEASURED and parsed.chain == chain
    with pytest.raises(EvidenceFormatError):
        build_evidence(nonce=nonce, leaf_key=l1, chain=chain, ueid=b"\x01", measurements={}, manifest_cid=None, tpm=ev)
    with pytest.raises(EvidenceFormatError):
        build_evidence(nonce=nonce, leaf_key=l1, chain=chain, ueid=b"\x01", measurements={}, manifest_cid=None,
                       boot_mode=TPM_MEASURED)
    # a DICE EAT that carries a TPM claim anyway, or a garbled TPM claim, is malformed
    from cidboot.trust import cose
    payload = cose.decode_sign1(eat).payload
    assert payload is not None
    claims = cbor2.loads(payload)
    for bad in ({**claims, -75003: "measured"}, {**claims, TPM_EVIDENCE: {1: b""}}):
        with pytest.raises(EvidenceFormatError):
            parse_evidence(cose.sign1(cbor2.dumps(bad), l1))


def test_tpm_devices_in_roots_file_and_signed_registry(tmp_path: object) -> None:
    from pathlib import Path
    tpm = SoftTpm("ecdsa")
    roots = DeviceRoots()
    dice_key = ed25519.Ed25519PrivateKey.generate().public_key()
    roots.add(dice_key, "dice-dev", "worker")
    dev = TpmDevice(tpm.public, {0: b"\x01" * 32, 7: b"\x07" * 32}, ek_cert=b"0\x82der")
    did = roots.add_tpm(dev, "tpm-dev", "worker")
    assert did == device_id(tpm.name) and did in roots and "0" * 40 not in roots
    path = Path(str(tmp_path)) / "roots.json"
    roots.save(path)
    back = DeviceRoots.load(path)
    assert back.tpm == roots.tpm and back.roles[did] == "worker" and set(back.keys) == set(roots.keys)
    signer = ed25519.Ed25519PrivateKey.generate()
    block = sign_registry(roots, [signer], manifests={"worker": "hello"})
    reg = verify_signed_registry(block, RootOfTrust.from_public_keys([signer.public_key()], 1))
    assert reg.roots.tpm == roots.tpm and reg.manifest_for("worker", did) == "hello"
    # a registry entry whose id is not its AK's device id is refused
    bad = cbor2.loads(block)
    bad["registry"]["devices"] = [d if "key" in d else {**d, "id": "00" * 20} for d in bad["registry"]["devices"]]
    from cidboot.ipld import dagcbor
    with pytest.raises(RegistryFormatError, match="device id"):
        verify_signed_registry(dagcbor.encode(bad), RootOfTrust.from_public_keys([signer.public_key()], 1))


def test_enrolment_refuses_a_non_ak_or_bad_baseline() -> None:
    with pytest.raises(FormatError):
        TpmDevice(b"\x00\x02ab")
    with pytest.raises(FormatError):
        TpmDevice(SoftTpm("ecdsa").public, {0: b"short"})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_decode_random_bytes(data: bytes) -> None:
    try:
        TpmEvidence.decode(data)
    except TpmEvidenceFormatError:
        pass


_GOOD = sample().encode()


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(_GOOD) - 1), st.integers(1, 255), st.integers(0, len(_GOOD)))
def test_fuzz_decode_mutated(pos: int, xor: int, cut: int) -> None:
    data = bytearray(_GOOD)
    data[pos] ^= xor
    for candidate in (bytes(data), _GOOD[:cut]):
        try:
            TpmEvidence.decode(candidate)
        except TpmEvidenceFormatError:
            pass
