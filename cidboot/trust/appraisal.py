"""Appraisal of EAT evidence into an EAR-like result (affirming / warning / contraindicated / none).

Every check is recorded with its own status and reason, and the overall status is the worst
of them, so a verifier's answer always says *why*. Checks: evidence format, nonce (replay),
DICE chain, registered device root, role (the evidence's claim against the registry), evidence signature by the chain's leaf key, debug mode,
measured boot, measurements against the signed manifest's reference values, manifest CID.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cidboot.errors import FormatError, VerificationError
from cidboot.ipld.cid import CID
from cidboot.trust import cose
from cidboot.trust.appraisal_roots import DeviceRoots
from cidboot.trust.appraisal_tpmdevice import TpmDevice  # noqa: F401  (re-exported)
from cidboot.trust.cose import PublicKey
from cidboot.trust.cose_key import raw_public_bytes
from cidboot.trust.dice.chain import VerifiedChain, verify_chain
from cidboot.trust.dice.derive import DiceMode
from cidboot.trust.eat import Evidence, parse_evidence
from cidboot.trust.manifest.model import Manifest
from cidboot.trust.measure import image_code_hash

if TYPE_CHECKING:
    from cidboot.trust.tpm.appraise import References, TpmReferences
    from cidboot.trust.tpm.evidence import TpmEvidence
# cidboot.trust.tpm (quote, event log, evidence, appraisal steps) is imported where a TPM device,
# TPM evidence or TPM references are in play: every agent appraises, few fleets have TPMs, and
# under TCG those modules cost an agent ~0.2 s before `agent ready`

AFFIRMING, WARNING, CONTRAINDICATED, NONE = "affirming", "warning", "contraindicated", "none"
_RANK = {AFFIRMING: 0, NONE: 1, WARNING: 2, CONTRAINDICATED: 3}
LAYER_ORDER = ("firmware", "bootstrap", "image")

# Which failing check is *the* reason (docs/trust.md, "Which failing check a refusal names"): when
# several checks fail, the most fundamental one explains the others, so a refusal
# names it first. The order: the evidence can be read (format); it is authentic (the chain, the
# quote's and the evidence's signatures); it is fresh (nonce, the quote's binding, the replay of
# the log); how the device booted (measured-boot, debug-mode: an unmeasured or debug boot has no
# firmware-derived identity, so it also fails `device` and the measurement checks, as effects);
# who it is (device, the AK's enrolment, the registered role); what code ran (firmware and UKI
# PCRs, the measurements against the manifest's references); which manifest it booted. A check
# not listed (a new one) ranks after these, in appraisal order.
ROOT_CAUSE_ORDER = ("format", "dice-chain", "tpm.quote-signature", "signature", "nonce", "tpm.nonce-binding",
                    "tpm.replay", "measured-boot", "debug-mode", "device", "tpm.ak-enrolled", "role",
                    "tpm.firmware", "tpm.pcr4-uki", "tpm.pcr11-sections", "tpm.pcr15-manifest", "measurements",
                    "manifest")


@dataclass
class CheckResult:
    name: str
    status: str
    reason: str

    def to_obj(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status, "reason": self.reason}


def root_cause_first(checks: list[CheckResult]) -> list[CheckResult]:
    """`checks` (the failing ones) ordered by ROOT_CAUSE_ORDER, unlisted checks last; ties keep
    the order they were made in. The first is the check a refusal names (the key broker's
    decision, the device console's `refused:` line)."""
    rank = {name: i for i, name in enumerate(ROOT_CAUSE_ORDER)}
    return sorted(checks, key=lambda c: rank.get(c.name, len(rank)))


@dataclass
class AppraisalResult:
    checks: list[CheckResult] = field(default_factory=list)
    device_id: str | None = None
    measurements: dict[str, str] = field(default_factory=dict)
    manifest_cid: str | None = None
    role: str | None = None  # the device registry's role for the device (None unless registered)
    claimed_role: str | None = None  # what the evidence claims: diagnostics only, never authority
    leaf_public_key: PublicKey | None = None
    # TPM evidence: the quoted PCRs as the event log replays them (set once the replay matched the
    # quote), so a log can say which PCR values were appraised (the key broker's does)
    tpm_pcrs: dict[int, bytes] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if not self.checks:
            return NONE
        return max((c.status for c in self.checks), key=lambda s: _RANK[s])

    @property
    def affirming(self) -> bool:
        return self.status == AFFIRMING

    def add(self, name: str, status: str, reason: str) -> None:
        self.checks.append(CheckResult(name, status, reason))

    def failing(self) -> list[CheckResult]:
        """The checks that are not affirming, root cause first (`root_cause_first`)."""
        return root_cause_first([c for c in self.checks if c.status != AFFIRMING])

    def to_obj(self) -> dict[str, Any]:
        return {"status": self.status, "device_id": self.device_id, "manifest_cid": self.manifest_cid,
                "role": self.role, "claimed_role": self.claimed_role, "measurements": self.measurements, "checks": [c.to_obj() for c in self.checks]}


def _check_role(res: AppraisalResult, claimed: str | None, rid: str, roots: DeviceRoots, registered: bool) -> None:
    """The role comes from the registry; the evidence's role claim must agree with it.

    A mismatch is contraindicated: a device registered as a sensor that claims "aggregator"
    would otherwise be sent (and trusted with) an aggregator's inputs. `res.role` is the
    registered role, never the claim."""
    if not registered:
        res.role = None
        res.add("role", CONTRAINDICATED, f"unregistered device: no registered role to compare the claimed role "
                                         f"{claimed!r} with")
        return
    want = roots.roles.get(rid)
    res.role = want
    if claimed == want:
        res.add("role", AFFIRMING, f"role {want!r} as registered" if want else "no role claimed or registered")
    else:
        res.add("role", CONTRAINDICATED, f"evidence claims role {claimed!r}, the device registry assigns {want!r}")


def reference_values(manifest: Manifest) -> dict[str, bytes | None]:
    """The reference value the signed manifest pins for each measured layer (None: unpinned).

    The image layer is always pinned: its code hash is derived from the manifest's own layer
    CIDs (cidboot.trust.measure.image_code_hash). Firmware and bootstrap are pinned only by the
    manifest's `measurements` (`imagebuilder build --reference NAME=HEX`)."""
    out: dict[str, bytes | None] = {name: manifest.measurements.get(name) for name in LAYER_ORDER}
    if out["image"] is None:
        out["image"] = _derived(manifest.layers, lambda: image_code_hash(manifest))
    return out


# Values derived from immutable inputs (a manifest's layer tuple of frozen Layers, a CID), kept
# by the input's identity: a verifier appraises every peer against the same manifest, and the
# image code hash re-encoded every layer CID and hashed them for each appraisal (~30 us of the
# ~850 us of a DICE appraisal). The entry holds the input itself, so an id is never reused
# while its entry lives; small, and cleared when full.
_DERIVED: dict[tuple[int, str], tuple[object, bytes]] = {}


def _derived(key: object, compute: Callable[[], bytes], kind: str = "image") -> bytes:
    hit = _DERIVED.get((id(key), kind))
    if hit is not None and hit[0] is key:
        return hit[1]
    value = compute()
    if len(_DERIVED) >= 64:
        _DERIVED.clear()
    _DERIVED[(id(key), kind)] = (key, value)
    return value


def unpinned_layers(manifest: Manifest) -> list[str]:
    """Measured layers the manifest gives no reference value for: appraisal cannot affirm them."""
    return [name for name, ref in reference_values(manifest).items() if ref is None]


def _check_measurements(res: AppraisalResult, ev: Evidence, chain: VerifiedChain, manifest: Manifest | None,
                        manifest_cid: CID | None, layers: tuple[str, ...] = LAYER_ORDER) -> None:
    """The chain's layers (`layers`: what each certificate measured, in order) against the
    manifest's reference values. A DICE device's chain measures firmware, bootstrap and image; a
    TPM device's chain starts at L1 and measures the image only (the TPM measured the rest)."""
    entries = chain.entries
    by_layer = {name: entries[i] for i, name in enumerate(layers) if i < len(entries)}
    res.measurements = {k: v.code_hash.hex() for k, v in by_layer.items()}
    for name, cert in by_layer.items():
        claimed = ev.measurements.get(name)
        if claimed is not None and claimed != cert.code_hash:
            res.add("measurements", CONTRAINDICATED, f"{name}: evidence claims a measurement its DICE chain does not carry")
            return
    if manifest is None:
        res.add("measurements", WARNING, "no manifest given: measurements not compared with reference values")
        return
    expected = {**manifest.measurements, **{k: v for k, v in reference_values(manifest).items() if v is not None}}
    unpinned = [name for name in by_layer if expected.get(name) is None]
    for name, cert in by_layer.items():
        ref = expected.get(name)
        if ref is not None and cert.code_hash != ref:
            res.add("measurements", CONTRAINDICATED,
                    f"{name} measurement {cert.code_hash.hex()[:16]}... differs from the manifest's {ref.hex()[:16]}...")
            return
    if "image" in by_layer and manifest_cid is not None:
        mcid = manifest_cid
        if by_layer["image"].config != _derived(mcid, lambda: hashlib.sha512(bytes(mcid)).digest(), "config"):
            res.add("measurements", CONTRAINDICATED, "image layer was configured with a different manifest")
            return
    pinned = [name for name in by_layer if name not in unpinned]
    if not by_layer:
        res.add("measurements", WARNING, "no measured layer: nothing compared with the signed manifest")
    elif unpinned:
        # fail closed: a layer the manifest gives no reference value for was measured but not
        # checked, so whatever firmware or bootstrap ran there is not vouched for
        res.add("measurements", WARNING,
                f"unpinned layer(s) {', '.join(unpinned)}: the signed manifest has no reference value, "
                f"any code is accepted there; {', '.join(pinned) or 'no layer'} match the signed manifest")
    else:
        res.add("measurements", AFFIRMING, f"{', '.join(pinned)} match the signed manifest")


def appraise(evidence: bytes, *, expected_nonce: bytes, roots: DeviceRoots, manifest: Manifest | None = None,
             manifest_cid: CID | None = None, allow_unmeasured: bool = False,
             tpm_references: References | None = None) -> AppraisalResult:
    """The one appraisal entry point: DICE-rooted or TPM-rooted evidence (the EAT says which),
    the same checks-list result. `tpm_references`: PCR 4/11 reference values derived from the
    bootstrap UKI (`TpmReferences.for_uki`), or one set per architecture (a signed registry's: the
    set of the UKI the device's log shows is used, `references_for_log`); PCR 15's come from
    `manifest` automatically."""
    res = AppraisalResult()
    try:
        ev = parse_evidence(evidence)
    except FormatError as e:
        res.add("format", CONTRAINDICATED, str(e))
        return res
    if ev.tpm is not None:
        return _appraise_tpm(res, ev, ev.tpm, expected_nonce=expected_nonce, roots=roots, manifest=manifest,
                             manifest_cid=manifest_cid, references=tpm_references)
    res.add("format", AFFIRMING, "well-formed EAT")
    res.claimed_role = ev.role
    res.manifest_cid = _cid_text(ev.manifest_cid, manifest_cid)
    _check_nonce(res, ev, expected_nonce)
    try:
        chain = verify_chain(ev.chain, allow_debug=True)
    except VerificationError as e:
        res.add("dice-chain", CONTRAINDICATED, f"broken DICE chain: {e}")
        return res
    res.add("dice-chain", AFFIRMING, f"{len(chain.entries)} certificate(s) verify to the root key")
    rid = chain.root_id  # derived from the root key by HKDF: compute once
    res.device_id = rid
    registered = rid in roots.keys and raw_public_bytes(roots.keys[rid]) == raw_public_bytes(chain.root_public_key)
    if registered:
        res.add("device", AFFIRMING, f"registered device {roots.names.get(rid) or rid}")
    else:
        res.add("device", CONTRAINDICATED, f"unknown device: root {rid} is not registered")
    _check_role(res, ev.role, rid, roots, registered)
    _check_signature_and_debug(res, ev, chain)
    measured = ev.boot_mode == "measured" and len(chain.entries) >= len(LAYER_ORDER)
    if measured:
        res.add("measured-boot", AFFIRMING, "firmware, bootstrap and image were each measured")
    else:
        why = f"boot mode {ev.boot_mode}, {len(chain.entries)} measured layer(s)"
        res.add("measured-boot", WARNING if allow_unmeasured else CONTRAINDICATED, f"unmeasured boot: {why}")
    _check_measurements(res, ev, chain, manifest, manifest_cid)
    _check_manifest(res, ev, manifest_cid)
    return res


def _cid_text(cid: CID | None, expected: CID | None) -> str | None:
    """`str(cid)`; the expected manifest's text is kept (`_derived`): every appraisal against
    one manifest names it, and a CID's base32 text is re-encoded each time it is asked for."""
    if cid is None:
        return None
    if expected is not None and cid == expected:
        return _derived(expected, lambda: str(expected).encode(), "text").decode()
    return str(cid)


def _check_nonce(res: AppraisalResult, ev: Evidence, expected_nonce: bytes) -> None:
    if hmac.compare_digest(ev.nonce, expected_nonce):
        res.add("nonce", AFFIRMING, "matches this challenge")
    else:
        res.add("nonce", CONTRAINDICATED, "nonce does not match the challenge: replayed or stale evidence")


def _check_signature_and_debug(res: AppraisalResult, ev: Evidence, chain: VerifiedChain) -> None:
    try:
        cose.verify1_attached(ev.sign1, chain.leaf_public_key)
        res.add("signature", AFFIRMING, "signed by the DICE leaf key")
        res.leaf_public_key = chain.leaf_public_key
    except VerificationError as e:
        res.add("signature", CONTRAINDICATED, f"evidence not signed by the chain's leaf key: {e}")
    debug = [i + 1 for i, e in enumerate(chain.entries) if e.mode == DiceMode.DEBUG]
    if debug:
        res.add("debug-mode", CONTRAINDICATED, f"layer(s) {debug} booted in debug mode")
    else:
        res.add("debug-mode", AFFIRMING, "no layer in debug mode")


def _check_manifest(res: AppraisalResult, ev: Evidence, manifest_cid: CID | None) -> None:
    if manifest_cid is not None:
        if ev.manifest_cid is not None and ev.manifest_cid.multihash == manifest_cid.multihash:
            res.add("manifest", AFFIRMING, f"booted manifest {_cid_text(manifest_cid, manifest_cid)}")
        else:
            res.add("manifest", CONTRAINDICATED, f"booted manifest {ev.manifest_cid}, expected {manifest_cid}")


def with_bootstrap_events(refs: TpmReferences, manifest: Manifest | None, manifest_cid: CID | None) -> TpmReferences:
    """`refs` plus the PCR 15 events derived from the signed manifest (unless already there: a
    verifier that appraises many devices against one manifest derives them once, see
    agent.verifier.Verifier; `with_bootstrap_events_all` for a set per architecture)."""
    from cidboot.trust.tpm.appraise import TpmReferences
    from cidboot.trust.tpm.reference import bootstrap_events

    if manifest is None or manifest_cid is None or refs.bootstrap_events:
        return refs
    return TpmReferences(refs.applications, refs.stub_events, bootstrap_events(manifest_cid, manifest))


def with_bootstrap_events_all(refs: References, manifest: Manifest | None, manifest_cid: CID | None) -> References:
    """`with_bootstrap_events` of one set, or of each set of a per-architecture mapping."""
    from cidboot.trust.tpm.appraise import TpmReferences

    if isinstance(refs, TpmReferences):
        return with_bootstrap_events(refs, manifest, manifest_cid)
    return {arch: with_bootstrap_events(r, manifest, manifest_cid) for arch, r in refs.items()}


TPM_LAYERS = ("image",)  # a TPM device's DICE chain starts at L1: its one certificate measures the image



def tpm_check_names() -> dict[str, str]:
    """TPM appraisal steps -> the names they have in the checks list (and in ROOT_CAUSE_ORDER).
    A function, not a table, so that only TPM evidence imports the TPM modules."""
    from cidboot.trust.tpm import appraise as steps

    return {steps.AK_ENROLLED: "tpm.ak-enrolled", steps.QUOTE_SIGNATURE: "tpm.quote-signature",
            steps.NONCE_FRESH: "tpm.nonce-binding", steps.REPLAY: "tpm.replay", steps.FIRMWARE: "tpm.firmware",
            steps.PCR4: "tpm.pcr4-uki", steps.PCR11: "tpm.pcr11-sections", steps.PCR15: "tpm.pcr15-manifest"}

def _appraise_tpm(res: AppraisalResult, ev: Evidence, tpm: TpmEvidence, *, expected_nonce: bytes, roots: DeviceRoots,
                  manifest: Manifest | None, manifest_cid: CID | None,
                  references: References | None) -> AppraisalResult:
    """TPM-rooted evidence: the quote (AK enrolled, signature, qualifying data = SHA-256(nonce ||
    L1 key)), the UEFI log plus the bootstrap's events replayed to the quoted PCRs, the firmware
    baseline, PCR 4/11 against the UKI, PCR 15 against the signed manifest; then the DICE chain
    from L1 down to the alias key that signed the EAT, and the role from the registry."""
    from cidboot.trust.tpm import appraise as steps
    from cidboot.trust.tpm.appraise import (
        TpmEnrolment,
        TpmReferences,
        TpmState,
        references_for_log,
        tpm_checks,
    )
    from cidboot.trust.tpm.evidence import device_id as tpm_device_id
    from cidboot.trust.tpm.evidence import qualifying_data
    from cidboot.trust.tpm.quote import parse_public

    names = tpm_check_names()
    outcome = {steps.PASS: AFFIRMING, steps.WARN: WARNING, steps.FAIL: CONTRAINDICATED}
    res.add("format", AFFIRMING, f"well-formed EAT, TPM-rooted: quote over PCRs {list(tpm.pcrs)}, "
                                 f"{len(tpm.bootstrap_events)} bootstrap event(s)")
    _check_nonce(res, ev, expected_nonce)
    try:
        chain = verify_chain(ev.chain, allow_debug=True)
    except VerificationError as e:
        res.add("dice-chain", CONTRAINDICATED, f"broken DICE chain from L1: {e}")
        return res
    res.add("dice-chain", AFFIRMING, f"{len(chain.entries)} certificate(s) verify to L1's key")
    try:
        ak_name = parse_public(tpm.ak_public).name
    except FormatError as e:
        res.add("tpm.ak-enrolled", CONTRAINDICATED, f"the AK is not a TPM attestation key: {e}")
        return res
    did = tpm_device_id(ak_name)
    res.device_id = did
    device = roots.tpm.get(did)
    if device is not None:
        res.add("device", AFFIRMING, f"enrolled TPM device {roots.names.get(did) or did}")
    else:
        res.add("device", CONTRAINDICATED, f"unknown device: AK {ak_name.hex()[:20]}... (device {did}) is not enrolled")
    _check_role(res, ev.role, did, roots, device is not None)
    enrolment = device.enrolment() if device is not None else TpmEnrolment(frozenset())
    chosen = references_for_log(references, tpm.uefi_log) if references is not None else None
    refs = with_bootstrap_events(chosen or TpmReferences(()), manifest, manifest_cid)
    try:
        binding = qualifying_data(expected_nonce, chain.root_public_key)
        log_events = tpm.log_events()
    except FormatError as e:
        res.add("tpm.nonce-binding", CONTRAINDICATED, str(e))
        return res
    quoted: tuple[int, ...] = ()
    for c in tpm_checks(attest=tpm.quote, signature=tpm.signature, ak_public=tpm.ak_public, event_log=tpm.uefi_log,
                        nonce=binding, enrolment=enrolment, references=refs, extra_events=log_events,
                        uki_known=chosen is not None, state=(st := TpmState())):
        reason = c.reason
        if c.name == steps.NONCE_FRESH and c.outcome == steps.PASS:
            reason = "the quote's qualifying data is SHA-256(this challenge || L1's key): fresh, and about this chain"
        if c.name == steps.REPLAY and c.outcome == steps.PASS and st.quote is not None:
            quoted = tuple(sorted({i for _, idx in st.quote.selection for i in idx}))
            if quoted != tpm.pcrs:
                res.add("tpm.replay", CONTRAINDICATED, f"the evidence says PCRs {list(tpm.pcrs)} were quoted, "
                                                       f"the quote selects {list(quoted)}")
                return res
            res.tpm_pcrs = {i: st.pcrs[i] for i in quoted}
        res.add(names[c.name], outcome[c.outcome], reason)
    if manifest is None or manifest_cid is None:
        res.add("tpm.pcr15-manifest", WARNING, "no manifest given: the bootstrap's events are not compared")
    _check_signature_and_debug(res, ev, chain)
    if chain.entries:
        res.add("measured-boot", AFFIRMING, "firmware, UKI and bootstrap measured into the TPM; the image by L1")
    else:
        res.add("measured-boot", CONTRAINDICATED, "L1 issued no certificate: the image was not measured")
    _check_measurements(res, ev, chain, manifest, manifest_cid, TPM_LAYERS)
    _check_manifest(res, ev, manifest_cid)
    return res

