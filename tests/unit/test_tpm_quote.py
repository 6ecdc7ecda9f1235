"""Quotes: real swtpm vectors (tests/vectors/tpm) verify; a software "TPM" (cryptography keys,
TPMS_ATTEST built by hand) covers RSA-PSS and every refusal; the appraisal names the failing
check; hypothesis fuzzes the TPMS_ATTEST, TPMT_SIGNATURE and TPM2B_PUBLIC parsers (only
documented errors escape)."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from cidboot.ipld.cid import CID, RAW
from cidboot.trust.tpm import eventlog, quote
from cidboot.trust.tpm.appraise import TpmEnrolment, TpmReferences, appraise_tpm
from cidboot.trust.tpm.errors import (
    AkNotEnrolledError,
    AttestFormatError,
    NonceMismatchError,
    PcrDigestMismatchError,
    PcrSelectionError,
    PublicKeyFormatError,
    QuoteSignatureError,
    ReferenceMismatchError,
    SignatureFormatError,
    TpmFormatError,
)
from cidboot.trust.tpm.eventlog import EV_EFI_BOOT_SERVICES_APPLICATION
from cidboot.trust.tpm.reference import BOOTSTRAP_PCR, ExpectedEvent, bootstrap_event_data
from tests.support.soft_tpm import SoftTpm, _tpm2b, attest_bytes, public_area, sign

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "tpm"
NONCE = b"\x22" * 32


def _pcrs_of_vectors() -> dict[int, bytes]:
    pcrs = {i: bytes(32) for i in range(24)}
    pcrs[16] = hashlib.sha256(bytes(32) + b"\x11" * 32).digest()
    return pcrs


@pytest.mark.parametrize("kind", ["rsassa", "ecdsa"])
def test_swtpm_quote_vectors_verify(kind: str) -> None:
    ak = quote.parse_public((VECTORS / f"{kind}-ak.pub").read_bytes())
    attest, sig = (VECTORS / f"{kind}-quote.attest").read_bytes(), (VECTORS / f"{kind}-quote.sig").read_bytes()
    q = quote.verify_quote(attest, sig, ak, nonce=NONCE, enrolled={ak.name})
    assert q.selection == ((eventlog.ALG_SHA256, (0, 4, 16)),) and q.extra_data == NONCE
    quote.check_pcrs(q, _pcrs_of_vectors(), [0, 4, 16])
    with pytest.raises(PcrDigestMismatchError):
        quote.check_pcrs(q, {**_pcrs_of_vectors(), 16: bytes(32)}, [16])
    with pytest.raises(PcrSelectionError):
        quote.check_pcrs(q, _pcrs_of_vectors(), [0, 4, 7])


@pytest.mark.parametrize("kind", ["rsapss", "rsassa", "ecdsa"])
def test_soft_tpm_quote_verifies_for_each_scheme(kind: str) -> None:
    tpm = SoftTpm(kind)
    nonce = os.urandom(32)
    a, s = tpm.quote(nonce, [0, 4])
    ak = quote.parse_public(tpm.public)
    assert quote.verify_quote(a, s, ak, nonce=nonce, enrolled={tpm.name}).extra_data == nonce


def test_signature_of_another_scheme_than_the_key_is_refused() -> None:
    tpm, other = SoftTpm("rsassa"), SoftTpm("ecdsa")
    a, _ = tpm.quote(NONCE, [0])
    with pytest.raises(QuoteSignatureError):
        quote.verify_quote(a, sign(other.key, quote.TPM_ALG_ECDSA, a), quote.parse_public(tpm.public),
                           nonce=NONCE, enrolled={tpm.name})


def test_signature_with_another_hash_or_sha1_is_refused() -> None:
    """The AK's public area fixes its scheme and hash: a SHA-1 (or any other) signature is not its."""
    tpm = SoftTpm("rsassa")
    a, _ = tpm.quote(NONCE, [0])
    assert isinstance(tpm.key, rsa.RSAPrivateKey)
    sha1 = struct.pack(">HH", quote.TPM_ALG_RSASSA, eventlog.ALG_SHA1) + _tpm2b(
        tpm.key.sign(a, padding.PKCS1v15(), hashes.SHA1()))
    with pytest.raises(QuoteSignatureError, match="SHA-1"):
        quote.verify_quote(a, sha1, quote.parse_public(tpm.public), nonce=NONCE, enrolled={tpm.name})


def test_empty_nonce_never_passes() -> None:
    tpm = SoftTpm("rsassa")
    a, s = tpm.quote(b"", [0])
    with pytest.raises(NonceMismatchError):
        quote.verify_quote(a, s, quote.parse_public(tpm.public), nonce=b"", enrolled={tpm.name})


