"""The signed device registry: which device roots a fleet's verifiers and peers trust.

`device-roots.json` (cidboot.trust.appraisal.DeviceRoots) is a local file; a booted agent instead
gets its registry by CID (boot config `device_registry`), so the registry must carry its own
authority. It is one DAG-CBOR block, like the signed manifest:

    {"registry": {"devices": [{"id": hex, "name": str, "key": COSE_Key bytes, "role"?: str}   (DICE)
                            | {"id": hex, "name": str, "tpm": {"ak": TPM2B_PUBLIC bytes,    (TPM)
                                 "firmware": {"<pcr>": SHA-256 bytes, ...}, "ek_cert"?: DER bytes},
                               "role"?: str}, ...],
                  "manifests"?: {role: manifest name}, "version"?: int,
                  "tpm_references"?: {arch: {"pcr4": [SHA-256 bytes, ...],
                                             "pcr11": [[event type, SHA-256 bytes, event data bytes], ...]}}},
     "signatures": COSE_Sign with detached payload = canonical encoding of "registry"}

signed by a threshold of the manifest's root-of-trust keys (the same `verify_threshold` the
manifest uses), so whoever may release software may also enrol devices, and nobody less.

`role`, `manifests` and `version` are optional and left out when unset, so registries signed
before they existed keep their bytes (and CID). They are what lets a device know, from a signed
source, which manifest it may boot (docs/trust.md, "What a device may boot"): its role, and the
manifest name that role boots. `version` only grows; the bootstrap refuses a registry older than
one it already accepted (a replayed registry could otherwise hand a device an old role).

A device's role is the registry's to say, not the device's: appraisal compares the role claimed
in evidence with it (`DeviceRoots.roles`, fail-closed #7). An entry without "role" (older
registries) has no role, so a device claiming one is not affirmed.

A TPM device (docs/tpm.md) has no root key: its entry holds its enrolment instead (the AK,
the firmware PCR baseline, the EK certificate), and its id is `tpm.evidence.device_id` of the
AK's name. Registries without TPM devices keep their bytes.

`tpm_references` are the PCR 4 and PCR 11 reference values of the bootstrap UKIs the fleet boots,
one set per UEFI architecture ("x86_64", "arm64": one UKI per arch, ADR 0008), each
`TpmReferences.for_uki` of that UKI's bytes (the UKI's and its kernel's Authenticode digests, the
stub's section events), signed with the devices: a booted agent appraising a TPM peer has no UKI
to derive them from, and this is the signed source it takes them from (docs/tpm.md, "Peers").
Appraisal uses the set whose UKI the device's log shows (`tpm.appraise.references_for_log`).
Without them an agent's TPM peers are never affirming. Registries signed before references were
per architecture carry one set, `{"pcr4", "pcr11"}`; they still decode, as that set under
"x86_64" (the only UKI the harness signed in then; the label only names the set: appraisal picks
a set by its UKI digest, never by the label).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cidboot.errors import FormatError, VerificationError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.trust.appraisal_roots import DeviceRoots
from cidboot.trust.cose import PrivateKey
from cidboot.trust.cose_key import decode_public_key, encode_public_key_bytes, raw_public_bytes
from cidboot.trust.dice.derive import derive_id
from cidboot.trust.manifest.model import MAX_VERSION, RootOfTrust
from cidboot.trust.manifest.signed import KIND_REGISTRY, sign_kind
from cidboot.trust.manifest.verify import verify_threshold

if TYPE_CHECKING:  # cidboot.trust.tpm is imported where a registry has TPM devices or references
    from cidboot.trust.appraisal_tpmdevice import TpmDevice
    from cidboot.trust.tpm.appraise import TpmReferences

MAX_REFERENCE_EVENTS = 64  # PCR 4 applications or PCR 11 events a registry may list

MAX_REGISTRY = 1024 * 1024  # bytes; a registry of ~10k devices, refused unread beyond that


class RegistryFormatError(FormatError):
    """The registry block is malformed (the message names the entry and field)."""


class RegistryVerificationError(VerificationError):
    """The registry is well formed but not signed by a threshold of the root of trust."""


class RegistryRoleError(VerificationError):
    """The registry does not say which manifest this device may boot: the device is not
    registered, has no role, its role differs from the boot config's, or the role has no manifest."""


