"""Reference values for TPM evidence, derived from what was signed, never kept by hand.

- PCR 4: UEFI measures every EFI application it starts as an EV_EFI_BOOT_SERVICES_APPLICATION
  whose digest is the application's Authenticode hash (`pe.authenticode_digest`). The bootstrap
  UKI is built reproducibly from the bootstrap manifest's layers (imagebuilder --uki) and stored
  under its CID, so the verifier hashes those exact bytes: `uki_digest(uki)`.
- The bootstrap's own PCR (`BOOTSTRAP_PCR`): the bootstrap (L1) measures the manifest CID it
  verified and then every layer CID in manifest order, each as an EV_IPL event whose data is a
  readable line (`cidboot manifest <cid>`, `cidboot layer <i> <cid>`) and whose digest is the
  SHA-256 of that data. `bootstrap_events(manifest_cid, manifest)` gives the list the log must
  contain, in order, and nothing else in that PCR.

PCR 15 is ours: in the PC Client profile PCRs 8..15 belong to the OS; the kernel's IMA uses 10,
systemd's stub 11..13 (cmdline, sysexts), shim 14; systemd-pcrfs's use of 15 does not apply to a
bootstrap that runs no systemd.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from cidboot.ipld.cid import CID
from cidboot.trust.manifest.model import Manifest
from cidboot.trust.tpm.eventlog import EV_IPL
from cidboot.trust.tpm.pe import authenticode_digest

UKI_PCR = 4
BOOTSTRAP_PCR = 15
BOOTSTRAP_EVENT_TYPE = EV_IPL


@dataclass(frozen=True)
class ExpectedEvent:
    """One event the log must hold: PCR, type, SHA-256 digest and (for our own events) its data."""

    pcr: int
    event_type: int
    digest: bytes
    data: bytes | None = None
    what: str = ""


def uki_digest(uki: bytes) -> bytes:
    """The PCR 4 digest UEFI records when it starts this UKI: its SHA-256 Authenticode hash."""
    return authenticode_digest(uki, "sha256")


def bootstrap_event_data(manifest_cid: CID, layer_cids: Iterable[CID]) -> list[bytes]:
    out = [f"cidboot manifest {manifest_cid}".encode()]
    out += [f"cidboot layer {i} {cid}".encode() for i, cid in enumerate(layer_cids)]
    return out


def bootstrap_events(manifest_cid: CID, manifest: Manifest) -> list[ExpectedEvent]:
    """What the bootstrap measures into BOOTSTRAP_PCR for this signed manifest, in order."""
    return [ExpectedEvent(BOOTSTRAP_PCR, BOOTSTRAP_EVENT_TYPE, hashlib.sha256(d).digest(), d, d.decode())
            for d in bootstrap_event_data(manifest_cid, (layer.cid for layer in manifest.layers))]
