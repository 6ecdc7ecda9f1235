"""Standard formats: appraisal results as EAR (JWT) for DICE and TPM evidence, reference values as
CoRIM. Each output is decoded and its structure checked against the draft's names and tags; the
decoders refuse tampering and only raise their own errors (hypothesis)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from cidboot.ipld.cid import CID, RAW
from cidboot.trust import corim, ear
from cidboot.trust.appraisal import AFFIRMING, DeviceRoots, appraise
from cidboot.trust.cose_key import key_id
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from cidboot.trust.measure import code_hash_of_blobs, image_code_hash
from cidboot.trust.tpm.reference import bootstrap_events, uki_applications, uki_pcr11_events
from tests.support.soft_tpm import SoftTpmDevice, small_uki

SIGNER = ed25519.Ed25519PrivateKey.generate()
MANIFEST = Manifest("hello", 1, int(time.time()) + 3600,
                    (Layer(CID.of(b"kernel", RAW), 6, "kernel"), Layer(CID.of(b"agent", RAW), 5, "agent")),
                    RootOfTrust.from_public_keys([SIGNER.public_key()], 1),
                    {"firmware": code_hash_of_blobs([b"fw"])})
SIGNED = sign_manifest(MANIFEST, [SIGNER])
VERIFIER = ed25519.Ed25519PrivateKey.generate()


def _tpm_result(good: bool = True) -> tuple[object, bytes]:
    dev = SoftTpmDevice(SIGNED.cid, MANIFEST, [key_id(SIGNER.public_key())])
    roots = DeviceRoots()
    roots.add_tpm(dev.device(), "t", "worker")
    nonce = os.urandom(32)
    ev = dev.evidence(nonce if good else os.urandom(32), quote_nonce=nonce)
    return appraise(ev, expected_nonce=nonce, roots=roots, manifest=MANIFEST, manifest_cid=SIGNED.cid,
                    tpm_references=dev.references()), nonce


def _dice_result() -> tuple[object, bytes]:
    from tests.unit.test_eat import SIGNED as DSIGNED
    from tests.unit.test_eat import device, evidence
    d = device()
    roots = DeviceRoots()
    roots.add(d.root_public_key, "d", "worker")
    nonce = os.urandom(32)
    return appraise(evidence(d, nonce), expected_nonce=nonce, roots=roots, manifest=DSIGNED.manifest,
                    manifest_cid=DSIGNED.cid), nonce


@pytest.mark.parametrize("kind", ["tpm", "dice"])
def test_ear_of_an_affirming_appraisal(kind: str) -> None:
    res, nonce = _tpm_result() if kind == "tpm" else _dice_result()
    assert res.status == AFFIRMING  # type: ignore[attr-defined]
    token = ear.sign_ear(ear.ear_claims(res, nonce=nonce), VERIFIER)  # type: ignore[arg-type]
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["alg"] == "EdDSA" and header["typ"] == "JWT"
    claims = ear.verify_ear(token, VERIFIER.public_key())
    assert claims["eat_profile"] == "tag:ietf.org,2025-07:ear"
    assert claims["ear.verifier-id"]["developer"] == "cidboot"
    assert base64.urlsafe_b64decode(claims["eat_nonce"] + "=") == nonce
    sub = claims["submods"]["cidboot"]
    assert sub["ear.status"] == "affirming" and sub["cidboot.root"] == kind
    assert sub["ear.trustworthiness-vector"] == {"instance-identity": 2, "hardware": 2, "configuration": 2,
                                                 "executables": 3}
    assert [c["check"] for c in sub["cidboot.checks"]] == [c.name for c in res.checks]  # type: ignore[attr-defined]


def test_ear_of_a_refused_tpm_appraisal_is_contraindicated() -> None:
    res, nonce = _tpm_result(good=False)  # the EAT's nonce is another challenge's
    claims = ear.verify_ear(ear.sign_ear(ear.ear_claims(res), VERIFIER), VERIFIER.public_key())  # type: ignore[arg-type]
    sub = claims["submods"]["cidboot"]
    assert sub["ear.status"] == "contraindicated"
    assert sub["ear.trustworthiness-vector"]["instance-identity"] == 99


def test_ear_with_a_p256_verifier_key_and_refusals() -> None:
    res, _ = _dice_result()
    key = ec.generate_private_key(ec.SECP256R1())
    token = ear.sign_ear(ear.ear_claims(res), key)  # type: ignore[arg-type]
    assert ear.verify_ear(token, key.public_key())["submods"]["cidboot"]["ear.status"] == "affirming"
    with pytest.raises(ear.EarFormatError):  # another key type: the header's alg is not its
        ear.verify_ear(token, VERIFIER.public_key())
    with pytest.raises(ear.EarSignatureError):
        ear.verify_ear(token, ec.generate_private_key(ec.SECP256R1()).public_key())
    h, p, s = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=="))
    claims["submods"]["cidboot"]["ear.status"] = "affirming"
    claims["submods"]["cidboot"]["ear.trustworthiness-vector"]["executables"] = 96
    forged = h + "." + base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode() + "." + s
    with pytest.raises(ear.EarSignatureError):
        ear.verify_ear(forged, key.public_key())
    bad = dict(claims, eat_profile="tag:github.com,2023:veraison/ear")
    with pytest.raises(ear.EarFormatError, match="eat_profile"):
        ear.check_ear(bad)


def test_trust_vector_tiers_for_warnings() -> None:
    from cidboot.trust.appraisal import AppraisalResult
    res = AppraisalResult()
    for name in ("format", "nonce", "dice-chain", "device", "role", "signature", "debug-mode", "measured-boot"):
        res.add(name, AFFIRMING, "")
    res.add("measurements", "warning", "unpinned")
    assert ear.trust_vector(res)["executables"] == 33
    res.add("debug-mode", "contraindicated", "debug")
    assert ear.trust_vector(res)["configuration"] == 96


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_ear_decode(token: str) -> None:
    try:
        ear.verify_ear(token, VERIFIER.public_key())
    except (ear.EarFormatError, ear.EarSignatureError):
        pass


_TOKEN = ear.sign_ear(ear.ear_claims(_dice_result()[0]), VERIFIER)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_TOKEN) - 1), st.characters(codec="ascii"))
def test_fuzz_ear_mutated(pos: int, ch: str) -> None:
    token = _TOKEN[:pos] + ch + _TOKEN[pos + 1:]
    try:
        ear.verify_ear(token, VERIFIER.public_key())
        assert token == _TOKEN or ch == _TOKEN[pos] or pos == len(_TOKEN) - 1  # a last-char base64 slack
    except (ear.EarFormatError, ear.EarSignatureError):
        pass


# -- CoRIM -------------------------------------------------------------------------------------------
def _uki() -> bytes:
    return small_uki()


def test_corim_structure_and_values() -> None:
    uki = _uki()
    data = corim.export(SIGNED.cid, MANIFEST, uki)
    top = cbor2.loads(data)
    assert isinstance(top, cbor2.CBORTag) and top.tag == 501
    assert set(top.value) == {0, 1, 4} and top.value[0] == f"cidboot:{SIGNED.cid}"
    assert top.value[4][1].timestamp() == MANIFEST.expires
    (comid_tag,) = top.value[1]
    assert comid_tag.tag == 506 and isinstance(comid_tag.value, bytes)
    comid = cbor2.loads(comid_tag.value)
    assert set(comid) == {1, 4} and comid[1] == {0: top.value[0]} and set(comid[4]) == {0}
    for env, ms in comid[4][0]:
        assert env[0][1] == "cidboot" and isinstance(env[0][2], str) and isinstance(env[0][3], int)
        assert all(set(m) == {0, 1} and set(m[1]) in ({2}, {14}) for m in ms)
    back = corim.parse_corim(data)
    assert back.measurement("hello image", "image").digests == ((8, image_code_hash(MANIFEST)),)
    boot = bootstrap_events(SIGNED.cid, MANIFEST)
    for e in boot:
        assert back.measurement("hello bootstrap events", e.what).digests == ((1, e.digest),)
    pcr15 = bytes(32)
    for e in boot:
        pcr15 = hashlib.sha256(pcr15 + e.digest).digest()
    assert back.measurement("hello bootstrap events", "pcr15").registers == ((15, ((1, pcr15),)),)
    apps = uki_applications(uki)
    assert back.measurement("bootstrap UKI", "uki").digests == ((1, apps[0]),)
    assert back.measurement("bootstrap UKI", "kernel").digests == ((1, apps[1]),)
    stub = uki_pcr11_events(uki)
    assert len([m for env in back.environments if env.model == "bootstrap UKI" for m in env.measurements]) == 3 + len(stub)
    assert back.measurement("firmware", "firmware").digests == ((8, MANIFEST.measurements["firmware"]),)
    assert corim.parse_corim(corim.export(SIGNED.cid, MANIFEST)).environments[-1].model == "firmware"


@pytest.mark.parametrize("edit", [
    lambda t: cbor2.CBORTag(500, t.value),
    lambda t: cbor2.CBORTag(501, {**t.value, 1: []}),
    lambda t: cbor2.CBORTag(501, {**t.value, 9: 1}),
    lambda t: cbor2.CBORTag(501, {**t.value, 1: [cbor2.CBORTag(505, t.value[1][0].value)]}),
    lambda t: cbor2.CBORTag(501, {**t.value, 1: [cbor2.CBORTag(506, b"\xa0")]}),
    lambda t: cbor2.CBORTag(501, {**t.value, 0: 7}),
])
def test_corim_refusals(edit: object) -> None:
    top = cbor2.loads(corim.export(SIGNED.cid, MANIFEST))
    with pytest.raises(corim.CorimFormatError):
        corim.parse_corim(cbor2.dumps(edit(top)))  # type: ignore[operator]


_CORIM = corim.export(SIGNED.cid, MANIFEST, _uki())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_corim_random(data: bytes) -> None:
    try:
        corim.parse_corim(data)
    except corim.CorimFormatError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(_CORIM) - 1), st.integers(1, 255), st.integers(0, len(_CORIM)))
def test_fuzz_corim_mutated(pos: int, xor: int, cut: int) -> None:
    data = bytearray(_CORIM)
    data[pos] ^= xor
    for candidate in (bytes(data), _CORIM[:cut]):
        try:
            corim.parse_corim(candidate)
        except corim.CorimFormatError:
            pass
