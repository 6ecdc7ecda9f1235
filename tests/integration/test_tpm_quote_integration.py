"""TPM evidence from a real TPM: swtpm (manufactured with an EK certificate by swtpm_setup) and
tpm2-tools make an EK and an AK, extend PCRs with the events of a synthetic boot (a firmware
blob in PCR 0, the bootstrap UKI's Authenticode hash in PCR 4, the manifest and layer CIDs in the
bootstrap PCR), and quote them over a fresh nonce. Our parsers and verifier must accept exactly
that, and refuse a replayed quote, a quote by an AK that is not enrolled, an event log that does
not replay to the quoted PCRs, and a quote with any bit flipped.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import pytest

from cidboot.ipld.cid import CID, RAW
from cidboot.trust import keys
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust
from cidboot.trust.tpm import eventlog, quote
from cidboot.trust.tpm.appraise import TpmEnrolment, TpmReferences, appraise_tpm
from cidboot.trust.tpm.errors import (
    AkNotEnrolledError,
    NonceMismatchError,
    PcrDigestMismatchError,
    QuoteSignatureError,
    ReferenceMismatchError,
)
from cidboot.trust.tpm.eventlog import (
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_EFI_PLATFORM_FIRMWARE_BLOB,
    EV_SEPARATOR,
)
from cidboot.trust.tpm.reference import BOOTSTRAP_PCR, bootstrap_events, uki_digest
from tests.support.swtpm import AkFiles, Swtpm, make_pe

pytestmark = [pytest.mark.tpm]
PCRS = [0, 4, BOOTSTRAP_PCR]


def _fake_uki() -> bytes:
    """A small PE32+ image (one section): stands in for the UKI, whose hash is what matters here."""
    return make_pe([(".linux", os.urandom(3000))])


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One TPM that went through a synthetic measured boot, its enrolled AK, and the log of that boot."""
    base = tmp_path_factory.mktemp("swtpm")
    k = keys.generate()
    manifest = Manifest("hello", 1, int(time.time()) + 3600,
                        tuple(Layer(CID.of(bytes([i]) * 9, RAW), 9, "other") for i in range(3)),
                        RootOfTrust.from_public_keys([k.public_key()], 1))
    manifest_cid = CID.of(b"manifest envelope", RAW)
    uki = _fake_uki()
    fw = hashlib.sha256(b"OVMF code").digest()
    events = [(0, EV_EFI_PLATFORM_FIRMWARE_BLOB, fw, b"\x00" * 16)]
    events += [(i, EV_SEPARATOR, hashlib.sha256(bytes(4)).digest(), bytes(4)) for i in (0, 4)]
    events.append((4, EV_EFI_BOOT_SERVICES_APPLICATION, uki_digest(uki), b"\x00" * 32))
    expected = bootstrap_events(manifest_cid, manifest)
    events += [(e.pcr, e.event_type, e.digest, e.data or b"") for e in expected]
    with Swtpm(base / "device") as tpm, Swtpm(base / "other") as other:
        ak = tpm.create_ak()
        ak_ec = tpm.create_ak("ak-ecc", key_alg="ecc", scheme="ecdsa")
        ak_pss = tpm.create_ak("ak-pss", key_alg="rsa", scheme="rsapss")
        stranger = other.create_ak()
        for pcr, _, digest, _ in events:
            tpm.extend(pcr, digest)
        log = eventlog.build(events)
        pcrs = eventlog.parse(log).replay()
        enrol = TpmEnrolment(frozenset(quote.parse_public(a.public.read_bytes()).name for a in (ak, ak_ec, ak_pss)),
                             {0: pcrs[0]})
        refs = TpmReferences([uki_digest(uki)], bootstrap_events=expected)
        yield {"tpm": tpm, "other": other, "ak": ak, "ak_ec": ak_ec, "ak_pss": ak_pss, "stranger": stranger, "log": log,
               "enrol": enrol, "refs": refs, "events": events}


def _appraise(b: Any, ak: AkFiles, attest: bytes, sig: bytes, nonce: bytes, log: bytes | None = None) -> Any:
    return appraise_tpm(attest=attest, signature=sig, ak_public=ak.public.read_bytes(), event_log=log or b["log"],
                        nonce=nonce, enrolment=b["enrol"], references=b["refs"])


