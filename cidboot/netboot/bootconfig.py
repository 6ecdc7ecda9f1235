"""The per-device boot config the boot server generates and the firmware/bootstrap read.

Canonical JSON (sorted keys, no spaces) so it can be measured: which manifest to boot, which
gateways to fetch it from (in order), the trust anchor, the device's role and what to do when
verification fails. Optional: `peers` ({role: [agent base URL]}, how an agent finds the devices
its inputs go to), `device_registry` (CID of the signed device registry, cidboot.trust.registry)
and `events` (the URL every stage posts its stage events to, cidboot.stage.events: the boot
server's `/api/events`; without it the stages post nothing and say so on the console) and
`keys` (the key broker's base URL, docs/privacy.md: where the bootstrap asks for the layer keys of
a manifest with encrypted layers; unsigned like the gateways, since a broker the device reaches
must still appraise the device's evidence and wraps the keys to its ephemeral key, so a wrong URL
costs availability only). They are left out of the encoding when unset, so older configs keep their exact bytes (and
measurement).

The boot config is measured (the firmware puts it into L1's DICE config) but not signed: whoever
serves it (the boot server, or anyone on the TFTP path) chooses `manifest` and `role`. So it never
decides on its own which manifest name a device may boot: with `device_registry` the bootstrap
takes that name from the signed registry (and, on a measured boot, checks `role` against the
device's registered role); without it, the name pinned in the device's NVRAM applies
(docs/trust.md, "What a device may boot").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cidboot.errors import FormatError
from cidboot.ipld.cid import CID

ON_FAILURE = ("poweroff", "retry")


class BootConfigError(FormatError):
    """A boot config is malformed (the message names the field)."""


@dataclass(frozen=True)
class BootConfig:
    """A device's boot config: the manifest to boot, where blocks come from, and the rest of the
    fields `decode` checks (docs/boot-chain.md)."""

    manifest: CID
    gateways: tuple[str, ...]
    trust_anchor: dict[str, Any] = field(default_factory=dict)  # root-of-trust file content
    role: str = "default"
    on_failure: str = "poweroff"
    version: int = 1
    peers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    device_registry: CID | None = None
    # where the agent publishes results, provenance and audit logs: "kubo=URL" or
    # "cluster=URL[,replication=MIN:MAX]" (agent.publish parses it). Unsigned like the gateways:
    # a wrong target costs availability only, since every published block is checked by CID
    # and every result's provenance is signed.
    publish: str | None = None
    events: str | None = None  # where the stages post their stage events (the boot server's /api/events)
    keys: str | None = None  # the key broker's base URL (POST {keys}/keys/challenge, /keys/request)

    def encode(self) -> bytes:
        doc = {"version": self.version, "manifest": str(self.manifest), "gateways": list(self.gateways),
               "trust_anchor": self.trust_anchor, "role": self.role, "on_failure": self.on_failure}
        if self.peers:
            doc["peers"] = {r: list(u) for r, u in self.peers.items()}
        if self.device_registry is not None:
            doc["device_registry"] = str(self.device_registry)
        if self.publish is not None:
            doc["publish"] = self.publish
        if self.events is not None:
            doc["events"] = self.events
        if self.keys is not None:
            doc["keys"] = self.keys
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> BootConfig:
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise BootConfigError(f"boot config is not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise BootConfigError("boot config must be a JSON object with version 1")
        extra = set(doc) - {"version", "manifest", "gateways", "trust_anchor", "role", "on_failure", "peers",
                                 "device_registry", "publish", "events", "keys"}
        if extra:
            raise BootConfigError(f"boot config: unknown keys {sorted(extra)}")
        gws = doc.get("gateways")
        if not isinstance(gws, list) or not gws or not all(isinstance(g, str) and g.startswith("http") for g in gws):
            raise BootConfigError("boot config: gateways must be a non-empty list of http(s) URLs")
        if doc.get("on_failure", "poweroff") not in ON_FAILURE:
            raise BootConfigError(f"boot config: on_failure must be one of {ON_FAILURE}")
        try:
            manifest = CID.parse(doc["manifest"])
        except (KeyError, FormatError) as e:
            raise BootConfigError(f"boot config: manifest: {e}") from None
        return cls(manifest, tuple(gws), doc.get("trust_anchor") or {}, str(doc.get("role", "default")),
                   doc.get("on_failure", "poweroff"), peers=_peers(doc.get("peers", {})),
                   device_registry=_registry(doc.get("device_registry")), publish=parse_publish(doc.get("publish")),
                   events=_events(doc.get("events")), keys=parse_keys(doc.get("keys")))


def parse_publish(raw: Any) -> str | None:
    if raw is None:
        return None
    kind, _, url = raw.partition("=") if isinstance(raw, str) else ("", "", "")
    if kind not in ("kubo", "cluster") or not url.startswith(("http://", "https://")):
        raise BootConfigError(f"boot config: publish must be kubo=URL or cluster=URL[,replication=MIN:MAX], got {raw!r}")
    return str(raw)


def _events(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.startswith(("http://", "https://")) or len(raw) > 2048:
        raise BootConfigError("boot config: events must be an http(s) URL (the boot server's /api/events)")
    return raw


def parse_keys(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.startswith("http://") or len(raw) > 2048 or any(c.isspace() for c in raw):
        raise BootConfigError("boot config: keys must be the key broker's http:// URL")
    return raw


def _peers(raw: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, dict):
        raise BootConfigError("boot config: peers must map roles to lists of http(s) URLs")
    out: dict[str, tuple[str, ...]] = {}
    for role, urls in raw.items():
        if not role or not isinstance(urls, list) or not all(isinstance(u, str) and u.startswith("http") for u in urls):
            raise BootConfigError(f"boot config: peers[{role!r}] must be a list of http(s) URLs")
        out[role] = tuple(urls)
    return out


def _registry(raw: Any) -> CID | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise BootConfigError("boot config: device_registry must be a CID string")
    try:
        return CID.parse(raw)
    except FormatError as e:
        raise BootConfigError(f"boot config: device_registry: {e}") from None