def test_signed_non_quote_attestation_is_refused() -> None:
    """A certify/time attestation signed by the same AK is not a quote, however it verifies."""
    tpm = SoftTpm("rsassa")
    a = attest_bytes(NONCE, {i: bytes(32) for i in range(24)}, [0], typ=0x8017)
    with pytest.raises(AttestFormatError, match="TPM_ST_ATTEST_QUOTE"):
        quote.verify_quote(a, sign(tpm.key, tpm.scheme, a), quote.parse_public(tpm.public), nonce=NONCE,
                           enrolled={tpm.name})


def test_quote_of_sha1_bank_is_refused() -> None:
    pcrs = {i: bytes(32) for i in range(24)}
    q = quote.parse_attest(attest_bytes(NONCE, pcrs, [0, 4], alg=eventlog.ALG_SHA1))
    with pytest.raises(PcrSelectionError, match="SHA-256"):
        quote.check_pcrs(q, pcrs, [0, 4])


@pytest.mark.parametrize("attrs,why", [
    (quote.AK_ATTRS & ~quote.ATTR_RESTRICTED, "unrestricted"),
    (quote.AK_ATTRS & ~quote.ATTR_FIXED_TPM, "not fixedTPM"),
    (quote.AK_ATTRS | quote.ATTR_DECRYPT, "decrypt"),
])
def test_key_that_is_not_an_attestation_key_is_refused(attrs: int, why: str) -> None:
    """An unrestricted key would sign any bytes that look like a quote: it cannot be an AK."""
    key = rsa.generate_private_key(65537, 2048)
    with pytest.raises(PublicKeyFormatError, match="attestation key"):
        quote.parse_public(_tpm2b(public_area(key, quote.TPM_ALG_RSASSA, attrs)))


# -- appraisal: each refusal names its check -----------------------------------------------------------
def _booted(kind: str = "rsapss") -> tuple[SoftTpm, TpmReferences, TpmEnrolment]:
    tpm = SoftTpm(kind)
    uki = hashlib.sha256(b"uki").digest()
    tpm.measure(0, 0x80000008, hashlib.sha256(b"fw").digest())
    tpm.measure(4, EV_EFI_BOOT_SERVICES_APPLICATION, uki)
    data = bootstrap_event_data(CID.of(b"m", RAW), [CID.of(b"l0", RAW), CID.of(b"l1", RAW)])
    for d in data:
        tpm.measure(BOOTSTRAP_PCR, 0x0D, hashlib.sha256(d).digest(), d)
    refs = TpmReferences([uki], bootstrap_events=[ExpectedEvent(BOOTSTRAP_PCR, 0x0D, hashlib.sha256(d).digest(), d, d.decode())
                               for d in data])
    fw = eventlog.parse(eventlog.build(tpm.events)).replay()[0]
    return tpm, refs, TpmEnrolment(frozenset({tpm.name}), {0: fw})


def _run(tpm: SoftTpm, refs: TpmReferences, enrol: TpmEnrolment, *, log: bytes | None = None,
         nonce: bytes = NONCE) -> tuple[str, ...]:
    a, s = tpm.quote(NONCE, [0, 4, BOOTSTRAP_PCR])
    return appraise_tpm(attest=a, signature=s, ak_public=tpm.public, event_log=log or eventlog.build(tpm.events),
                        nonce=nonce, enrolment=enrol, references=refs).checks


def test_soft_tpm_boot_is_affirmed() -> None:
    assert "manifest and layer events" in _run(*_booted())


def test_enrolment_without_firmware_baseline_is_not_affirming() -> None:
    """Nothing to compare the firmware PCRs with: verified, but a warning, never affirming."""
    tpm, refs, enrol = _booted()
    a, s = tpm.quote(NONCE, [0, 4, BOOTSTRAP_PCR])
    result = appraise_tpm(attest=a, signature=s, ak_public=tpm.public, event_log=eventlog.build(tpm.events),
                          nonce=NONCE, enrolment=TpmEnrolment(enrol.ak_names), references=refs)
    assert not result.affirming and "firmware" in result.warnings[0]
    full = appraise_tpm(attest=a, signature=s, ak_public=tpm.public, event_log=eventlog.build(tpm.events),
                        nonce=NONCE, enrolment=enrol, references=refs)
    assert full.affirming


def test_replayed_quote_old_nonce_is_refused() -> None:
    with pytest.raises(NonceMismatchError):
        _run(*_booted(), nonce=os.urandom(32))


def test_quote_by_ak_not_enrolled_is_refused() -> None:
    tpm, refs, enrol = _booted()
    with pytest.raises(AkNotEnrolledError):
        _run(tpm, refs, TpmEnrolment(frozenset({SoftTpm("rsassa").name}), enrol.firmware_pcrs))


def test_event_log_that_does_not_replay_is_refused() -> None:
    tpm, refs, enrol = _booted()
    with pytest.raises(PcrDigestMismatchError):
        _run(tpm, refs, enrol, log=eventlog.build(tpm.events[:-1]))