@dataclass(frozen=True)
class Registry:
    """A verified registry: device roots, each device's role and the manifest name each role boots."""

    roots: DeviceRoots  # keys, names and roles: the one place a device's role is kept
    manifests: dict[str, str] = field(default_factory=dict)  # role -> manifest name
    version: int = 0
    tpm_references: dict[str, TpmReferences] | None = None  # PCR 4/11 of the fleet's bootstrap UKI, per arch

    @property
    def roles(self) -> dict[str, str]:
        """Device id (hex) -> registered role, for the devices that have one."""
        return {did: r for did, r in self.roots.roles.items() if r}

    def manifest_for(self, role: str, device_id: str | None) -> str:
        """The manifest name the device may boot. A measured device (`device_id`, from its DICE
        chain) is looked up by id and its registered role must equal the boot config's `role`,
        which is not signed; an unmeasured one has no identity, so only `role` is looked up."""
        if device_id is not None:
            if device_id not in self.roots:
                raise RegistryRoleError(f"device {device_id} is not in the device registry")
            registered = self.roles.get(device_id)
            if registered is None:
                raise RegistryRoleError(f"device {device_id} has no role in the device registry")
            if registered != role:
                raise RegistryRoleError(f"device {device_id} is registered as role {registered!r}, "
                                        f"the boot config says {role!r}")
        name = self.manifests.get(role)
        if name is None:
            raise RegistryRoleError(f"the device registry names no manifest for role {role!r}")
        return name


def registry_obj(roots: DeviceRoots, manifests: Mapping[str, str] | None = None,
                 version: int | None = None, tpm_references: Mapping[str, TpmReferences] | None = None) -> dict[str, Any]:
    """The signed content: devices sorted by id, so the same roots always give the same bytes.
    Optional parts (a device's role, manifests, version) are left out when unset, so registries
    signed before they existed keep their bytes."""
    devices = []
    entries: dict[str, dict[str, Any]] = {did: {"key": encode_public_key_bytes(k)} for did, k in roots.keys.items()}
    for did, t in roots.tpm.items():
        tpm: dict[str, Any] = {"ak": t.ak_public, "firmware": {str(i): v for i, v in sorted(t.firmware_pcrs.items())}}
        if t.ek_cert is not None:
            tpm["ek_cert"] = t.ek_cert
        entries[did] = {"tpm": tpm}
    for did, e in sorted(entries.items()):
        d: dict[str, Any] = {"id": did, "name": roots.names.get(did, ""), **e}
        if roots.roles.get(did):
            d["role"] = roots.roles[did]
        devices.append(d)
    obj: dict[str, Any] = {"devices": devices}
    if manifests:
        obj["manifests"] = dict(sorted(manifests.items()))
    if version is not None:
        obj["version"] = version
    if tpm_references is not None:
        obj["tpm_references"] = {arch: {"pcr4": [bytes(d) for d in r.applications],
                                        "pcr11": [[e.event_type, e.digest, e.data or b""] for e in r.stub_events]}
                                 for arch, r in sorted(tpm_references.items())}
    _check_extras(obj)
    return obj


def sign_registry(roots: DeviceRoots, keys: Sequence[PrivateKey], *, manifests: Mapping[str, str] | None = None,
                  version: int | None = None, tpm_references: Mapping[str, TpmReferences] | None = None) -> bytes:
    """The registry block, signed by each of `keys` (give at least the root's threshold).
    Roles come from `roots` (`DeviceRoots.add(key, name, role)`); `manifests`: role -> the
    manifest name that role boots; `tpm_references`: UEFI arch name -> that arch's bootstrap UKI's
    PCR 4/11 references (`TpmReferences.for_uki`; its bootstrap events are not carried: the manifest's)."""
    if not keys:
        raise RegistryFormatError("device registry: no signing keys given")
    obj = registry_obj(roots, manifests, version, tpm_references)
    payload = dagcbor.encode(obj)
    sigs = sign_kind(payload, keys, KIND_REGISTRY)
    return dagcbor.encode({"registry": obj, "signatures": sigs})


def registry_cid(block: bytes) -> CID:
    return CID.of(block, DAG_CBOR)


def _check_extras(obj: dict[str, Any]) -> None:
    """`manifests` maps non-empty roles to non-empty names; `version` is 0..MAX_VERSION."""
    m = obj.get("manifests", {})
    if not isinstance(m, dict) or not all(isinstance(r, str) and r and isinstance(n, str) and n for r, n in m.items()):
        raise RegistryFormatError("device registry: manifests must map roles to manifest names (non-empty text)")
    v = obj.get("version", 0)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_VERSION:
        raise RegistryFormatError(f"device registry: version must be an integer 0..{MAX_VERSION}")
    if "tpm_references" in obj:
        _parse_references_by_arch(obj["tpm_references"])


