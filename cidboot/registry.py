"""The signed device registry: which device roots a fleet's verifiers and peers trust.

`device-roots.json` (cidboot.appraisal.DeviceRoots) is a local file; a booted agent instead
gets its registry by CID (boot config `device_registry`), so the registry must carry its own
authority. It is one DAG-CBOR block, like the signed manifest:

    {"registry": {"devices": [{"id": hex, "name": str, "role": str | null, "key": COSE_Key bytes}, ...]},
     "signatures": COSE_Sign with detached payload = canonical encoding of "registry"}

signed by a threshold of the manifest's root-of-trust keys (the same `verify_threshold` the
manifest uses), so whoever may release software may also enrol devices, and nobody less.
A device's role is the registry's to say, not the device's: appraisal compares the role claimed
in evidence with it (issue 11 #7). An entry without "role" (older registries) has no role, so
a device claiming one is not affirmed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cidboot import cose, dagcbor
from cidboot.appraisal import DeviceRoots
from cidboot.cid import CID, DAG_CBOR
from cidboot.cose import PrivateKey
from cidboot.cose_key import decode_public_key, encode_public_key_bytes, key_id, raw_public_bytes
from cidboot.dice.derive import derive_id
from cidboot.errors import FormatError, VerificationError
from cidboot.manifest.model import RootOfTrust
from cidboot.manifest.verify import verify_threshold

MAX_REGISTRY = 1024 * 1024  # bytes; a registry of ~10k devices, refused unread beyond that


class RegistryFormatError(FormatError):
    """The registry block is malformed (the message names the entry and field)."""


class RegistryVerificationError(VerificationError):
    """The registry is well formed but not signed by a threshold of the root of trust."""


def registry_obj(roots: DeviceRoots) -> dict[str, Any]:
    """The signed content: devices sorted by id, so the same roots always give the same bytes."""
    return {"devices": [{"id": did, "name": roots.names.get(did, ""), "role": roots.roles.get(did),
                         "key": encode_public_key_bytes(k)} for did, k in sorted(roots.keys.items())]}


def sign_registry(roots: DeviceRoots, keys: Sequence[PrivateKey]) -> bytes:
    """The registry block, signed by each of `keys` (give at least the root's threshold)."""
    if not keys:
        raise RegistryFormatError("device registry: no signing keys given")
    obj = registry_obj(roots)
    payload = dagcbor.encode(obj)
    sigs = cose.sign_multi(payload, [(k, key_id(k.public_key())) for k in keys], detached=True)
    return dagcbor.encode({"registry": obj, "signatures": sigs})


def registry_cid(block: bytes) -> CID:
    return CID.of(block, DAG_CBOR)


def _devices(obj: Any) -> DeviceRoots:
    if not isinstance(obj, dict) or set(obj) != {"devices"} or not isinstance(obj["devices"], list):
        raise RegistryFormatError("device registry: content must be {devices: [...]}")
    out = DeviceRoots()
    for i, d in enumerate(obj["devices"]):
        where = f"device registry entry {i}"
        if not isinstance(d, dict) or set(d) not in ({"id", "name", "key"}, {"id", "name", "role", "key"}):
            raise RegistryFormatError(f"{where}: must be {{id, name, role, key}}")
        if not isinstance(d["id"], str) or not isinstance(d["name"], str) or not isinstance(d["key"], bytes):
            raise RegistryFormatError(f"{where}: id and name must be text, key an encoded COSE_Key")
        role = d.get("role")
        if role is not None and (not isinstance(role, str) or not role):
            raise RegistryFormatError(f"{where}: role must be non-empty text or null")
        try:
            key = decode_public_key(d["key"])
        except FormatError as e:
            raise RegistryFormatError(f"{where}: key: {e}") from None
        did = derive_id(raw_public_bytes(key)).hex()
        if d["id"] != did:
            raise RegistryFormatError(f"{where}: id {d['id']} is not the DICE ID {did} of its key")
        if did in out.keys:
            raise RegistryFormatError(f"{where}: device {did} listed twice")
        out.add(key, d["name"], role)
    return out


def verify_registry(block: bytes, root: RootOfTrust) -> DeviceRoots:
    """Decode `block` and check its signatures against `root`; return the registered roots.

    Raises RegistryFormatError (malformed) or RegistryVerificationError (below threshold)."""
    if len(block) > MAX_REGISTRY:
        raise RegistryFormatError(f"device registry of {len(block)} bytes exceeds {MAX_REGISTRY}")
    try:
        env = dagcbor.decode(block)
    except FormatError as e:
        raise RegistryFormatError(f"device registry: not DAG-CBOR: {e}") from None
    if not isinstance(env, dict) or set(env) != {"registry", "signatures"} or not isinstance(env["signatures"], bytes):
        raise RegistryFormatError("device registry: block must be {registry, signatures}")
    roots = _devices(env["registry"])
    try:
        verify_threshold(env["signatures"], dagcbor.encode(env["registry"]), root, "device registry")
    except VerificationError as e:
        raise RegistryVerificationError(str(e)) from None
    return roots
