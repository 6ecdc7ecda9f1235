"""The TCG crypto-agile event log parser and its replay: well-formed logs replay to the PCRs an
independent computation gives; truncated, garbled or oversized logs give EventLogFormatError and
nothing else (hypothesis)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cidboot.trust.tpm import eventlog
from cidboot.trust.tpm.errors import EventLogFormatError
from cidboot.trust.tpm.eventlog import (
    ALG_SHA1,
    ALG_SHA256,
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_NO_ACTION,
    EV_SEPARATOR,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "tpm"
OVMF_LOG = (VECTORS / "ovmf-eventlog.bin").read_bytes()


def _aavmf_log() -> bytes:
    """AAVMF's log (arm64), from the saved evidence of a real boot (tests/vectors/tpm/README.md)."""
    from cidboot.trust.eat import parse_evidence

    tpm = parse_evidence((VECTORS / "aavmf-evidence.cbor").read_bytes()).tpm
    assert tpm is not None
    return tpm.uefi_log


AAVMF_LOG = _aavmf_log()

EVENTS = [(0, 0x80000008, hashlib.sha256(b"fw").digest(), b"blob"),
          (0, EV_SEPARATOR, hashlib.sha256(bytes(4)).digest(), bytes(4)),
          (4, EV_EFI_BOOT_SERVICES_APPLICATION, hashlib.sha256(b"uki").digest(), b"dp"),
          (4, EV_NO_ACTION, bytes(32), b"not extended"),
          (15, 0x0D, hashlib.sha256(b"cidboot manifest x").digest(), b"cidboot manifest x")]


def _extend(*digests: bytes) -> bytes:
    v = bytes(32)
    for d in digests:
        v = hashlib.sha256(v + d).digest()
    return v


def test_log_replays_to_independently_computed_pcrs() -> None:
    log = eventlog.parse(eventlog.build(EVENTS))
    assert len(log.events) == 5 and log.spec_id.algorithms == ((ALG_SHA256, 32),)
    pcrs = log.replay()
    assert pcrs[0] == _extend(EVENTS[0][2], EVENTS[1][2])
    assert pcrs[4] == _extend(EVENTS[2][2])  # the EV_NO_ACTION event is not extended
    assert pcrs[15] == _extend(EVENTS[4][2])
    assert pcrs[7] == bytes(32) and pcrs[17] == b"\xff" * 32


def test_real_ovmf_log_replays_to_the_pcrs_its_tpm_reported() -> None:
    log = eventlog.parse(OVMF_LOG)
    tpm = {int(line.split()[1]): bytes.fromhex(line.split()[2])
           for line in (VECTORS / "ovmf-pcrs.txt").read_text().splitlines()}
    pcrs = log.replay()
    assert [i for i in range(16) if pcrs[i] != tpm[i]] == [10]  # PCR 10: IMA, measured after the firmware log
    apps = [ev.sha256.hex()[:8] for ev in log.events if ev.event_type == EV_EFI_BOOT_SERVICES_APPLICATION]
    assert apps == ["6e4ef6c2", "5f21ff2c"]  # the UKI, then the kernel the stub loaded


def test_two_bank_log_replays_the_sha256_bank() -> None:
    raw = eventlog.build(EVENTS, algorithms=((ALG_SHA1, 20), (ALG_SHA256, 32)))
    log = eventlog.parse(raw)
    assert log.replay()[4] == _extend(EVENTS[2][2])
    assert len(log.events[0].digests[ALG_SHA1]) == 20


def test_startup_locality_sets_pcr0_initial_value() -> None:
    raw = eventlog.build([(0, EV_NO_ACTION, bytes(32), b"StartupLocality\x00\x03")] + EVENTS)
    log = eventlog.parse(raw)
    assert log.startup_locality == 3
    v = bytes(31) + b"\x03"
    for d in (EVENTS[0][2], EVENTS[1][2]):
        v = hashlib.sha256(v + d).digest()
    assert log.replay()[0] == v


def test_startup_locality_after_a_pcr0_measurement_is_refused() -> None:
    raw = eventlog.build(EVENTS[:1] + [(0, EV_NO_ACTION, bytes(32), b"StartupLocality\x00\x03")])
    with pytest.raises(EventLogFormatError, match="StartupLocality"):
        eventlog.parse(raw)


def test_sha1_only_log_is_refused() -> None:
    raw = bytearray(eventlog.build(EVENTS))
    raw[32:48] = b"Spec ID Event02\x00"
    with pytest.raises(EventLogFormatError, match="crypto-agile"):
        eventlog.parse(bytes(raw))


def test_log_without_sha256_bank_is_refused() -> None:
    with pytest.raises(EventLogFormatError, match="no SHA-256 bank"):
        eventlog.parse(eventlog.build([], algorithms=((ALG_SHA1, 20),)))


