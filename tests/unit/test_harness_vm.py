"""The harness's QEMU driver on a real kernel: paused start, power-on over QMP, timestamped
console, QMP commands and events (SHUTDOWN, POWERDOWN, reset), exit on power-off, a PXE boot
through QEMU's iPXE ROM from the real boot server inside a namespace; and the console
timeline parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebuilder.debpkg import read_deb
from imagebuilder.lock import Lock, fetch_deb
from qemu.harness import accel, timeline
from qemu.harness.vm import ConsoleLine, Guest, GuestError, GuestSpec

REPO = Path(__file__).resolve().parents[2]
KERNEL_PKG = "linux-image-cloud-amd64"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pin = Lock.load(REPO / "examples/hello/flow.lock").pin(KERNEL_PKG)
    deb = fetch_deb(pin, "refresh examples/hello/flow.lock")
    out = tmp_path_factory.mktemp("kernel") / "vmlinuz"
    out.write_bytes(next(f.data for f in read_deb(deb) if f.path.startswith("boot/vmlinuz-")))
    return out


def test_keyword_guest_argv() -> None:
    g = Guest.create("k", Path("/nonexistent/state"), kernel=Path("/k"), initrd=Path("/i"),
                     fw_cfg={"opt/cidboot/dice": Path("/h.cbor")}, nic=("tap3", "52:54:00:00:00:07"),
                     disk=Path("/nv.img"), memory_mib=512, no_reboot=False)
    argv = g.spec.argv(Path("/s/qmp.sock"))
    joined = " ".join(argv)
    assert "-no-reboot" not in argv and "-S" in argv and argv[argv.index("-m") + 1] == "512"
    assert "-fw_cfg name=opt/cidboot/dice,file=/h.cbor" in joined
    assert "tap,id=n0,ifname=tap3,script=no,downscript=no" in joined and "mac=52:54:00:00:00:07" in joined
    assert "file=/nv.img,format=raw,if=virtio" in joined
    assert argv[argv.index("-cpu") + 1] == "qemu64,+rdrand"  # TCG: the RNG is seeded at boot, no jitter-entropy wait
    kvm = GuestSpec("k", kernel=Path("/k"), accel="kvm").argv(Path("/s"))
    assert kvm[kvm.index("-cpu") + 1] == "host" and "-no-reboot" in kvm
    assert "-icount" not in argv
    counted = GuestSpec("k", kernel=Path("/k"), icount=0).argv(Path("/s"))  # measuring: instructions, not wall-clock
    assert counted[counted.index("-icount") + 1] == "shift=0,sleep=on"


def test_kvm_is_only_used_when_forced_or_proven(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CIDBOOT_ACCEL", "tcg")
    assert accel.choose(None) == "tcg"
    monkeypatch.setenv("CIDBOOT_ACCEL", "auto")
    assert accel.choose(None) == "tcg"  # nothing to probe with
    monkeypatch.setenv("CIDBOOT_ACCEL", "fast")
    with pytest.raises(ValueError, match="tcg, kvm or auto"):
        accel.choose(None)
    monkeypatch.setenv("CIDBOOT_ACCEL", "auto")  # the probe's verdict is cached per host, QEMU, kernel
    monkeypatch.setattr(accel, "CACHE", tmp_path / "kvm-probe.json")
    calls: list[Path] = []

    def fake_probe(kernel: Path, timeout: float = 30) -> accel.Probe:
        calls.append(kernel)
        return accel.Probe(False, "QEMU: failed to set MSR", 0.1)

    monkeypatch.setattr(accel, "probe_kvm", fake_probe)
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"kernel")
    assert accel.choose(k) == "tcg" and accel.choose(k) == "tcg" and calls == [k]
    assert "failed to set MSR" in (tmp_path / "kvm-probe.json").read_text()


def test_timeline_from_console_markers() -> None:
    lines = [ConsoleLine(0.8, "[    0.000000] Linux version 6.1"),
             ConsoleLine(2.0, "cidboot-stage: firmware start"),
             ConsoleLine(5.5, "cidboot-stage: firmware handover code=0123456789abcdef"),
             ConsoleLine(7.0, "cidboot-stage: bootstrap start mode=measured"),
             ConsoleLine(11.25, "cidboot-stage: bootstrap handover manifest=bafyabc"),
             ConsoleLine(15.0, "cidboot-stage: agent start"),
             ConsoleLine(16.5, "cidboot-stage: agent ready url=http://10.77.0.10:8000"),
             ConsoleLine(17.0, "cidboot: refused: layer bafyxyz: hash mismatch")]
    tl = timeline.parse(lines)
    assert tl.stage_seconds() == {"firmware": 5.5, "bootstrap": 5.75, "image": 5.25}
    assert tl.fields["agent ready"] == {"url": "http://10.77.0.10:8000"}
    assert tl.problems == [(17.0, "refused", "layer bafyxyz: hash mismatch")]
    unmeasured = timeline.parse([ConsoleLine(4.0, "cidboot-stage: bootstrap start mode=unmeasured"),
                                 ConsoleLine(9.0, "cidboot-stage: bootstrap handover manifest=bafyabc"),
                                 ConsoleLine(12.0, "cidboot-stage: agent ready url=http://x:8000")])
    assert unmeasured.stage_seconds() == {"bootstrap": 9.0, "image": 3.0}


def test_arm64_guest_boots_aavmf_on_virt_under_tcg(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = GuestSpec("a", firmware="uefi", uefi_vars=Path("/s/AAVMF_VARS.fd"), tap="tap0", network_boot=True,
                     uefi_http=True, disk=Path("/nv.img"), arch="arm64")
    argv = spec.argv(Path("/s/qmp.sock"))
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-aarch64" and argv[argv.index("-machine") + 1] == "virt"
    assert argv[argv.index("-cpu") + 1] == "max,pauth-impdef=on"
    assert "file=/usr/share/AAVMF/AAVMF_CODE.fd" in joined and "unit=1,file=/s/AAVMF_VARS.fd" in joined
    assert "OVMF" not in joined and "virtio-net-pci,netdev=n0" in joined and ",romfile=,bootindex=0" in joined
    assert spec.firmware_files()[2] == "qemu-efi-aarch64"
    for bad in (GuestSpec("b", arch="arm64"), GuestSpec("b", firmware="uefi", uefi_vars=Path("/v"), arch="arm64",
                                                        kernel=Path("/k")), GuestSpec("b", arch="riscv64")):
        with pytest.raises(GuestError, match="arm64 guests boot AAVMF|not one of"):
            bad.argv(Path("/s"))
    monkeypatch.setattr(accel.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("CIDBOOT_ACCEL", "auto")
    assert accel.choose(None, "arm64") == "tcg"
    monkeypatch.setenv("CIDBOOT_ACCEL", "kvm")
    with pytest.raises(ValueError, match="cannot run an arm64 guest"):
        accel.choose(None, "arm64")
