"""Reference values derived from a signed manifest, exported as a CoRIM (draft-ietf-rats-corim).

`imagebuilder references MANIFEST --corim` writes this so that verifiers other than cidboot's
(Veraison, say) can appraise cidboot devices against the same reference values cidboot derives
itself, never a hand-kept list. The subset written (and read back by `parse_corim`):

    corim    = #6.501({ 0: "cidboot:<manifest CID>",             ; id
                        1: [ #6.506(bytes .cbor comid) ],         ; tags: exactly one CoMID
                        4: { 1: #6.1(<manifest expiry, unix s>) } ; rim-validity: not-after
                      })                                          ; unsigned (see below)
    comid    = { 1: { 0: "cidboot:<manifest CID>" },             ; tag-identity
                 4: { 0: [ + reference-triple ] } }               ; triples: reference-triples only
    reference-triple = [ { 0: { 1: "cidboot", 2: model, 3: layer } },   ; environment: class
                         [ + { 0: mkey text, 1: mval } ] ]
    mval     = { 2: [ [ alg, digest ] ] }                         ; digests (named-info: 1 sha-256, 8 sha-512)
             / { 14: { pcr: [ [ 1, value ] ] } }                  ; integrity-registers

One environment per measured stage:
- `<name> image` (layer 2): mkey "image", the DICE code hash of the image (SHA-512 over the
  manifest's layer CIDs, what L1 certifies);
- `<name> bootstrap events` (layer 1): one measurement per PCR 15 event the bootstrap extends
  (mkey = the event's data line, `cidboot manifest <cid>` / `cidboot layer <i> <cid>`, digest its
  SHA-256), then mkey "pcr15" with the PCR 15 value they extend to from zero;
- `firmware` / `bootstrap` (layers 0/1) when the manifest pins their DICE code hashes;
- with the bootstrap UKI (`--uki`): `bootstrap UKI` (layer 1): "uki" and "kernel" (their PCR 4
  Authenticode digests), each systemd-stub section event, and "pcr11", the PCR 11 value of those
  events alone (nothing else extends PCR 11 before the bootstrap runs on OVMF or a server).

Unsigned on purpose: every value is derived from the signed manifest (and the UKI its CID
names), so the manifest's signatures are the authority; a COSE_Sign1 wrapper would add a second
signer to trust for the same facts. Not written: endorsements, attest-key or identity triples,
entities, profile, linked tags.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import cbor2

from cidboot.errors import FormatError
from cidboot.ipld.cid import CID
from cidboot.trust import cose
from cidboot.trust.cose import CoseFormatError
from cidboot.trust.manifest.model import Manifest
from cidboot.trust.measure import image_code_hash
from cidboot.trust.tpm.reference import (
    BOOTSTRAP_PCR,
    STUB_PCR,
    bootstrap_events,
    uki_applications,
    uki_pcr11_events,
)

TAG_CORIM, TAG_COMID, TAG_EPOCH = 501, 506, 1
SHA256, SHA512 = 1, 8  # IANA Named Information hash algorithm ids
VENDOR = "cidboot"
MAX_CORIM = 1 << 20
_ALG_SIZE = {SHA256: 32, SHA512: 64}
_ARRAY = (list, tuple)  # cbor2 decodes arrays inside tags as tuples, maps as frozendicts


class CorimFormatError(FormatError):
    """Bytes that are not a CoRIM of the subset this project writes (the message names the part)."""


@dataclass(frozen=True)
class Measurement:
    """One reference measurement: its key and either digests or integrity-register values."""

    mkey: str
    digests: tuple[tuple[int, bytes], ...] = ()
    registers: tuple[tuple[int, tuple[tuple[int, bytes], ...]], ...] = ()

    def to_obj(self) -> dict[int, Any]:
        mval: dict[int, Any] = {2: [[a, d] for a, d in self.digests]} if self.digests else {
            14: {r: [[a, d] for a, d in ds] for r, ds in self.registers}}
        return {0: self.mkey, 1: mval}


@dataclass(frozen=True)
class Environment:
    model: str
    layer: int
    measurements: tuple[Measurement, ...]

    def to_obj(self) -> list[Any]:
        return [{0: {1: VENDOR, 2: self.model, 3: self.layer}}, [m.to_obj() for m in self.measurements]]


@dataclass(frozen=True)
class Corim:
    id: str
    not_after: int
    environments: tuple[Environment, ...]

    def measurement(self, model: str, mkey: str) -> Measurement:
        for env in self.environments:
            if env.model == model:
                for m in env.measurements:
                    if m.mkey == mkey:
                        return m
        raise KeyError(f"{model}/{mkey}")


def _extend(events: Sequence[bytes]) -> bytes:
    pcr = bytes(32)
    for d in events:
        pcr = hashlib.sha256(pcr + d).digest()
    return pcr


def references(manifest_cid: CID, manifest: Manifest, uki: bytes | None = None) -> Corim:
    """Every reference value derivable from the signed manifest (and the bootstrap UKI)."""
    envs = [Environment(f"{manifest.name} image", 2, (Measurement("image", ((SHA512, image_code_hash(manifest)),)),))]
    boot = bootstrap_events(manifest_cid, manifest)
    envs.append(Environment(f"{manifest.name} bootstrap events", 1, tuple(
        [Measurement(e.what, ((SHA256, e.digest),)) for e in boot]
        + [Measurement(f"pcr{BOOTSTRAP_PCR}", registers=((BOOTSTRAP_PCR, ((SHA256, _extend([e.digest for e in boot])),)),))])))
    for layer, name in enumerate(("firmware", "bootstrap")):
        if name in manifest.measurements:
            envs.append(Environment(name, layer, (Measurement(name, ((SHA512, manifest.measurements[name]),)),)))
    if uki is not None:
        apps = uki_applications(uki)
        stub = uki_pcr11_events(uki)
        envs.append(Environment("bootstrap UKI", 1, tuple(
            [Measurement("uki", ((SHA256, apps[0]),)), Measurement("kernel", ((SHA256, apps[1]),))]
            + [Measurement(e.what, ((SHA256, e.digest),)) for e in stub]
            + [Measurement(f"pcr{STUB_PCR}", registers=((STUB_PCR, ((SHA256, _extend([e.digest for e in stub])),)),))])))
    return Corim(f"cidboot:{manifest_cid}", manifest.expires, tuple(envs))


def encode(corim: Corim) -> bytes:
    comid = {1: {0: corim.id}, 4: {0: [env.to_obj() for env in corim.environments]}}
    body = {0: corim.id, 1: [cbor2.CBORTag(TAG_COMID, cbor2.dumps(comid, canonical=True))],
            4: {1: cbor2.CBORTag(TAG_EPOCH, corim.not_after)}}
    return cbor2.dumps(cbor2.CBORTag(TAG_CORIM, body), canonical=True)


def export(manifest_cid: CID, manifest: Manifest, uki: bytes | None = None) -> bytes:
    """`references` encoded as a tagged unsigned CoRIM."""
    return encode(references(manifest_cid, manifest, uki))


def _loads(data: Any, what: str) -> Any:
    try:
        return cose.cbor_loads_exact(data, what)
    except CoseFormatError as e:
        raise CorimFormatError(str(e)) from None


def _tagged(obj: Any, tag: int, what: str) -> Any:
    if not isinstance(obj, cbor2.CBORTag) or obj.tag != tag:
        raise CorimFormatError(f"{what} must be CBOR tag {tag}")
    return obj.value


def _keys(obj: Any, required: set[int], optional: set[int], what: str) -> Mapping[int, Any]:
    if not isinstance(obj, Mapping) or not required <= set(obj) or set(obj) - required - optional:
        raise CorimFormatError(f"{what}: must be a map with keys {sorted(required)} (and optionally {sorted(optional)})")
    return obj


def _digests(obj: Any, what: str) -> tuple[tuple[int, bytes], ...]:
    if not isinstance(obj, _ARRAY) or not obj:
        raise CorimFormatError(f"{what}: digests must be a non-empty array")
    out = []
    for d in obj:
        if not isinstance(d, _ARRAY) or len(d) != 2 or type(d[0]) is not int or d[0] not in _ALG_SIZE or type(d[1]) is not bytes \
                or len(d[1]) != _ALG_SIZE[d[0]]:
            raise CorimFormatError(f"{what}: a digest must be [1 (sha-256) / 8 (sha-512), bytes of that size]")
        out.append((d[0], d[1]))
    return tuple(out)


def parse_corim(data: bytes) -> Corim:
    """Decode a CoRIM of the subset `encode` writes; CorimFormatError for anything else."""
    if len(data) > MAX_CORIM:
        raise CorimFormatError(f"CoRIM of {len(data)} bytes exceeds {MAX_CORIM}")
    body = _keys(_tagged(_loads(data, "CoRIM"), TAG_CORIM, "CoRIM"), {0, 1}, {4}, "corim-map")
    cid = body[0]
    if not isinstance(cid, str) or not cid:
        raise CorimFormatError("corim-map: id must be text")
    not_after = 0
    if 4 in body:
        validity = _keys(body[4], {1}, {0}, "rim-validity")
        when = validity[1]  # cbor2 turns tag 1 into a datetime
        not_after = int(when.timestamp()) if isinstance(when, datetime) and when.timestamp() == int(when.timestamp()) \
            else _tagged(when, TAG_EPOCH, "rim-validity not-after")
        if type(not_after) is not int:
            raise CorimFormatError("rim-validity: not-after must be an integer epoch time")
    tags = body[1]
    if not isinstance(tags, _ARRAY) or len(tags) != 1:
        raise CorimFormatError("corim-map: tags must hold exactly one CoMID")
    raw = _tagged(tags[0], TAG_COMID, "tag")
    if type(raw) is not bytes:
        raise CorimFormatError("CoMID: tag 506 must wrap a byte string")
    comid = _keys(_loads(raw, "CoMID"), {1, 4}, {0}, "concise-mid-tag")
    ident = _keys(comid[1], {0}, {1}, "tag-identity")
    if ident[0] != cid:
        raise CorimFormatError("CoMID tag-id must equal the CoRIM id")
    triples = _keys(comid[4], {0}, set(), "triples-map")[0]
    if not isinstance(triples, _ARRAY) or not triples:
        raise CorimFormatError("triples-map: reference-triples must be a non-empty array")
    envs = []
    for i, t in enumerate(triples):
        where = f"reference-triple {i}"
        if not isinstance(t, _ARRAY) or len(t) != 2 or not isinstance(t[1], _ARRAY) or not t[1]:
            raise CorimFormatError(f"{where}: must be [environment-map, [+ measurement-map]]")
        cls = _keys(_keys(t[0], {0}, set(), f"{where} environment")[0], {1, 2, 3}, set(), f"{where} class")
        if cls[1] != VENDOR or not isinstance(cls[2], str) or type(cls[3]) is not int or cls[3] < 0:
            raise CorimFormatError(f"{where}: class must be {{1: 'cidboot', 2: model, 3: layer}}")
        ms = []
        for j, m in enumerate(t[1]):
            mm = _keys(m, {0, 1}, set(), f"{where} measurement {j}")
            if not isinstance(mm[0], str):
                raise CorimFormatError(f"{where} measurement {j}: mkey must be text")
            mval = mm[1]
            if isinstance(mval, Mapping) and set(mval) == {2}:
                ms.append(Measurement(mm[0], _digests(mval[2], f"{where} measurement {j}")))
            elif isinstance(mval, Mapping) and set(mval) == {14} and isinstance(mval[14], Mapping) and mval[14]:
                regs = []
                for r, ds in mval[14].items():
                    if type(r) is not int or not 0 <= r < 24:
                        raise CorimFormatError(f"{where} measurement {j}: integrity register ids must be PCRs 0..23")
                    regs.append((r, _digests(ds, f"{where} measurement {j} register {r}")))
                ms.append(Measurement(mm[0], registers=tuple(regs)))
            else:
                raise CorimFormatError(f"{where} measurement {j}: mval must be {{2: digests}} or {{14: registers}}")
        envs.append(Environment(cls[2], cls[3], tuple(ms)))
    return Corim(cid, not_after, tuple(envs))