def test_event_with_missing_bank_digest_is_refused() -> None:
    raw = eventlog.build(EVENTS[:1])
    header = len(eventlog.build([]))
    bad = raw[:header + 8] + struct.pack("<I", 2) + raw[header + 12:]
    with pytest.raises(EventLogFormatError, match="2 digests"):
        eventlog.parse(bad)


def test_declared_digest_size_disagreeing_with_algorithm_is_refused() -> None:
    with pytest.raises(EventLogFormatError, match="digest size"):
        eventlog.parse(eventlog.build([], algorithms=((ALG_SHA256, 20),)))


def test_pcr_out_of_range_is_refused() -> None:
    with pytest.raises(EventLogFormatError, match="PCR 24"):
        eventlog.parse(eventlog.build([(24, EV_SEPARATOR, bytes(32), b"")]))


def test_oversized_event_is_refused_before_reading_it() -> None:
    raw = eventlog.build(EVENTS[:1])
    cut = len(raw) - len(EVENTS[0][3]) - 4
    bad = raw[:cut] + struct.pack("<I", eventlog.MAX_EVENT_BYTES + 1)
    with pytest.raises(EventLogFormatError, match="exceeds"):
        eventlog.parse(bad)


def test_every_truncation_of_a_log_is_refused_or_a_prefix() -> None:
    """Cutting inside a record is a format error; cutting between records is a shorter valid log
    (the quote, not the parser, catches a log cut at a record boundary: see check_pcrs)."""
    raw = eventlog.build(EVENTS)
    boundaries = {ev.offset for ev in eventlog.parse(raw).events} | {len(raw)}
    for n in range(len(raw)):
        if n in boundaries:
            assert len(eventlog.parse(raw[:n]).events) < len(EVENTS)
        else:
            with pytest.raises(EventLogFormatError):
                eventlog.parse(raw[:n])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_raise_only_event_log_format_error(data: bytes) -> None:
    try:
        eventlog.parse(data)
    except EventLogFormatError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.data(), st.sampled_from(["synthetic", "ovmf", "aavmf"]))
def test_fuzz_mutated_logs_raise_only_event_log_format_error(data: st.DataObject, base: str) -> None:
    raw = bytearray({"ovmf": OVMF_LOG, "aavmf": AAVMF_LOG}.get(base)
                    or eventlog.build(EVENTS, algorithms=((ALG_SHA1, 20), (ALG_SHA256, 32))))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        log = eventlog.parse(bytes(raw[:cut]))
    except EventLogFormatError:
        return
    log.replay()  # a log that parses always replays


def test_real_aavmf_evidence_replays_to_the_pcrs_its_tpm_quoted() -> None:
    """arm64: the TPM claim of a real AAVMF + swtpm boot (tests/e2e/test_uefi_arm64_qemu.py): AAVMF's
    log, then the bootstrap's PCR 15 events, replay to the digest the TPM quoted (signed by the AK
    it carries), with the same parser, event types and PCR 4/11 shape as OVMF's."""
    from cidboot.trust.eat import parse_evidence
    from cidboot.trust.tpm.errors import PcrDigestMismatchError
    from cidboot.trust.tpm.quote import check_pcrs, parse_public, verify_signature

    ev = parse_evidence((VECTORS / "aavmf-evidence.cbor").read_bytes())
    assert ev.boot_mode == "tpm-measured" and ev.tpm is not None
    fw = eventlog.parse(ev.tpm.uefi_log)
    assert fw.spec_id.algorithms == ((ALG_SHA256, 32),)
    both = eventlog.EventLog(fw.spec_id, fw.events + tuple(ev.tpm.log_events(len(fw.events))), fw.startup_locality)
    q = verify_signature(ev.tpm.quote, ev.tpm.signature, parse_public(ev.tpm.ak_public))
    check_pcrs(q, both.replay(), {0, 1, 2, 3, 4, 5, 6, 7, 11, 15})  # raises unless the replay is what was quoted
    pcr4 = [e.event_type for e in fw.events if e.pcr == 4]
    assert pcr4.count(EV_EFI_BOOT_SERVICES_APPLICATION) == 2 and EV_SEPARATOR in pcr4  # the UKI, its kernel
    assert len([e for e in fw.events if e.pcr == 11]) == 8  # the arm64 systemd 252 stub: 4 sections x 2
    cut = ev.tpm.uefi_log[:fw.events[-1].offset]
    short = eventlog.parse(cut)
    with pytest.raises(PcrDigestMismatchError):  # AAVMF's log without its last event
        check_pcrs(q, eventlog.EventLog(short.spec_id, short.events + tuple(ev.tpm.log_events()),
                                        short.startup_locality).replay(), {4})
