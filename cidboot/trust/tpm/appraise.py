"""Appraisal of TPM evidence: a quote, the AK that made it, and the UEFI event log, against the
device's enrolment (AK names, firmware PCR baseline) and reference values derived from the signed
manifest. Each check raises its own error type; `appraise_tpm` returns the named checks it passed
so the caller can print the same checks list as for DICE evidence.

Order matters and is fail-closed: nothing from the log is believed before the quote verifies
(enrolled AK, signature, fresh nonce), and nothing in the log is believed before its replay equals
the quoted PCRs; only then are individual events compared with the references.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeAlias

from cidboot.ipld.cid import CID
from cidboot.trust.manifest.model import Manifest
from cidboot.trust.tpm import eventlog
from cidboot.trust.tpm.errors import (
    AkNotEnrolledError,
    ReferenceMismatchError,
    TpmFormatError,
    TpmVerificationError,
)
from cidboot.trust.tpm.eventlog import (
    EV_EFI_ACTION,
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_NO_ACTION,
    EV_SEPARATOR,
    Event,
    EventLog,
)
from cidboot.trust.tpm.quote import (
    AttestationKey,
    Quote,
    check_nonce,
    check_pcrs,
    parse_public,
    verify_signature,
)
from cidboot.trust.tpm.reference import (
    BOOTSTRAP_PCR,
    STUB_PCR,
    UKI_PCR,
    ExpectedEvent,
    bootstrap_events,
    uki_applications,
    uki_pcr11_events,
)

FIRMWARE_PCRS = (0, 1, 2, 3, 5, 6, 7)  # platform code and configuration, boot manager data, Secure Boot policy


@dataclass(frozen=True)
class TpmEnrolment:
    """What the factory step recorded for one device: its AK names (tpm2_createak -n, after
    make/activate credential against the EK certificate) and the firmware PCRs of a known-good boot."""

    ak_names: frozenset[bytes]
    firmware_pcrs: Mapping[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class TpmReferences:
    """Reference values for one boot, derived from what was signed (see reference.py): the PCR 4
    applications in order (the UKI, then its kernel), systemd's stub PCR 11 events, and the
    bootstrap's manifest and layer events."""

    applications: Sequence[bytes]
    stub_events: Sequence[ExpectedEvent] = ()
    bootstrap_events: Sequence[ExpectedEvent] = ()

    @classmethod
    def for_uki(cls, uki: bytes, manifest_cid: CID | None = None, manifest: Manifest | None = None) -> TpmReferences:
        """Everything derivable from the UKI's bytes (fetched by its CID) and the signed manifest."""
        boot = bootstrap_events(manifest_cid, manifest) if manifest_cid is not None and manifest is not None else []
        return cls(uki_applications(uki), uki_pcr11_events(uki), boot)


# The bootstrap UKIs a fleet boots, one reference set per UEFI architecture ("x86_64", "arm64"):
# one signed manifest and one UKI per arch (ADR 0008), so a verifier of a mixed fleet holds several
References: TypeAlias = "TpmReferences | Mapping[str, TpmReferences]"


def references_for_log(refs: References, uefi_log: bytes) -> TpmReferences | None:
    """The reference set to compare a device's log with: `refs` itself if it is one set; of
    several (by arch), the one whose UKI digest is the first application the log says UEFI
    measured into PCR 4, else the first by arch name (PCR 4 is then named as differing).

    Choosing by the log is sound because it only chooses *which signed set* applies: every set is
    a bootstrap UKI the fleet's signers vouch for, and once chosen every PCR 4/11 event must equal
    that set's exactly, after the log has been shown to replay to the quoted PCRs (a log that lies
    about PCR 4 fails the replay). The evidence names no architecture, and needs not. None: no set."""
    if isinstance(refs, TpmReferences):
        return refs
    if not refs:
        return None
    by_arch = [refs[a] for a in sorted(refs)]
    try:
        log = eventlog.parse(uefi_log)
    except TpmFormatError:
        return by_arch[0]  # the replay check names the format error
    first = next((ev.sha256 for ev in log.events
                  if ev.pcr == UKI_PCR and ev.event_type == EV_EFI_BOOT_SERVICES_APPLICATION), None)
    return next((r for r in by_arch if r.applications and r.applications[0] == first), by_arch[0])


