"""Per-device policy from devices.yaml: role, manifest and allow/deny by MAC or UUID.

```yaml
deny_unknown: true
devices:
  - {mac: "52:54:00:12:34:56", role: worker, manifest: bafy..., ip: 10.77.0.50}
  - {uuid: "4c4c4544-0000-1000-8000-000000000001", role: edge}
  - {mac: "52:54:00:66:66:66", allow: false}
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from cidboot.errors import FormatError


class DevicesFileError(FormatError):
    """devices.yaml is malformed (the message names the entry)."""


@dataclass(frozen=True)
class DevicePolicy:
    allow: bool = True
    role: str = "default"
    manifest: str | None = None
    known: bool = False
    ip: str | None = None  # fixed address (DHCP reservation), so peers can be told where it is


@dataclass
class Devices:
    by_mac: dict[str, DevicePolicy]
    by_uuid: dict[str, DevicePolicy]
    deny_unknown: bool = False

    @classmethod
    def empty(cls) -> Devices:
        return cls({}, {})

    @classmethod
    def load(cls, path: Path) -> Devices:
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise DevicesFileError(f"{path}: {e}") from None
        if not isinstance(doc, dict) or set(doc) - {"deny_unknown", "devices"}:
            raise DevicesFileError(f"{path}: top level must be a map with deny_unknown and devices")
        out = cls({}, {}, bool(doc.get("deny_unknown", False)))
        for i, d in enumerate(doc.get("devices") or []):
            if not isinstance(d, dict) or set(d) - {"mac", "uuid", "role", "manifest", "allow", "ip"}:
                raise DevicesFileError(f"{path}: device {i}: unknown keys or not a map")
            if not d.get("mac") and not d.get("uuid"):
                raise DevicesFileError(f"{path}: device {i}: needs a mac or a uuid")
            if d.get("ip") is not None and not d.get("mac"):
                raise DevicesFileError(f"{path}: device {i}: a fixed ip needs a mac")
            pol = DevicePolicy(bool(d.get("allow", True)), str(d.get("role", "default")), d.get("manifest"), True,
                               str(d["ip"]) if d.get("ip") is not None else None)
            if d.get("mac"):
                out.by_mac[str(d["mac"]).lower()] = pol
            if d.get("uuid"):
                out.by_uuid[str(d["uuid"]).lower()] = pol
        return out

    def reservations(self) -> dict[str, str]:
        return {mac: pol.ip for mac, pol in self.by_mac.items() if pol.ip and pol.allow}

    def lookup(self, mac: str, uuid: str | None) -> DevicePolicy:
        pol = self.by_mac.get(mac.lower()) or (self.by_uuid.get(uuid.lower()) if uuid else None)
        if pol:
            return pol
        return DevicePolicy(allow=not self.deny_unknown)
