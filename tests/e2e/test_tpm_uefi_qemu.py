"""A measured UEFI boot with a real (software) TPM, appraised end to end.

Factory: a fresh swtpm is manufactured (EK certificate from a local CA) and, over tpm2-tools'
`tpm2_send`, asked for the primary AK of a fixed template in the endorsement hierarchy: a primary
key is derived from the TPM's seed, so its name is the device's AK name for life; it is enrolled.

Boot: OVMF + that swtpm (tpm-tis) PXE-boot a UKI that imagebuilder.uki assembled from Debian's
systemd stub and the bootstrap's Debian kernel, with a probe initramfs (busybox, no TPM tools)
that recreates the AK and quotes PCRs 0-7, 9, 11 over the verifier's fresh nonce with raw TPM
commands on /dev/tpm0, then prints the quote, the AK's public area, the firmware's event log
(/sys/kernel/security/tpm0/binary_bios_measurements) and the PCRs as the kernel reads them.

The first boot is enrolment's: verified with the AK alone (not affirming: no firmware baseline
yet), its firmware PCRs (0-3, 5-7) become the baseline. The second boot is appraised in full, on
what OVMF, the stub and the TPM really did: the quote verifies with the enrolled AK over that
boot's nonce, OVMF's log replays to the quoted PCRs (and to the kernel's reads), the firmware PCRs
equal the baseline, PCR 4 holds our Authenticode hashes of the UKI and of its .linux, PCR 11 the
stub's section events as derived from the UKI's bytes. Refused: boot 1's quote against boot 2's
nonce, another AK, a cut log, another firmware baseline, a UKI with one other byte. The probe UKI stands in for
the bootstrap UKI (same stub, same kernel, same assembly code; the bootstrap does not quote yet).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cidboot.stage.cpio import Entry, archive_bytes
from cidboot.trust.tpm import commands, eventlog, quote
from cidboot.trust.tpm.appraise import FIRMWARE_PCRS, TpmAppraisal, TpmEnrolment, TpmReferences, appraise_tpm
from cidboot.trust.tpm.errors import (
    AkNotEnrolledError,
    NonceMismatchError,
    PcrDigestMismatchError,
    ReferenceMismatchError,
)
from cidboot.trust.tpm.eventlog import EV_EFI_BOOT_SERVICES_APPLICATION
from cidboot.trust.tpm.pe import authenticode_digest
from cidboot.trust.tpm.reference import uki_digest
from imagebuilder import uki
from qemu.harness.vm import Guest
from tests.support.swtpm import Swtpm

pytestmark = [pytest.mark.qemu, pytest.mark.tpm]
DEBS = Path.home() / ".cache/cidboot/debs"
CMDLINE = "console=ttyS0 panic=-1 quiet"

QUOTED = [0, 1, 2, 3, 4, 5, 6, 7, 9, 11]
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t securityfs securityfs /sys/kernel/security
echo "probe: tpm $(cat /sys/class/tpm/tpm0/tpm_version_major 2>&1)"
tpm() {  # one command file to /dev/tpm0, its response to a file; TPM_RC_RETRY (0x922) is retried
  for try in 1 2 3 4 5 6 7 8; do
    exec 3<>/dev/tpm0
    cat "$1" >&3
    dd bs=4096 count=1 <&3 >"$2" 2>/dev/null
    exec 3>&-
    [ "$(dd if="$2" bs=1 skip=6 count=4 2>/dev/null | od -An -tx1 | tr -d ' \\n')" = "00000922" ] || break
  done
}
dump() { echo "$1-BEGIN"; base64 "$2"; echo "$1-END"; }
tpm /ak.cmd /tmp/ak.resp
{ cat /quote.head; dd if=/tmp/ak.resp bs=1 skip=10 count=4 2>/dev/null; cat /quote.tail; } >/tmp/quote.cmd
tpm /tmp/quote.cmd /tmp/quote.resp
dump AK /tmp/ak.resp
dump QUOTE /tmp/quote.resp
dump TPMLOG /sys/kernel/security/tpm0/binary_bios_measurements
for i in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do
  echo "PCR $i $(cat /sys/class/tpm/tpm0/pcr-sha256/$i)"
done
echo "probe: done"
poweroff -f
"""