def own_boot_references(uefi_log: bytes) -> TpmReferences:
    """PCR 4 and 11 references taken from this device's own firmware log: the applications UEFI
    started and the stub's section events, as this device booted them.

    For an agent appraising its peers when it has no UKI to derive references from: a fleet boots
    one bootstrap UKI, so "the bootstrap I booted" is the reference, as DICE agents without a
    manifest take their own measurements (agent.identity.references). It is only as good as the
    appraising agent: if it booted the good UKI, a peer that booted another differs at PCR 4/11 and
    is refused; if it did not, it is a compromised verifier (whose answers are worthless with any
    references), and its own evidence is refused by every verifier that has the real UKI
    (TpmReferences.for_uki, `agent attest --uki`), which is what such verifiers use instead."""
    log = eventlog.parse(uefi_log)
    apps = [ev.sha256 for ev in log.events if ev.pcr == UKI_PCR and ev.event_type == EV_EFI_BOOT_SERVICES_APPLICATION]
    stub = [ExpectedEvent(STUB_PCR, ev.event_type, ev.sha256, ev.data, f"PCR {STUB_PCR} event {ev.index}")
            for ev in log.events if ev.pcr == STUB_PCR and ev.event_type != EV_NO_ACTION]
    return TpmReferences(apps, stub)


@dataclass(frozen=True)
class TpmAppraisal:
    """What passed (`checks`) and what was not compared at all (`warnings`): evidence with a
    warning verified but is not affirming, as for a DICE layer without a reference value."""

    quote: Quote
    log: EventLog
    pcrs: Mapping[int, bytes]
    checks: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    @property
    def affirming(self) -> bool:
        return not self.warnings


PASS, WARN, FAIL = "pass", "warn", "fail"


@dataclass(frozen=True)
class TpmCheck:
    """One step of TPM appraisal: `name` (stable: the checks list and EAR mapping use it), its
    outcome (PASS, WARN: not compared, so not affirming; FAIL: `error` is what was raised)."""

    name: str
    outcome: str
    reason: str
    error: TpmFormatError | TpmVerificationError | None = None


AK_ENROLLED, QUOTE_SIGNATURE, NONCE_FRESH, REPLAY = "ak enrolled", "quote signature", "nonce fresh", \
    "event log replays to quoted PCRs"
FIRMWARE, PCR4, PCR11, PCR15 = "firmware PCRs match enrolment", "UKI and kernel digests (PCR 4)", \
    "UKI sections (PCR 11)", "manifest and layer events"
CHECK_NAMES = (AK_ENROLLED, QUOTE_SIGNATURE, NONCE_FRESH, REPLAY, FIRMWARE, PCR4, PCR11, PCR15)


def appraise_tpm(*, attest: bytes, signature: bytes, ak_public: bytes, event_log: bytes, nonce: bytes,
                 enrolment: TpmEnrolment, references: TpmReferences,
                 required_pcrs: Collection[int] | None = None, extra_events: Sequence[Event] = ()) -> TpmAppraisal:
    """Verify TPM evidence; raises the precise TpmVerificationError / TpmFormatError subclass of
    the first check that fails (`tpm_checks` gives every step's outcome instead)."""
    passed: list[str] = []
    warnings: list[str] = []
    state = TpmState()
    for c in tpm_checks(attest=attest, signature=signature, ak_public=ak_public, event_log=event_log, nonce=nonce,
                        enrolment=enrolment, references=references, required_pcrs=required_pcrs,
                        extra_events=extra_events, state=state):
        if c.error is not None:
            raise c.error
        (passed if c.outcome == PASS else warnings).append(c.name if c.outcome == PASS else c.reason)
    assert state.quote is not None and state.log is not None
    return TpmAppraisal(state.quote, state.log, state.pcrs, tuple(passed), tuple(warnings))


@dataclass
class TpmState:
    """What `tpm_checks` learned on the way (the verified quote, the combined log, its replay)."""

    quote: Quote | None = None
    log: EventLog | None = None
    pcrs: dict[int, bytes] = field(default_factory=dict)


_TpmError = (TpmFormatError, TpmVerificationError)


