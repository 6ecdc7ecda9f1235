"""Reference values for TPM evidence, derived from what was signed, never kept by hand.

- PCR 4: UEFI measures every EFI application it starts as an EV_EFI_BOOT_SERVICES_APPLICATION
  whose digest is the application's Authenticode hash (`pe.authenticode_digest`). The bootstrap
  UKI is built reproducibly from the bootstrap manifest's layers (imagebuilder --uki) and stored
  under its CID, so the verifier hashes those exact bytes: `uki_digest(uki)`. Debian 12's
  systemd stub (252) then starts the kernel in `.linux` through LoadImage, so OVMF measures a
  second application: the Authenticode hash of the `.linux` section (seen in a real OVMF + swtpm
  boot: tests/e2e/test_tpm_uefi_qemu.py). `uki_applications(uki)` gives both, in order.
- PCR 11: that stub measures each UKI section it uses, in its own order (.linux .osrel .cmdline
  .initrd; .splash .dtb .pcrpkey when present), as two EV_IPL events whose data is the section
  name in UTF-16LE with its NUL: first SHA-256(ASCII name + NUL), then SHA-256(section bytes, cut
  at VirtualSize). `uki_pcr11_events(uki)`.
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
from cidboot.trust.tpm.errors import PeFormatError
from cidboot.trust.tpm.eventlog import EV_IPL
from cidboot.trust.tpm.pe import authenticode_digest, sections

UKI_PCR = 4
STUB_PCR = 11
# systemd 252's stub: the sections it measures, in the order it measures them (src/boot/efi/stub.c)
STUB_MEASURED_SECTIONS = (".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrpkey")
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


def uki_applications(uki: bytes) -> tuple[bytes, bytes]:
    """The PCR 4 application digests a UEFI boot of this UKI records: the UKI, then its kernel."""
    found = dict(sections(uki))
    if ".linux" not in found:
        raise PeFormatError("UKI: no .linux section")
    return uki_digest(uki), authenticode_digest(found[".linux"], "sha256")


def uki_pcr11_events(uki: bytes) -> list[ExpectedEvent]:
    """What systemd's stub measures into PCR 11 for this UKI, in order (see the module docstring)."""
    found = dict(sections(uki))
    out = []
    for name in STUB_MEASURED_SECTIONS:
        if name in found:
            label = (name + "\0").encode("utf-16-le")
            out.append(ExpectedEvent(STUB_PCR, EV_IPL, hashlib.sha256(name.encode() + b"\0").digest(), label, f"{name} name"))
            out.append(ExpectedEvent(STUB_PCR, EV_IPL, hashlib.sha256(found[name]).digest(), label, f"{name} data"))
    return out


def bootstrap_event_data(manifest_cid: CID, layer_cids: Iterable[CID]) -> list[bytes]:
    out = [f"cidboot manifest {manifest_cid}".encode()]
    out += [f"cidboot layer {i} {cid}".encode() for i, cid in enumerate(layer_cids)]
    return out


def bootstrap_events(manifest_cid: CID, manifest: Manifest) -> list[ExpectedEvent]:
    """What the bootstrap measures into BOOTSTRAP_PCR for this signed manifest, in order."""
    return [ExpectedEvent(BOOTSTRAP_PCR, BOOTSTRAP_EVENT_TYPE, hashlib.sha256(d).digest(), d, d.decode())
            for d in bootstrap_event_data(manifest_cid, (layer.cid for layer in manifest.layers))]
