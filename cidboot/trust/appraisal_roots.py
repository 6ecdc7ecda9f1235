"""The registered devices appraisal compares evidence with: `DeviceRoots` (and `TpmDevice`, in
cidboot.trust.appraisal_tpmdevice: imported where a TPM device is enrolled or read).

Kept apart from cidboot.trust.appraisal because a booting agent needs them before `agent ready`
(the signed device registry it verifies at start is parsed into a `DeviceRoots`), while the
appraisal itself runs only when another device's evidence is appraised (a peer, the verifier
endpoints): cidboot.trust.appraisal is imported then, not at start. Both names are re-exported
by cidboot.trust.appraisal, where every other caller takes them from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cidboot.errors import FormatError
from cidboot.trust.cose_key import decode_public_key, encode_public_key_bytes, raw_public_bytes
from cidboot.trust.dice.derive import derive_id

if TYPE_CHECKING:
    from cidboot.trust.appraisal_tpmdevice import TpmDevice
    from cidboot.trust.cose import PublicKey


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
                    from cidboot.trust.appraisal_tpmdevice import TpmDevice

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