OLD_FORM_ARCH = "x86_64"  # what a registry's one reference set (before they were per arch) was for
MAX_ARCHES = 8


def _parse_references_by_arch(r: Any) -> dict[str, TpmReferences]:
    """`{arch: {pcr4, pcr11}}` (arch: lower-case UEFI name, 1..16 of a-z 0-9 _), 1..MAX_ARCHES of
    them; or the one set of an older registry, `{pcr4, pcr11}`, as OLD_FORM_ARCH's."""
    where = "device registry: tpm_references"
    if isinstance(r, dict) and set(r) == {"pcr4", "pcr11"}:
        return {OLD_FORM_ARCH: _parse_references(r)}
    if not isinstance(r, dict) or not 1 <= len(r) <= MAX_ARCHES:
        raise RegistryFormatError(f"{where} must map 1..{MAX_ARCHES} architectures to {{pcr4, pcr11}}")
    out = {}
    for arch, refs in r.items():
        if not isinstance(arch, str) or not 1 <= len(arch) <= 16 \
                or not all(c.isdigit() or c == "_" or "a" <= c <= "z" for c in arch) or arch in ("pcr4", "pcr11"):
            raise RegistryFormatError(f"{where}: architecture {arch!r} must be a UEFI arch name (a-z, 0-9, _)")
        out[arch] = _parse_references(refs, f"{where}: {arch}")
    return out


def _parse_references(r: Any, where: str = "device registry: tpm_references") -> TpmReferences:
    """`{pcr4: [digest], pcr11: [[type, digest, data]]}`: SHA-256 digests, at least one PCR 4
    application (an empty list would compare with nothing), bounded lengths."""
    if not isinstance(r, dict) or set(r) != {"pcr4", "pcr11"} or not isinstance(r["pcr4"], list) \
            or not isinstance(r["pcr11"], list):
        raise RegistryFormatError(f"{where} must be {{pcr4: [digest], pcr11: [[type, digest, data]]}}")
    if not 1 <= len(r["pcr4"]) <= MAX_REFERENCE_EVENTS or len(r["pcr11"]) > MAX_REFERENCE_EVENTS:
        raise RegistryFormatError(f"{where}: 1..{MAX_REFERENCE_EVENTS} PCR 4 digests, at most "
                                  f"{MAX_REFERENCE_EVENTS} PCR 11 events")
    if not all(isinstance(d, bytes) and len(d) == 32 for d in r["pcr4"]):
        raise RegistryFormatError(f"{where}: pcr4 entries must be SHA-256 digests (32 bytes)")
    from cidboot.trust.tpm.appraise import TpmReferences
    from cidboot.trust.tpm.reference import ExpectedEvent

    events = []
    for i, e in enumerate(r["pcr11"]):
        if not isinstance(e, list) or len(e) != 3 or not isinstance(e[0], int) or isinstance(e[0], bool) \
                or not 0 <= e[0] <= 0xFFFFFFFF or not isinstance(e[1], bytes) or len(e[1]) != 32 \
                or not isinstance(e[2], bytes) or len(e[2]) > 1024:
            raise RegistryFormatError(f"{where}: pcr11 event {i} must be [type (uint32), SHA-256, data (<= 1 KiB)]")
        events.append(ExpectedEvent(11, e[0], e[1], e[2], f"PCR 11 event {i} (registry)"))
    return TpmReferences(list(r["pcr4"]), events)


