"""Appraisal of TPM evidence: a quote, the AK that made it, and the UEFI event log, against the
device's enrolment (AK names, firmware PCR baseline) and reference values derived from the signed
manifest. Each check raises its own error type; `appraise_tpm` returns the named checks it passed
so the caller can print the same checks list as for DICE evidence.

Order matters and is fail-closed: nothing from the log is believed before the quote verifies
(enrolled AK, signature, fresh nonce), and nothing in the log is believed before its replay equals
the quoted PCRs; only then are individual events compared with the references.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from cidboot.trust.tpm import eventlog
from cidboot.trust.tpm.errors import ReferenceMismatchError
from cidboot.trust.tpm.eventlog import EV_EFI_BOOT_SERVICES_APPLICATION, EventLog
from cidboot.trust.tpm.quote import AttestationKey, Quote, check_pcrs, parse_public, verify_quote
from cidboot.trust.tpm.reference import BOOTSTRAP_PCR, UKI_PCR, ExpectedEvent

FIRMWARE_PCRS = (0, 1, 2, 3, 5, 6, 7)  # platform code and configuration, boot manager data, Secure Boot policy


@dataclass(frozen=True)
class TpmEnrolment:
    """What the factory step recorded for one device: its AK names (tpm2_createak -n, after
    make/activate credential against the EK certificate) and the firmware PCRs of a known-good boot."""

    ak_names: frozenset[bytes]
    firmware_pcrs: Mapping[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class TpmReferences:
    """Reference values for one boot, derived from the signed manifest (see reference.py)."""

    uki_digest: bytes
    bootstrap_events: Sequence[ExpectedEvent] = ()


@dataclass(frozen=True)
class TpmAppraisal:
    quote: Quote
    log: EventLog
    pcrs: Mapping[int, bytes]
    checks: tuple[str, ...]


def appraise_tpm(*, attest: bytes, signature: bytes, ak_public: bytes, event_log: bytes, nonce: bytes,
                 enrolment: TpmEnrolment, references: TpmReferences,
                 required_pcrs: Collection[int] | None = None) -> TpmAppraisal:
    """Verify TPM evidence; raises the precise TpmVerificationError / TpmFormatError subclass of
    the first check that fails. `required_pcrs` defaults to the firmware PCRs that were enrolled,
    PCR 4, and BOOTSTRAP_PCR when bootstrap events are expected."""
    checks = []
    ak: AttestationKey = parse_public(ak_public)
    quote = verify_quote(attest, signature, ak, nonce=nonce, enrolled=enrolment.ak_names)
    checks += ["ak enrolled", "quote signature", "nonce fresh"]
    log = eventlog.parse(event_log)
    pcrs = log.replay()
    required = set(required_pcrs) if required_pcrs is not None else (
        set(enrolment.firmware_pcrs) | {UKI_PCR} | ({BOOTSTRAP_PCR} if references.bootstrap_events else set()))
    check_pcrs(quote, pcrs, required)
    checks.append("event log replays to quoted PCRs")
    for i in sorted(enrolment.firmware_pcrs):
        if pcrs[i] != enrolment.firmware_pcrs[i]:
            raise ReferenceMismatchError(f"PCR {i}: firmware measurements {pcrs[i].hex()} differ from the enrolled "
                                         f"baseline {enrolment.firmware_pcrs[i].hex()}")
    if enrolment.firmware_pcrs:
        checks.append("firmware PCRs match enrolment")
    apps = [ev for ev in log.events if ev.pcr == UKI_PCR and ev.event_type == EV_EFI_BOOT_SERVICES_APPLICATION]
    if not apps:
        raise ReferenceMismatchError(f"PCR {UKI_PCR}: no EFI application was measured, expected the UKI "
                                     f"{references.uki_digest.hex()}")
    for ev in apps:
        if ev.sha256 != references.uki_digest:
            raise ReferenceMismatchError(f"PCR {UKI_PCR} event {ev.index}: EFI application {ev.sha256.hex()} is not "
                                         f"the manifest's UKI {references.uki_digest.hex()}")
    checks.append("UKI digest (PCR 4)")
    if references.bootstrap_events:
        got = [ev for ev in log.events if ev.pcr == BOOTSTRAP_PCR and ev.event_type != eventlog.EV_NO_ACTION]
        want = list(references.bootstrap_events)
        for k in range(max(len(got), len(want))):
            g, w = (got[k] if k < len(got) else None), (want[k] if k < len(want) else None)
            if g is None or w is None or g.event_type != w.event_type or g.sha256 != w.digest:
                raise ReferenceMismatchError(
                    f"PCR {BOOTSTRAP_PCR} event {k}: "
                    + (f"expected {w.what!r}" if w else "unexpected extra event")
                    + (f", the log has {g.data[:80]!r} ({g.sha256.hex()})" if g else ", the log ends"))
        checks.append("manifest and layer events")
    return TpmAppraisal(quote, log, pcrs, tuple(checks))