def test_firmware_differing_from_enrolment_names_the_pcr() -> None:
    tpm, refs, enrol = _booted()
    with pytest.raises(ReferenceMismatchError, match="PCR 0"):
        _run(tpm, refs, TpmEnrolment(enrol.ak_names, {0: bytes(32)}))


def test_uki_changed_names_pcr4_event() -> None:
    tpm, refs, enrol = _booted()
    with pytest.raises(ReferenceMismatchError, match="PCR 4 application 0 \\(event 1\\)"):
        _run(tpm, TpmReferences([hashlib.sha256(b"another uki").digest()], bootstrap_events=refs.bootstrap_events), enrol)


def test_extra_application_in_pcr4_is_named() -> None:
    """A second EFI application (a shim, a chain-loaded loader) that no reference explains."""
    tpm, refs, enrol = _booted()
    tpm.measure(4, EV_EFI_BOOT_SERVICES_APPLICATION, hashlib.sha256(b"shim").digest())
    with pytest.raises(ReferenceMismatchError, match="PCR 4 application 1 .*not in the references"):
        _run(tpm, refs, enrol)


def test_pcr4_event_that_is_not_an_application_or_action_is_named() -> None:
    tpm, refs, enrol = _booted()
    tpm.measure(4, 0x0D, hashlib.sha256(b"hidden").digest(), b"innocent")
    with pytest.raises(ReferenceMismatchError, match="neither an application"):
        _run(tpm, refs, enrol)


def test_no_reference_applications_never_passes() -> None:
    tpm, refs, enrol = _booted()
    with pytest.raises(ReferenceMismatchError, match="no reference"):
        _run(tpm, TpmReferences([], bootstrap_events=refs.bootstrap_events), enrol)


def test_layer_swapped_names_the_bootstrap_event() -> None:
    tpm, refs, enrol = _booted()
    want = list(refs.bootstrap_events)
    want[2] = ExpectedEvent(BOOTSTRAP_PCR, 0x0D, hashlib.sha256(b"x").digest(), b"x", "cidboot layer 1 other")
    with pytest.raises(ReferenceMismatchError, match="PCR 15 event 2: expected 'cidboot layer 1 other'"):
        _run(tpm, TpmReferences(refs.applications, bootstrap_events=want), enrol)
    with pytest.raises(ReferenceMismatchError, match="unexpected extra event"):
        _run(tpm, TpmReferences(refs.applications, bootstrap_events=list(refs.bootstrap_events)[:2]), enrol)


def test_quote_not_covering_bootstrap_pcr_is_refused() -> None:
    tpm, refs, enrol = _booted()
    a, s = tpm.quote(NONCE, [0, 4])
    with pytest.raises(PcrSelectionError):
        appraise_tpm(attest=a, signature=s, ak_public=tpm.public, event_log=eventlog.build(tpm.events),
                     nonce=NONCE, enrolment=enrol, references=refs)


# -- fuzzers -----------------------------------------------------------------------------------------
_RSA_ATTEST = (VECTORS / "rsassa-quote.attest").read_bytes()
_RSA_SIG = (VECTORS / "rsassa-quote.sig").read_bytes()
_EC_PUB = (VECTORS / "ecdsa-ak.pub").read_bytes()
_RSA_PUB = (VECTORS / "rsassa-ak.pub").read_bytes()


def _mutate(data: st.DataObject, base: bytes) -> bytes:
    raw = bytearray(base)
    for _ in range(data.draw(st.integers(0, 5))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    return bytes(raw[:data.draw(st.integers(0, len(raw)))])


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_fuzz_attest_parser_raises_only_attest_format_error(data: st.DataObject) -> None:
    try:
        quote.parse_attest(_mutate(data, _RSA_ATTEST))
    except AttestFormatError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_signature_parser_raises_only_signature_format_error(data: st.DataObject) -> None:
    try:
        quote.parse_signature(_mutate(data, _RSA_SIG))
    except SignatureFormatError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.data(), st.sampled_from([_EC_PUB, _RSA_PUB]))
def test_fuzz_public_parser_raises_only_public_key_format_error(data: st.DataObject, base: bytes) -> None:
    try:
        quote.parse_public(_mutate(data, base))
    except PublicKeyFormatError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_verify_quote_raises_only_documented_errors(data: st.DataObject) -> None:
    ak = quote.parse_public(_RSA_PUB)
    try:
        quote.verify_quote(_mutate(data, _RSA_ATTEST), _mutate(data, _RSA_SIG), ak, nonce=NONCE, enrolled={ak.name})
    except (TpmFormatError, QuoteSignatureError, NonceMismatchError):
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300), st.binary(max_size=300))
def test_fuzz_random_bytes_in_every_parser(a: bytes, s: bytes, p: bytes) -> None:
    for fn, arg in ((quote.parse_attest, a), (quote.parse_signature, s), (quote.parse_public, p)):
        try:
            fn(arg)
        except TpmFormatError:
            pass