def _parse(obj: Any) -> Registry:
    if not isinstance(obj, dict) or "devices" not in obj \
            or set(obj) - {"devices", "manifests", "version", "tpm_references"} or not isinstance(obj["devices"], list):
        raise RegistryFormatError("device registry: content must be {devices: [...], manifests?, version?, "
                                  "tpm_references?}")
    _check_extras(obj)
    out = DeviceRoots()
    for i, d in enumerate(obj["devices"]):
        where = f"device registry entry {i}"
        if isinstance(d, dict) and "tpm" in d and "key" not in d:
            if set(d) - {"id", "name", "tpm", "role"} or not {"id", "name"} <= set(d):
                raise RegistryFormatError(f"{where}: must be {{id, name, tpm, role?}}")
            _check_entry(d, where)
            from cidboot.trust.tpm.evidence import device_id as tpm_device_id

            tdev = _parse_tpm(d["tpm"], where)
            did = tpm_device_id(tdev.ak_name)
            if d["id"] != did:
                raise RegistryFormatError(f"{where}: id {d['id']} is not the device id {did} of its AK")
            if did in out:
                raise RegistryFormatError(f"{where}: device {did} listed twice")
            out.add_tpm(tdev, d["name"], d.get("role"))
            continue
        if not isinstance(d, dict) or not {"id", "name", "key"} <= set(d) or set(d) - {"id", "name", "key", "role"}:
            raise RegistryFormatError(f"{where}: must be {{id, name, key, role?}} or {{id, name, tpm, role?}}")
        if not isinstance(d["key"], bytes):
            raise RegistryFormatError(f"{where}: key must be an encoded COSE_Key")
        _check_entry(d, where)
        try:
            key = decode_public_key(d["key"])
        except FormatError as e:
            raise RegistryFormatError(f"{where}: key: {e}") from None
        did = derive_id(raw_public_bytes(key)).hex()
        if d["id"] != did:
            raise RegistryFormatError(f"{where}: id {d['id']} is not the DICE ID {did} of its key")
        if did in out:
            raise RegistryFormatError(f"{where}: device {did} listed twice")
        out.add(key, d["name"], d.get("role"))
    refs = _parse_references_by_arch(obj["tpm_references"]) if "tpm_references" in obj else None
    return Registry(out, dict(obj.get("manifests", {})), int(obj.get("version", 0)), refs)


def _check_entry(d: dict[str, Any], where: str) -> None:
    if not isinstance(d["id"], str) or not isinstance(d["name"], str):
        raise RegistryFormatError(f"{where}: id and name must be text")
    if "role" in d and (not isinstance(d["role"], str) or not d["role"]):
        raise RegistryFormatError(f"{where}: role must be non-empty text")


def _parse_tpm(t: Any, where: str) -> TpmDevice:
    if not isinstance(t, dict) or not {"ak", "firmware"} <= set(t) or set(t) - {"ak", "firmware", "ek_cert"}:
        raise RegistryFormatError(f"{where}: tpm must be {{ak, firmware, ek_cert?}}")
    fw = t["firmware"]
    if not isinstance(t["ak"], bytes) or not isinstance(fw, dict) or ("ek_cert" in t and not isinstance(t["ek_cert"], bytes)):
        raise RegistryFormatError(f"{where}: tpm ak and ek_cert must be bytes, firmware a map")
    pcrs: dict[int, bytes] = {}
    for k, v in fw.items():
        if not isinstance(k, str) or not k.isdigit() or str(int(k)) != k or not isinstance(v, bytes):
            raise RegistryFormatError(f"{where}: tpm firmware must map PCR numbers (text) to digests")
        pcrs[int(k)] = v
    from cidboot.trust.appraisal_tpmdevice import TpmDevice  # only a registry with a TPM device needs it

    try:
        return TpmDevice(t["ak"], pcrs, t.get("ek_cert"))
    except FormatError as e:
        raise RegistryFormatError(f"{where}: tpm: {e}") from None


def verify_registry(block: bytes, root: RootOfTrust) -> DeviceRoots:
    """Decode `block` and check its signatures against `root`; return the registered roots.

    Raises RegistryFormatError (malformed) or RegistryVerificationError (below threshold)."""
    return verify_signed_registry(block, root).roots


def verify_signed_registry(block: bytes, root: RootOfTrust) -> Registry:
    """`verify_registry`, returning the whole registry: roots, roles, manifests, version."""
    if len(block) > MAX_REGISTRY:
        raise RegistryFormatError(f"device registry of {len(block)} bytes exceeds {MAX_REGISTRY}")
    try:
        env = dagcbor.decode(block)
    except FormatError as e:
        raise RegistryFormatError(f"device registry: not DAG-CBOR: {e}") from None
    if not isinstance(env, dict) or set(env) != {"registry", "signatures"} or not isinstance(env["signatures"], bytes):
        raise RegistryFormatError("device registry: block must be {registry, signatures}")
    reg = _parse(env["registry"])
    try:
        verify_threshold(env["signatures"], dagcbor.encode(env["registry"]), root, "device registry",
                         kind=KIND_REGISTRY)
    except VerificationError as e:
        raise RegistryVerificationError(str(e)) from None
    return reg