def _kernel(tmp: Path) -> bytes:
    debs = sorted(DEBS.glob("linux-image-*-amd64_*.deb"))
    if not debs:
        pytest.skip(f"no Debian kernel package in {DEBS} (an image build downloads it)")
    out = tmp / "kernel"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(out)], check=True)
    return next((out / "boot").glob("vmlinuz-*")).read_bytes()


def _factory_ak(base: Path) -> bytes:
    """Manufacture the device's swtpm and learn its AK name (what enrolment records)."""
    with Swtpm(base) as tpm:
        for _ in range(8):
            resp = tpm.send(commands.create_primary_ak())
            if resp[6:10] != bytes.fromhex("00000922"):  # TPM_RC_RETRY
                break
        return quote.parse_public(commands.parse_create_primary(resp)[1]).name


def _section(text: list[str], name: str) -> bytes:
    b, e = text.index(f"{name}-BEGIN"), text.index(f"{name}-END")
    return base64.b64decode("".join(text[b + 1:e]))


@dataclass
class Boot:
    """One power-on of the device: the UKI it booted, what its probe printed, the nonce it quoted."""

    image: bytes
    initrd: bytes
    nonce: bytes
    log: bytes
    ak_public: bytes
    attest: bytes
    signature: bytes
    kernel_pcrs: dict[int, bytes]
    t_done: float


def _boot(tmp: Path, name: str, kernel: bytes, tpm_base: Path) -> Boot:
    """Power the device on with a probe UKI quoting over a fresh nonce; collect what it prints."""
    nonce = os.urandom(32)  # the verifier's challenge (a real device gets it over the network)
    whole = commands.quote(0, nonce, QUOTED)  # the guest splices in the handle CreatePrimary returns
    head, tail = whole[:10], whole[14:]
    busybox = shutil.which("busybox") or "/bin/busybox"
    initrd = archive_bytes([Entry.directory("bin"), Entry.file("bin/busybox", Path(busybox).read_bytes(), 0o755),
                            Entry.file("init", INIT.encode(), 0o755), Entry.file("ak.cmd", commands.create_primary_ak()),
                            Entry.file("quote.head", head), Entry.file("quote.tail", tail)])
    image = uki.build_uki(uki.stub_path("amd64").read_bytes(), kernel, initrd, CMDLINE, uki.os_release("tpm-probe", 1))
    tftp = tmp / f"tftp-{name}"
    tftp.mkdir()
    (tftp / "probe.efi").write_bytes(image)
    with Swtpm(tpm_base, qemu=True) as tpm, \
            Guest.create(name, tmp / name, firmware="uefi", user_tftp=tftp, bootfile="probe.efi",
                         boot_from_network=True, tpm=tpm.ctrl_socket) as g:
        g.wait_for_console(r"probe: tpm 2", 600)
        done, _ = g.wait_for_console(r"probe: done", 120)
        g.wait_for_exit(60)
        text = [ln.text.strip() for ln in g.console.lines]
    raw = _section(text, "TPMLOG")
    (tmp / f"{name}-eventlog.bin").write_bytes(raw)  # for inspection: tpm2_eventlog NAME-eventlog.bin
    attest, signature = commands.parse_quote(_section(text, "QUOTE"))
    return Boot(image, initrd, nonce, raw, commands.parse_create_primary(_section(text, "AK"))[1], attest, signature,
                {int(t.split()[1]): bytes.fromhex(t.split()[2]) for t in text if t.startswith("PCR ")}, done.t)


def _appraise(b: Boot, enrolment: TpmEnrolment, **kw: object) -> TpmAppraisal:
    args: dict[str, object] = dict(attest=b.attest, signature=b.signature, ak_public=b.ak_public, event_log=b.log,
                                   nonce=b.nonce, enrolment=enrolment, required_pcrs=QUOTED)
    args.update(kw)
    if "references" not in args:
        args["references"] = TpmReferences.for_uki(b.image)
    return appraise_tpm(**args)  # type: ignore[arg-type]