def tpm_checks(*, attest: bytes, signature: bytes, ak_public: bytes, event_log: bytes, nonce: bytes,
               enrolment: TpmEnrolment, references: TpmReferences, required_pcrs: Collection[int] | None = None,
               extra_events: Sequence[Event] = (), state: TpmState | None = None,
               uki_known: bool = True) -> Iterator[TpmCheck]:
    """Each check in order, as a TpmCheck; stops after the first FAIL (nothing later is believed).

    `nonce` is what extraData must equal (for a TPM-rooted DICE chain: `evidence.qualifying_data`);
    `extra_events` are events extended after the firmware log was closed (the bootstrap's own,
    `TpmEvidence.log_events`), replayed after it. `required_pcrs` defaults to the firmware PCRs
    that were enrolled, PCR 4, and PCR 11 / BOOTSTRAP_PCR when their events are expected.
    `uki_known=False`: the verifier has no UKI to derive PCR 4/11 references from; those checks
    are a WARN (never affirming) rather than a FAIL, and PCR 15 is still compared."""
    st = state if state is not None else TpmState()
    try:
        ak: AttestationKey = parse_public(ak_public)
        if ak.name not in enrolment.ak_names:
            raise AkNotEnrolledError(f"AK {ak.name.hex()} is not enrolled for this device")
    except _TpmError as e:
        yield TpmCheck(AK_ENROLLED, FAIL, str(e), e)
        return
    yield TpmCheck(AK_ENROLLED, PASS, f"AK {ak.name.hex()[:20]}... is enrolled")
    try:
        q = verify_signature(attest, signature, ak)
    except _TpmError as e:
        yield TpmCheck(QUOTE_SIGNATURE, FAIL, str(e), e)
        return
    yield TpmCheck(QUOTE_SIGNATURE, PASS, "the quote verifies with the enrolled AK")
    try:
        st.quote = check_nonce(q, nonce)
    except _TpmError as e:
        yield TpmCheck(NONCE_FRESH, FAIL, str(e), e)
        return
    yield TpmCheck(NONCE_FRESH, PASS, "the quote's qualifying data is this challenge's")
    try:
        fw = eventlog.parse(event_log)
        extra = tuple(replace(ev, index=len(fw.events) + k) for k, ev in enumerate(extra_events))
        log = EventLog(fw.spec_id, fw.events + extra, fw.startup_locality)
        pcrs = log.replay()
        required = set(required_pcrs) if required_pcrs is not None else (
            set(enrolment.firmware_pcrs) | {UKI_PCR} | ({STUB_PCR} if references.stub_events else set())
            | ({BOOTSTRAP_PCR} if references.bootstrap_events else set()))
        check_pcrs(q, pcrs, required)
    except _TpmError as e:
        yield TpmCheck(REPLAY, FAIL, str(e), e)
        return
    st.log, st.pcrs = log, pcrs
    covered = sorted({i for _, idx in q.selection for i in idx})
    yield TpmCheck(REPLAY, PASS, f"{len(log.events)} events replay to the quoted PCRs {covered}")
    if not enrolment.firmware_pcrs:
        yield TpmCheck(FIRMWARE, WARN, "no firmware PCR baseline enrolled: any firmware is accepted")
    else:
        for i in sorted(enrolment.firmware_pcrs):
            if pcrs[i] != enrolment.firmware_pcrs[i]:
                err = ReferenceMismatchError(f"PCR {i}: firmware measurements {pcrs[i].hex()} differ from the "
                                             f"enrolled baseline {enrolment.firmware_pcrs[i].hex()}")
                yield TpmCheck(FIRMWARE, FAIL, str(err), err)
                return
        yield TpmCheck(FIRMWARE, PASS, f"PCRs {sorted(enrolment.firmware_pcrs)} equal the enrolled baseline")
    steps: list[tuple[str, Callable[[], None], str]] = []
    if not uki_known:
        yield TpmCheck(PCR4, WARN, "no UKI given to derive PCR 4 and PCR 11 references from: "
                                   "the bootstrap and its kernel are not compared")
    else:
        steps.append((PCR4, lambda: _check_pcr4(log, list(references.applications)), "the UKI and its kernel, as built"))
    if uki_known and not references.applications:
        none = ReferenceMismatchError(f"PCR {UKI_PCR}: no reference application digests to compare with")
        yield TpmCheck(PCR4, FAIL, str(none), none)
        return
    if references.stub_events and uki_known:
        steps.append((PCR11, lambda: _match(log, STUB_PCR, list(references.stub_events)),
                      f"{len(references.stub_events)} stub section events"))
    if references.bootstrap_events:
        steps.append((PCR15, lambda: _match(log, BOOTSTRAP_PCR, list(references.bootstrap_events), True),
                      f"the manifest and {len(references.bootstrap_events) - 1} layer(s), in order"))
    for name, fn, ok in steps:
        try:
            fn()
        except _TpmError as e:
            yield TpmCheck(name, FAIL, str(e), e)
            return
        yield TpmCheck(name, PASS, ok)


