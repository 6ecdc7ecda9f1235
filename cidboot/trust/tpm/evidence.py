"""TPM evidence as it rides in cidboot's EAT: the quote, the AK, the UEFI event log and the
bootstrap's own PCR 15 events, with one strict CBOR encoding (docs/tpm.md, "Evidence format").

A TPM-rooted device has no UDS: the chain of trust is the TPM's quote over the PCRs UEFI and
the bootstrap (L1) extended, and the DICE chain starts at L1. The quote vouches for L1's key
through its qualifying data, `qualifying_data(nonce, l1_public_key)` = SHA-256(nonce ||
L1 COSE_Key bytes): the one rule the device (which asks the TPM to quote) and the verifier
(which checks extraData) both call, so the two cannot drift apart.

Encoding (CDDL; every map has exactly these keys, integers and lengths in shortest form, no
indefinite lengths, no tags, and the bytes are the one encoding `encode` produces):

    tpm-evidence = {
      1: bstr .size (1..1024),          ; quote: the TPMS_ATTEST the AK signed (TPM2B_ATTEST buffer)
      2: bstr .size (1..1024),          ; signature: TPMT_SIGNATURE
      3: bstr .size (1..1024),          ; ak-public: TPM2B_PUBLIC of the AK (with its size prefix)
      4: bstr .size (0..786432),        ; uefi-log: the firmware's crypto-agile event log, as read
                                        ;   from binary_bios_measurements (closed at ExitBootServices)
      5: [* bootstrap-event],           ; L1's own events, in the order it extended them
      6: [+ uint .le 23],               ; the SHA-256 PCRs the quote selects, ascending
    }
    bootstrap-event = {
      1: uint .le 23,                   ; pcr (BOOTSTRAP_PCR = 15)
      2: "manifest" / "layer",          ; type: what the CID names
      3: bstr,                          ; cid: the binary CID the bootstrap verified
      4: bstr .size 32,                 ; digest: the SHA-256 extended = SHA-256(event data)
    }

The event data (what the digest is the hash of) is not carried: it is the readable line
`cidboot manifest <cid>` or `cidboot layer <i> <cid>` (i: the layer's position among the layer
events), rebuilt from the CID (`BootstrapEvent.data`), so a verifier never trusts text the
digest does not cover. The TCG event type of every bootstrap event is EV_IPL.

Decoding checks form only (types, sizes, order); whether anything is true is appraisal's job
(cidboot.trust.tpm.appraise, via cidboot.trust.appraisal). Stdlib, cbor2 and `cryptography`:
the bootstrap and agents import this.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

from cidboot.errors import FormatError
from cidboot.ipld.cid import CID
from cidboot.trust import cose
from cidboot.trust.cose import CoseFormatError, PublicKey
from cidboot.trust.cose_key import encode_public_key_bytes
from cidboot.trust.dice.derive import derive_id
from cidboot.trust.tpm.errors import TpmFormatError
from cidboot.trust.tpm.eventlog import ALG_SHA256, EV_IPL, NUM_PCRS, Event
from cidboot.trust.tpm.quote import MAX_ATTEST
from cidboot.trust.tpm.reference import BOOTSTRAP_EVENT_TYPE, BOOTSTRAP_PCR

MAX_SIGNATURE = 1024  # TPMT_SIGNATURE: RSA-4096 is 518 bytes
MAX_AK_PUBLIC = 1024  # TPM2B_PUBLIC: an RSA-4096 AK is ~600 bytes
MAX_UEFI_LOG = 768 * 1024  # real server logs (with dbx) are tens to a few hundred KiB; the EAT is <= 1 MiB
MAX_BOOTSTRAP_EVENTS = 1 + 1024  # the manifest and its layers
MAX_CID = 128
KINDS = ("manifest", "layer")

_Q, _SIG, _AK, _LOG, _EVENTS, _PCRS = 1, 2, 3, 4, 5, 6
_E_PCR, _E_TYPE, _E_CID, _E_DIGEST = 1, 2, 3, 4


class TpmEvidenceFormatError(TpmFormatError):
    """The TPM evidence claim is not well-formed (the message names the field)."""


def qualifying_data(nonce: bytes, l1_public_key: PublicKey) -> bytes:
    """The quote's qualifying data (extraData): SHA-256(nonce || L1's COSE_Key bytes).

    The device passes this to TPM2_Quote, the verifier compares the quote's extraData with it:
    the quote is then both fresh (the verifier's nonce) and about this L1 key, the root of the
    DICE chain that follows, so a chain cannot be moved onto another device's quote. The
    COSE_Key bytes are the project's canonical encoding (`encode_public_key_bytes`), computed
    from the key, so both sides get the same bytes whatever encoding carried it."""
    if not isinstance(nonce, bytes) or not nonce:
        raise TpmEvidenceFormatError("qualifying data: the nonce must be non-empty bytes")
    return hashlib.sha256(nonce + encode_public_key_bytes(l1_public_key)).digest()


def device_id(ak_name: bytes) -> str:
    """A TPM device's id in the device registry: the DICE-style ID (cidboot.trust.dice.derive_id)
    of its AK's TPM name, the same 40-hex-digit shape as a DICE device's id of its root key."""
    return derive_id(ak_name).hex()


def ueid(ak_name: bytes) -> bytes:
    """The EAT `ueid` of a TPM device: RAND type, from the AK name (as eat.ueid_for a root key)."""
    return bytes([0x01]) + hashlib.sha256(ak_name).digest()[:16]


@dataclass(frozen=True)
class BootstrapEvent:
    """One event L1 extended into its PCR: what (`kind`: the manifest or a layer), which CID, and
    the SHA-256 digest it extended (the hash of `data(layer_index)`)."""

    pcr: int
    kind: str
    cid: bytes
    digest: bytes

    def data(self, layer_index: int) -> bytes:
        """The event's data line; `layer_index` is its position among the layer events."""
        cid = CID.decode(self.cid)
        if self.kind == "manifest":
            return f"cidboot manifest {cid}".encode()
        return f"cidboot layer {layer_index} {cid}".encode()

    @classmethod
    def measure(cls, kind: str, cid: CID, layer_index: int = 0, pcr: int = BOOTSTRAP_PCR) -> BootstrapEvent:
        """The event for `cid` (the device calls this, then extends `digest` into `pcr`)."""
        if kind not in KINDS:
            raise TpmEvidenceFormatError(f"bootstrap event type must be one of {KINDS}, got {kind!r}")
        ev = cls(pcr, kind, bytes(cid), b"")
        return cls(pcr, kind, bytes(cid), hashlib.sha256(ev.data(layer_index)).digest())

    def to_obj(self) -> dict[int, Any]:
        return {_E_PCR: self.pcr, _E_TYPE: self.kind, _E_CID: self.cid, _E_DIGEST: self.digest}


def measure_manifest(manifest_cid: CID, layer_cids: Iterable[CID], pcr: int = BOOTSTRAP_PCR) -> list[BootstrapEvent]:
    """All the events a bootstrap extends for a manifest and its layers, in order."""
    return [BootstrapEvent.measure("manifest", manifest_cid, pcr=pcr)] + [
        BootstrapEvent.measure("layer", cid, i, pcr) for i, cid in enumerate(layer_cids)]


@dataclass(frozen=True)
class TpmEvidence:
    """The TPM part of a TPM-rooted device's evidence (see the module docstring for the encoding)."""

    quote: bytes  # TPMS_ATTEST
    signature: bytes  # TPMT_SIGNATURE
    ak_public: bytes  # TPM2B_PUBLIC
    uefi_log: bytes  # TCG crypto-agile event log of the firmware
    bootstrap_events: tuple[BootstrapEvent, ...]
    pcrs: tuple[int, ...]  # SHA-256 PCRs selected in the quote

    def __post_init__(self) -> None:
        _check(self)

    def to_obj(self) -> dict[int, Any]:
        return {_Q: self.quote, _SIG: self.signature, _AK: self.ak_public, _LOG: self.uefi_log,
                _EVENTS: [e.to_obj() for e in self.bootstrap_events], _PCRS: list(self.pcrs)}

    def encode(self) -> bytes:
        return cbor2.dumps(self.to_obj(), canonical=True)

    @classmethod
    def from_obj(cls, obj: Any) -> TpmEvidence:
        """From the decoded CBOR map (as nested in the EAT); TpmEvidenceFormatError if malformed."""
        m = _map(obj, {_Q, _SIG, _AK, _LOG, _EVENTS, _PCRS}, "TPM evidence", "{1: quote, 2: signature, "
                 "3: ak-public, 4: uefi-log, 5: bootstrap-events, 6: pcrs}")
        events = m[_EVENTS]
        if not isinstance(events, list):
            raise TpmEvidenceFormatError("TPM evidence: bootstrap events (5) must be an array")
        pcrs = m[_PCRS]
        if not isinstance(pcrs, list):
            raise TpmEvidenceFormatError("TPM evidence: pcrs (6) must be an array")
        if len(events) > MAX_BOOTSTRAP_EVENTS:
            raise TpmEvidenceFormatError(f"TPM evidence: {len(events)} bootstrap events exceed {MAX_BOOTSTRAP_EVENTS}")
        evs = []
        for i, e in enumerate(events):
            em = _map(e, {_E_PCR, _E_TYPE, _E_CID, _E_DIGEST}, f"TPM evidence: bootstrap event {i}",
                      "{1: pcr, 2: type, 3: cid, 4: digest}")
            evs.append(BootstrapEvent(em[_E_PCR], em[_E_TYPE], em[_E_CID], em[_E_DIGEST]))
        return cls(m[_Q], m[_SIG], m[_AK], m[_LOG], tuple(evs), tuple(pcrs))

    @classmethod
    def decode(cls, data: bytes) -> TpmEvidence:
        """Strict decode of `encode`'s bytes: anything else (another encoding of the same values
        too) is a TpmEvidenceFormatError."""
        try:
            obj = cose.cbor_loads_exact(data, "TPM evidence")
        except CoseFormatError as e:
            raise TpmEvidenceFormatError(str(e)) from None
        ev = cls.from_obj(obj)
        if ev.encode() != bytes(data):
            raise TpmEvidenceFormatError("TPM evidence: not in its canonical encoding (map order, tags or floats)")
        return ev

    def log_events(self, first_index: int = 0) -> list[Event]:
        """The bootstrap events as event-log records (EV_IPL, SHA-256 digest, the data line), to be
        replayed after the firmware log; `index` continues from `first_index`."""
        out, layer = [], 0
        for k, e in enumerate(self.bootstrap_events):
            out.append(Event(first_index + k, -1, e.pcr, BOOTSTRAP_EVENT_TYPE, {ALG_SHA256: e.digest}, e.data(layer)))
            layer += e.kind == "layer"
        return out


def _map(obj: Any, keys: set[int], where: str, shape: str) -> Mapping[int, Any]:
    if not isinstance(obj, dict) or set(obj) != keys or not all(type(k) is int for k in obj):
        raise TpmEvidenceFormatError(f"{where}: must be the map {shape}")
    return obj


def _bytes(v: Any, where: str, lo: int, hi: int) -> None:
    if type(v) is not bytes or not lo <= len(v) <= hi:
        n = len(v) if isinstance(v, bytes | bytearray) else type(v).__name__
        raise TpmEvidenceFormatError(f"TPM evidence: {where} must be {lo}..{hi} bytes, got {n}")


def _pcr(v: Any, where: str) -> None:
    if type(v) is not int or not 0 <= v < NUM_PCRS:
        raise TpmEvidenceFormatError(f"TPM evidence: {where} must be a PCR index 0..{NUM_PCRS - 1}, got {v!r}")


def _check(ev: TpmEvidence) -> None:
    _bytes(ev.quote, "quote (1)", 1, MAX_ATTEST)
    _bytes(ev.signature, "signature (2)", 1, MAX_SIGNATURE)
    _bytes(ev.ak_public, "ak-public (3)", 1, MAX_AK_PUBLIC)
    _bytes(ev.uefi_log, "uefi-log (4)", 0, MAX_UEFI_LOG)
    if not isinstance(ev.bootstrap_events, tuple) or len(ev.bootstrap_events) > MAX_BOOTSTRAP_EVENTS:
        raise TpmEvidenceFormatError(f"TPM evidence: at most {MAX_BOOTSTRAP_EVENTS} bootstrap events (a tuple)")
    for i, e in enumerate(ev.bootstrap_events):
        where = f"bootstrap event {i}"
        if not isinstance(e, BootstrapEvent):
            raise TpmEvidenceFormatError(f"TPM evidence: {where} is not a BootstrapEvent")
        _pcr(e.pcr, f"{where} pcr")
        if type(e.kind) is not str or e.kind not in KINDS:
            raise TpmEvidenceFormatError(f"TPM evidence: {where} type must be one of {KINDS}, got {e.kind!r}")
        _bytes(e.cid, f"{where} cid", 1, MAX_CID)
        try:
            CID.decode(e.cid)
        except FormatError as err:
            raise TpmEvidenceFormatError(f"TPM evidence: {where} cid: {err}") from None
        _bytes(e.digest, f"{where} digest", 32, 32)
    if not isinstance(ev.pcrs, tuple) or not ev.pcrs:
        raise TpmEvidenceFormatError("TPM evidence: pcrs (6) must list at least one PCR")
    for p in ev.pcrs:
        _pcr(p, "pcrs (6) entry")
    if list(ev.pcrs) != sorted(set(ev.pcrs)):
        raise TpmEvidenceFormatError(f"TPM evidence: pcrs (6) must be ascending without repeats, got {list(ev.pcrs)}")


def selection_of(pcrs: Sequence[int]) -> tuple[int, ...]:
    """A PCR selection in the evidence's form (ascending, no repeats)."""
    return tuple(sorted(set(pcrs)))


# the TCG type every bootstrap event is recorded with (exported for the device side)
EVENT_TYPE = EV_IPL
assert EVENT_TYPE == BOOTSTRAP_EVENT_TYPE


# -- the stage key binding of a TPM device's signed stage events ----------------------------------
#: the "nonce" of the quote that binds a stage's L1 key to the device's AK for its stage events
#: (bootstrap.server.fleet): not a challenge, a label, so the binding is made once per boot stage
EVENTS_NONCE = hashlib.sha256(b"cidboot stage events").digest()


@dataclass(frozen=True)
class KeyBinding:
    """`{1: quote, 2: signature, 3: ak-public}`: a quote by the device's AK whose qualifying data
    is `qualifying_data(EVENTS_NONCE, L1 key)`. It says "this TPM vouches for this L1 key", so a
    stage event signed by a chain rooted at that key is that device's (the fleet looks the AK up
    in the registry's TPM entries, as appraisal does). It is not fresh on purpose: replaying it
    gains nothing without L1's private key, which only the TPM-bound CDI_1 gives."""

    quote: bytes
    signature: bytes
    ak_public: bytes

    def encode(self) -> bytes:
        return cbor2.dumps({_Q: self.quote, _SIG: self.signature, _AK: self.ak_public}, canonical=True)

    @classmethod
    def decode(cls, data: bytes) -> KeyBinding:
        try:
            obj = cose.cbor_loads_exact(data, "TPM key binding")
        except CoseFormatError as e:
            raise TpmEvidenceFormatError(str(e)) from None
        m = _map(obj, {_Q, _SIG, _AK}, "TPM key binding", "{1: quote, 2: signature, 3: ak-public}")
        _bytes(m[_Q], "key binding quote (1)", 1, MAX_ATTEST)
        _bytes(m[_SIG], "key binding signature (2)", 1, MAX_SIGNATURE)
        _bytes(m[_AK], "key binding ak-public (3)", 1, MAX_AK_PUBLIC)
        kb = cls(m[_Q], m[_SIG], m[_AK])
        if kb.encode() != bytes(data):
            raise TpmEvidenceFormatError("TPM key binding: not in its canonical encoding")
        return kb