@pytest.mark.parametrize("which", ["ak", "ak_ec", "ak_pss"])
def test_fresh_quote_from_swtpm_with_replaying_log_is_accepted(booted: Any, which: str) -> None:
    nonce = os.urandom(32)
    attest, sig = booted["tpm"].quote(booted[which], nonce, PCRS, out=f"fresh-{which}")
    t = time.perf_counter()
    result = _appraise(booted, booted[which], attest, sig, nonce)
    dt = (time.perf_counter() - t) * 1000
    assert result.quote.extra_data == nonce
    assert result.checks == ("ak enrolled", "quote signature", "nonce fresh", "event log replays to quoted PCRs",
                             "firmware PCRs match enrolment", "UKI and kernel digests (PCR 4)",
                             "manifest and layer events")
    # the replay agrees with what the TPM itself reports for the bootstrap PCR
    out = booted["tpm"].pcr_read([BOOTSTRAP_PCR]).decode()
    assert result.pcrs[BOOTSTRAP_PCR].hex().upper() in out.upper()
    print(f"\n{which}: appraisal of a real swtpm quote + {len(booted['events'])}-event log: {dt:.2f} ms")


def test_replayed_quote_with_old_nonce_is_refused(booted: Any) -> None:
    old = os.urandom(32)
    attest, sig = booted["tpm"].quote(booted["ak"], old, PCRS, out="old")
    with pytest.raises(NonceMismatchError):
        _appraise(booted, booted["ak"], attest, sig, os.urandom(32))


def test_quote_by_non_enrolled_ak_is_refused(booted: Any) -> None:
    nonce = os.urandom(32)
    attest, sig = booted["other"].quote(booted["stranger"], nonce, PCRS, out="stranger")
    with pytest.raises(AkNotEnrolledError):
        _appraise(booted, booted["stranger"], attest, sig, nonce)
    # the stranger's quote presented under the enrolled AK's public key does not verify either
    with pytest.raises(QuoteSignatureError):
        _appraise(booted, booted["ak"], attest, sig, nonce)


def test_event_log_that_does_not_replay_to_quoted_pcrs_is_refused(booted: Any) -> None:
    nonce = os.urandom(32)
    attest, sig = booted["tpm"].quote(booted["ak"], nonce, PCRS, out="replay")
    events = booted["events"]
    dropped = eventlog.build(events[:-1])  # a layer event left out
    with pytest.raises(PcrDigestMismatchError):
        _appraise(booted, booted["ak"], attest, sig, nonce, dropped)
    other_uki = [(p, t, hashlib.sha256(b"another UKI").digest() if t == EV_EFI_BOOT_SERVICES_APPLICATION else d, x)
                 for p, t, d, x in events]
    with pytest.raises(PcrDigestMismatchError):  # a log claiming another UKI than the TPM measured
        _appraise(booted, booted["ak"], attest, sig, nonce, eventlog.build(other_uki))


def test_quote_with_any_bit_flipped_is_refused(booted: Any) -> None:
    nonce = os.urandom(32)
    attest, sig = booted["tpm"].quote(booted["ak"], nonce, PCRS, out="flip")
    _appraise(booted, booted["ak"], attest, sig, nonce)
    for bit in range(len(attest) * 8):
        bad = bytearray(attest)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(QuoteSignatureError):
            _appraise(booted, booted["ak"], bytes(bad), sig, nonce)
    for bit in range(0, len(sig) * 8, 7):
        bad = bytearray(sig)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises((QuoteSignatureError, quote.SignatureFormatError)):
            _appraise(booted, booted["ak"], attest, bytes(bad), nonce)


def test_uki_other_than_the_manifests_is_named(booted: Any) -> None:
    """The TPM measured our UKI, the verifier's references name another: the PCR 4 event is named."""
    nonce = os.urandom(32)
    attest, sig = booted["tpm"].quote(booted["ak"], nonce, PCRS, out="refs")
    refs = TpmReferences([hashlib.sha256(b"the manifest's UKI").digest()], bootstrap_events=booted["refs"].bootstrap_events)
    with pytest.raises(ReferenceMismatchError, match="PCR 4 application 0"):
        appraise_tpm(attest=attest, signature=sig, ak_public=booted["ak"].public.read_bytes(), event_log=booted["log"],
                     nonce=nonce, enrolment=booted["enrol"], references=refs)