def check_references(log: EventLog, references: TpmReferences) -> list[str]:
    """Compare a log's events with the references (only meaningful once the log is known to replay
    to quoted PCRs); raises ReferenceMismatchError naming the PCR and event, else the checks passed."""
    if not references.applications:
        raise ReferenceMismatchError(f"PCR {UKI_PCR}: no reference application digests to compare with")
    checks = []
    _check_pcr4(log, list(references.applications))
    checks.append("UKI and kernel digests (PCR 4)")
    if references.stub_events:
        _match(log, STUB_PCR, list(references.stub_events))
        checks.append("UKI sections (PCR 11)")
    if references.bootstrap_events:
        _match(log, BOOTSTRAP_PCR, list(references.bootstrap_events), True)
        checks.append("manifest and layer events")
    return checks


def _check_pcr4(log: EventLog, applications: list[bytes]) -> None:
    """PCR 4 holds the boot manager's actions and separator, each the hash of its data, and the
    applications started, which must be exactly the expected ones in order: a digest no reference
    explains (an extra loader, a shim, a changed UKI) is named."""
    apps: list[Event] = []
    for ev in log.events:
        if ev.pcr != UKI_PCR or ev.event_type == EV_NO_ACTION:
            continue
        if ev.event_type == EV_EFI_BOOT_SERVICES_APPLICATION:
            apps.append(ev)
        elif ev.event_type == EV_SEPARATOR and ev.data == bytes(4) and ev.sha256 == hashlib.sha256(ev.data).digest():
            pass
        elif ev.event_type == EV_EFI_ACTION and ev.sha256 == hashlib.sha256(ev.data).digest():
            pass
        else:
            raise ReferenceMismatchError(f"PCR {UKI_PCR} event {ev.index}: type {ev.event_type:#x} digest "
                                         f"{ev.sha256.hex()} is neither an application nor a self-describing action")
    for k in range(max(len(apps), len(applications))):
        got, want = (apps[k] if k < len(apps) else None), (applications[k] if k < len(applications) else None)
        if got is None or want is None or got.sha256 != want:
            raise ReferenceMismatchError(
                f"PCR {UKI_PCR} application {k}" + (f" (event {got.index}): {got.sha256.hex()}" if got else ": missing")
                + (f", expected {want.hex()} ({'the UKI' if k == 0 else 'its kernel' if k == 1 else '?'})" if want
                   else ", not in the references"))


def _match(log: EventLog, pcr: int, want: list[ExpectedEvent], compare_data: bool = False) -> None:
    """The PCR's extending events are exactly `want`, in order (type and digest, and with
    `compare_data` the event data too: for our own events, whose data names the CID)."""
    got = [ev for ev in log.events if ev.pcr == pcr and ev.event_type != EV_NO_ACTION]
    for k in range(max(len(got), len(want))):
        g, w = (got[k] if k < len(got) else None), (want[k] if k < len(want) else None)
        if g is None or w is None or g.event_type != w.event_type or g.sha256 != w.digest \
                or (compare_data and w.data is not None and g.data != w.data):
            raise ReferenceMismatchError(
                f"PCR {pcr} event {k}: " + (f"expected {w.what!r}" if w else "unexpected extra event")
                + (f", the log has {g.data[:80]!r} ({g.sha256.hex()})" if g else ", the log ends"))