def test_ovmf_swtpm_boots_of_a_uki_are_enrolled_then_appraised_from_real_quotes_and_event_logs(tmp_path: Path) -> None:
    enrolled_ak = _factory_ak(tmp_path / "swtpm")
    kernel = _kernel(tmp_path)

    # boot 1, at the factory: verified with the AK alone; its firmware PCRs become the baseline
    first = _boot(tmp_path, "enrol", kernel, tmp_path / "swtpm")
    seen = _appraise(first, TpmEnrolment(frozenset({enrolled_ak})))
    assert not seen.affirming and "firmware" in seen.warnings[0]
    assert quote.parse_public(first.ak_public).name == enrolled_ak  # the same primary AK the factory saw
    enrolment = TpmEnrolment(frozenset({enrolled_ak}), {i: seen.pcrs[i] for i in FIRMWARE_PCRS})

    # boot 2, in the field: the whole appraisal against the enrolment and the UKI's own references
    b = _boot(tmp_path, "field", kernel, tmp_path / "swtpm")
    t = time.perf_counter()
    refs = TpmReferences.for_uki(b.image)  # hashing the 16 MB UKI: done once per UKI, not per appraisal
    t_refs = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    result = _appraise(b, enrolment, references=refs)
    dt = (time.perf_counter() - t) * 1000
    assert result.affirming
    assert result.checks == ("ak enrolled", "quote signature", "nonce fresh", "event log replays to quoted PCRs",
                             "firmware PCRs match enrolment", "UKI and kernel digests (PCR 4)", "UKI sections (PCR 11)")
    for i in QUOTED:  # the kernel's own PCR reads agree with the replay
        assert result.pcrs[i] == b.kernel_pcrs[i], f"PCR {i}"
    apps = [ev for ev in result.log.events if ev.pcr == 4 and ev.event_type == EV_EFI_BOOT_SERVICES_APPLICATION]
    assert [ev.sha256 for ev in apps] == [uki_digest(b.image), authenticode_digest(kernel)]
    initrd_tag = [ev for ev in result.log.events if ev.pcr == 9 and b"Linux initrd" in ev.data]
    assert [ev.sha256 for ev in initrd_tag] == [hashlib.sha256(b.initrd).digest()]  # the kernel's EFI stub, PCR 9

    with pytest.raises(NonceMismatchError):  # boot 1's quote replayed to boot 2's challenge
        _appraise(first, enrolment, nonce=b.nonce, references=TpmReferences.for_uki(b.image))
    with pytest.raises(AkNotEnrolledError):  # a device whose AK is not this one
        _appraise(b, TpmEnrolment(frozenset({b"\x00\x0b" + bytes(32)}), enrolment.firmware_pcrs))
    with pytest.raises(PcrDigestMismatchError):  # OVMF's log without its last event
        _appraise(b, enrolment, event_log=b.log[:eventlog.parse(b.log).events[-1].offset])
    with pytest.raises(ReferenceMismatchError, match="PCR 0"):  # other firmware than at enrolment
        _appraise(b, TpmEnrolment(enrolment.ak_names, {**enrolment.firmware_pcrs, 0: bytes(32)}))
    # a UKI changed by one byte (another cmdline) is named, at the UKI's PCR 4 event
    other = uki.build_uki(uki.stub_path("amd64").read_bytes(), kernel, b.initrd, CMDLINE + " ",
                          uki.os_release("tpm-probe", 1))
    with pytest.raises(ReferenceMismatchError, match="PCR 4 application 0"):
        _appraise(b, enrolment, references=TpmReferences.for_uki(other))
    print(f"\nOVMF + swtpm, 2 boots: quote over PCRs {QUOTED} by the enrolled primary AK {enrolled_ak.hex()[:20]}.. "
          f"verified; firmware PCRs of boot 2 = boot 1's baseline; {len(b.log)}-byte log, {len(result.log.events)} "
          f"events, replays to the quoted PCRs; PCR 4 = UKI {apps[0].sha256.hex()[:16]}.. then kernel "
          f"{apps[1].sha256.hex()[:16]}..; appraisal {dt:.2f} ms (references from the {len(b.image) >> 20} MiB UKI: "
          f"{t_refs:.0f} ms, once per UKI); power-on to probe output {first.t_done:.1f} s, "
          f"{b.t_done:.1f} s")
