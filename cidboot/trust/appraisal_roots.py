"""The registered devices appraisal compares evidence with: `DeviceRoots` and `TpmDevice`.

Kept apart from cidboot.trust.appraisal because a booting agent needs them before `agent ready`
(the signed device registry it verifies at start is parsed into a `DeviceRoots`), while the
appraisal itself runs only when another device's evidence is appraised (a peer, the verifier
endpoints): cidboot.trust.appraisal is imported then, not at start. Both names are re-exported
by cidboot.trust.appraisal, where every other caller takes them from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cidboot.errors import FormatError
from cidboot.trust.cose_key import decode_public_key, encode_public_key_bytes, raw_public_bytes
from cidboot.trust.dice.derive import derive_id

if TYPE_CHECKING:
    from cidboot.trust.cose import PublicKey
    from cidboot.trust.tpm.appraise import TpmEnrolment


@dataclass(frozen=True)
class TpmDevice:
    """What enrolment recorded for a TPM-rooted device (docs/tpm.md, "Enrolment"): its AK's
    TPM2B_PUBLIC (the name is computed from it, never taken on trust), the firmware PCR baseline
    of a known-good boot (empty: not yet recorded, and then appraisal never affirms) and, for
    the record, the EK certificate the AK was shown to belong to (DER; None if not kept)."""

    ak_public: bytes
    firmware_pcrs: Mapping[int, bytes] = field(default_factory=dict)
    ek_cert: bytes | None = None

    def __post_init__(self) -> None:
        from cidboot.trust.tpm.quote import parse_public

        parse_public(self.ak_public)  # raises PublicKeyFormatError: not an attestation key
        for i, v in self.firmware_pcrs.items():
            if type(i) is not int or not 0 <= i < 24 or not isinstance(v, bytes) or len(v) != 32:
                raise FormatError(f"TPM enrolment: firmware PCR {i!r} must be a PCR 0..23 with a 32-byte SHA-256 value")

    @cached_property
    def ak_name(self) -> bytes:
        from cidboot.trust.tpm.quote import parse_public

        return parse_public(self.ak_public).name

    @cached_property
    def _enrolment(self) -> TpmEnrolment:
        from cidboot.trust.tpm.appraise import TpmEnrolment

        return TpmEnrolment(frozenset({self.ak_name}), dict(self.firmware_pcrs))

    def enrolment(self) -> TpmEnrolment:
        return self._enrolment

    def to_json(self) -> dict[str, Any]:
        return {"ak": self.ak_public.hex(), "ak_name": self.ak_name.hex(),
                "firmware_pcrs": {str(i): v.hex() for i, v in sorted(self.firmware_pcrs.items())},
                "ek_cert": self.ek_cert.hex() if self.ek_cert is not None else None}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TpmDevice:
        if not isinstance(d, Mapping) or set(d) - {"ak", "ak_name", "firmware_pcrs", "ek_cert"}:
            raise FormatError("tpm must be {ak, ak_name?, firmware_pcrs?, ek_cert?}")
        dev = cls(bytes.fromhex(d["ak"]), {int(i): bytes.fromhex(v) for i, v in (d.get("firmware_pcrs") or {}).items()},
                  bytes.fromhex(d["ek_cert"]) if d.get("ek_cert") else None)
        if "ak_name" in d and d["ak_name"] != dev.ak_name.hex():
            raise FormatError(f"tpm: ak_name {d['ak_name']} is not the name of the AK given")
        return dev


@dataclass
class DeviceRoots:
    """Registered devices (the "factory" list) with each device's name and role. A DICE device
    is registered by its root public key (`keys`, by DICE ID of that key); a TPM device by its
    enrolment (`tpm`, by `tpm.evidence.device_id` of its AK name). The role is the authority on
    what a device is: evidence only *claims* a role, and appraisal compares the claim with this
    (issue 11 #7)."""

    keys: dict[str, PublicKey] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str | None] = field(default_factory=dict)
    tpm: dict[str, TpmDevice] = field(default_factory=dict)

    def add(self, key: PublicKey, name: str = "", role: str | None = None) -> str:
        did = derive_id(raw_public_bytes(key)).hex()
        self.keys[did] = key
        self.names[did] = name
        self.roles[did] = role or None
        return did

    def add_tpm(self, device: TpmDevice, name: str = "", role: str | None = None) -> str:
        """Enrol a TPM device; returns its id (`tpm.evidence.device_id` of the AK name)."""
        from cidboot.trust.tpm.evidence import device_id as tpm_device_id

        did = tpm_device_id(device.ak_name)
        self.tpm[did] = device
        self.names[did] = name
        self.roles[did] = role or None
        return did

    def __contains__(self, did: object) -> bool:
        return did in self.keys or did in self.tpm

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeviceRoots:
        try:
            doc = json.loads(Path(path).read_text())
            out = cls()
            for d in doc["devices"]:
                role = d.get("role")
                if role is not None and not isinstance(role, str):
                    raise TypeError(f"device {d.get('id')}: role must be text or null")
                if ("key" in d) == ("tpm" in d):
                    raise ValueError(f"device {d.get('id')}: give either key (DICE) or tpm (TPM enrolment)")
                if "tpm" in d:
                    out.add_tpm(TpmDevice.from_json(d["tpm"]), d.get("name", ""), role)
                else:
                    out.add(decode_public_key(bytes.fromhex(d["key"])), d.get("name", ""), role)
            return out
        except (OSError, ValueError, KeyError, TypeError, AttributeError, FormatError) as e:
            raise FormatError(f"{path}: not a device roots file: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        devices: list[dict[str, Any]] = [{"id": did, "name": self.names.get(did, ""), "role": self.roles.get(did),
                                          "key": encode_public_key_bytes(k).hex()} for did, k in sorted(self.keys.items())]
        devices += [{"id": did, "name": self.names.get(did, ""), "role": self.roles.get(did), "tpm": t.to_json()}
                    for did, t in sorted(self.tpm.items())]
        Path(path).write_text(json.dumps({"devices": devices}, indent=1) + "\n")
