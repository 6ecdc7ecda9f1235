"""A measured UEFI boot with a real (software) TPM: OVMF + swtpm (tpm-tis) PXE-boot a UKI that
imagebuilder.uki assembled from Debian's systemd stub and the bootstrap's Debian kernel, with a
probe initramfs (busybox) that prints the firmware's event log
(/sys/kernel/security/tpm0/binary_bios_measurements, base64) and the TPM's SHA-256 PCRs 0..15 as
the kernel reads them from the TPM (/sys/class/tpm/tpm0/pcr-sha256/N).

What it proves, on what OVMF really measured: our parser takes OVMF's log, its replay equals the
TPM's PCRs, and the PCR 4 EV_EFI_BOOT_SERVICES_APPLICATION event of the UKI is our Authenticode hash
of the UKI's bytes (`reference.uki_digest`). The probe UKI stands in for the bootstrap UKI: same
stub, same kernel, same assembly code; only the initramfs differs (the bootstrap does not print
its event log).
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from cidboot.stage.cpio import Entry, archive_bytes
from cidboot.trust.tpm import eventlog
from cidboot.trust.tpm.appraise import TpmReferences, check_references
from cidboot.trust.tpm.errors import ReferenceMismatchError
from cidboot.trust.tpm.eventlog import EV_EFI_BOOT_SERVICES_APPLICATION
from cidboot.trust.tpm.pe import authenticode_digest
from cidboot.trust.tpm.reference import uki_digest
from imagebuilder import uki
from qemu.harness.vm import Guest
from tests.support.swtpm import Swtpm

pytestmark = [pytest.mark.qemu, pytest.mark.tpm]
DEBS = Path.home() / ".cache/cidboot/debs"
CMDLINE = "console=ttyS0 panic=-1 quiet"

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t securityfs securityfs /sys/kernel/security
echo "probe: tpm $(/bin/busybox cat /sys/class/tpm/tpm0/tpm_version_major 2>&1)"
echo "TPMLOG-BEGIN"
/bin/busybox base64 /sys/kernel/security/tpm0/binary_bios_measurements
echo "TPMLOG-END"
for i in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do
  echo "PCR $i $(/bin/busybox cat /sys/class/tpm/tpm0/pcr-sha256/$i)"
done
echo "probe: done"
/bin/busybox poweroff -f
"""


def _kernel(tmp: Path) -> bytes:
    debs = sorted(DEBS.glob("linux-image-*-amd64_*.deb"))
    if not debs:
        pytest.skip(f"no Debian kernel package in {DEBS} (an image build downloads it)")
    out = tmp / "kernel"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(out)], check=True)
    return next((out / "boot").glob("vmlinuz-*")).read_bytes()


def test_ovmf_measures_the_uki_as_our_authenticode_hash_and_the_log_replays_to_the_tpm(tmp_path: Path) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    initrd = archive_bytes([Entry.directory("bin"), Entry.file("bin/busybox", Path(busybox).read_bytes(), 0o755),
                            Entry.file("init", INIT.encode(), 0o755), Entry.directory("dev")])
    kernel = _kernel(tmp_path)
    image = uki.build_uki(uki.stub_path("amd64").read_bytes(), kernel, initrd, CMDLINE, uki.os_release("tpm-probe", 1))
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    (tftp / "probe.efi").write_bytes(image)
    with Swtpm(tmp_path / "swtpm", qemu=True) as tpm, \
            Guest.create("tpm-probe", tmp_path / "guest", firmware="uefi", user_tftp=tftp, bootfile="probe.efi",
                         boot_from_network=True, tpm=tpm.ctrl_socket) as g:
        g.wait_for_console(r"probe: tpm 2", 600)
        done, _ = g.wait_for_console(r"probe: done", 120)
        t_done = done.t
        g.wait_for_exit(60)
        text = [ln.text.strip() for ln in g.console.lines]
    b, e = text.index("TPMLOG-BEGIN"), text.index("TPMLOG-END")
    raw = base64.b64decode("".join(text[b + 1:e]))
    tpm_pcrs = {int(t.split()[1]): bytes.fromhex(t.split()[2]) for t in text if t.startswith("PCR ")}
    (tmp_path / "ovmf-eventlog.bin").write_bytes(raw)  # for inspection: tpm2_eventlog ovmf-eventlog.bin
    log = eventlog.parse(raw)
    pcrs = log.replay()
    for i in range(8):  # the firmware's PCRs (8..15 also carry the kernel's own measurements, e.g. IMA's PCR 10)
        assert pcrs[i] == tpm_pcrs[i], f"PCR {i}: replay {pcrs[i].hex()} != TPM {tpm_pcrs[i].hex()}"
    apps = [ev for ev in log.events if ev.pcr == 4 and ev.event_type == EV_EFI_BOOT_SERVICES_APPLICATION]
    assert [ev.sha256 for ev in apps] == [uki_digest(image), authenticode_digest(kernel)]
    # every reference derivable from the UKI's bytes holds on what OVMF and the stub really measured
    refs = TpmReferences.for_uki(image)
    assert check_references(log, refs) == ["UKI and kernel digests (PCR 4)", "UKI sections (PCR 11)"]
    assert pcrs[11] == tpm_pcrs[11]  # nothing but the stub extends PCR 11 here
    initrd_tag = [ev for ev in log.events if ev.pcr == 9 and b"Linux initrd" in ev.data]
    assert [ev.sha256 for ev in initrd_tag] == [hashlib.sha256(initrd).digest()]  # the kernel's EFI stub, PCR 9
    # a UKI changed by one byte (another cmdline) is named, at the UKI's PCR 4 event
    other = uki.build_uki(uki.stub_path("amd64").read_bytes(), kernel, initrd, CMDLINE + " ", uki.os_release("tpm-probe", 1))
    with pytest.raises(ReferenceMismatchError, match="PCR 4 application 0"):
        check_references(log, TpmReferences.for_uki(other))
    print(f"\nOVMF + swtpm: {len(raw)}-byte log, {len(log.events)} events; PCR 0..7 and 11 replay = the TPM's; "
          f"PCR 4 = UKI {apps[0].sha256.hex()[:16]}.. then kernel {apps[1].sha256.hex()[:16]}..; "
          f"PCR 11 = {len(refs.stub_events)} stub events as derived; power-on to probe output {t_done:.1f} s")
