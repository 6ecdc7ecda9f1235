"""The harness's QEMU driver on a real kernel: paused start, power-on over QMP, timestamped
console, QMP commands and events (SHUTDOWN, POWERDOWN, reset), exit on power-off, a PXE boot
through QEMU's iPXE ROM from the real boot server inside a namespace; and the console
timeline parser."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.bench_boot import MARKER, busybox_initramfs, reference_boot
from imagebuilder.debpkg import read_deb
from imagebuilder.lock import Lock, fetch_deb
from qemu.harness import timeline
from qemu.harness.vm import Guest, GuestError, GuestSpec

REPO = Path(__file__).resolve().parents[2]
KERNEL_PKG = "linux-image-cloud-amd64"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pin = Lock.load(REPO / "examples/hello/flow.lock").pin(KERNEL_PKG)
    deb = fetch_deb(pin, "refresh examples/hello/flow.lock")
    out = tmp_path_factory.mktemp("kernel") / "vmlinuz"
    out.write_bytes(next(f.data for f in read_deb(deb) if f.path.startswith("boot/vmlinuz-")))
    return out


@pytest.mark.qemu
def test_guest_powers_on_over_qmp_and_timestamps_its_console(kernel: Path, tmp_path: Path) -> None:
    spec = GuestSpec("probe", kernel=kernel, append="console=ttyS0 panic=-1", memory_mib=256)
    with Guest(spec, tmp_path / "g") as g:
        status = g.qmp("query-status")
        assert status["status"] in ("running", "paused") and status["running"] in (True, False)
        line, _ = g.wait_for_console(r"Linux version \S+", 120)
        assert 0 <= line.t < 120
        ended, _ = g.wait_for_console(r"VFS: Unable to mount root|Kernel panic", 180)
        assert ended.t >= line.t  # timestamps are monotonic since power-on
        g.wait_for_exit(60)  # panic=-1 + -no-reboot: the guest ends, QEMU exits
    log = (tmp_path / "g" / "console.log").read_text()
    assert "] Linux version" in log and log.startswith("[")
    assert (tmp_path / "g" / "console.raw").stat().st_size > 0


@pytest.mark.qemu
def test_waiting_for_a_line_that_never_comes_says_so(kernel: Path, tmp_path: Path) -> None:
    spec = GuestSpec("quiet", kernel=kernel, append="console=ttyS0 panic=-1", memory_mib=256)
    with Guest(spec, tmp_path / "g") as g:
        t0 = time.monotonic()
        with pytest.raises(GuestError, match="no console line matching 'never printed'|stopped before"):
            g.wait_for_console("never printed", 3)
        assert time.monotonic() - t0 < 30


@pytest.mark.qemu
def test_guest_power_off_is_a_shutdown_event_and_the_console_log_reads_back(kernel: Path, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(busybox_initramfs())
    g = Guest.create("busybox", tmp_path / "g", kernel=kernel, initrd=initrd, append="console=ttyS0 panic=-1",
                     memory_mib=256)
    with g:
        line, _ = g.wait_for_console(MARKER, 120)
        t, data = g.wait_for_event("SHUTDOWN", 60)  # busybox `poweroff -f` is an ACPI S5 power-off
        assert data == {"guest": True, "reason": "guest-shutdown"} and t >= line.t
        assert g.wait_for_exit(30) == 0
    lines = timeline.read_log((tmp_path / "g" / "console.log").read_text())
    assert [ln.t for ln in lines if ln.text == MARKER] == [line.t]
    assert all(a.t <= b.t for a, b in zip(lines, lines[1:], strict=False))  # since power-on, monotonic


@pytest.mark.qemu
def test_powerdown_button_and_reset_over_qmp(kernel: Path, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(busybox_initramfs("/bin/busybox echo up\nwhile :; do /bin/busybox sleep 1; done\n"))
    with Guest.create("buttons", tmp_path / "g", kernel=kernel, initrd=initrd, memory_mib=256) as g:
        g.wait_for_console(r"^up$", 120)
        g.system_powerdown()  # no acpid in this init: the press is seen (event) but ignored
        g.wait_for_event("POWERDOWN", 10)
        assert g.running
        g.system_reset()  # -no-reboot: a reset ends QEMU, so a dying stage cannot loop
        _t, data = g.wait_for_event("SHUTDOWN", 30)
        assert data["reason"] == "host-qmp-system-reset"
        g.wait_for_exit(30)


@pytest.mark.qemu
@pytest.mark.netns
def test_pxe_boot_through_ipxe_from_the_real_boot_server_in_a_namespace(kernel: Path, tmp_path: Path) -> None:
    ref = reference_boot(kernel, tmp_path, timeout=240)  # with qemu.harness.ra answering iPXE's IPv6 RS
    assert 0 < ref["ipxe_first_line_s"] < ref["ipxe_configured_s"] < ref["to_marker_s"]
    if ref["kernel_start_s"] is not None:  # boot.ipxe passes the bootstrap's `quiet`: the banner may not show
        assert ref["ipxe_configured_s"] < ref["kernel_start_s"] < ref["to_marker_s"]
    assert ref["to_marker_s"] <= ref["powered_off_s"]
    assert ref["ipxe_configured_s"] < 10  # no ~16 s wait for an IPv6 router
    console = (tmp_path / "ref-guest" / "console.log").read_text()
    assert "cidboot: booting the bootstrap for 52:54:00:c1:d0:01" in console
    argv = (tmp_path / "ref-guest" / "qemu.argv.json").read_text()
    assert '"-boot", "n"' in argv and "ifname=tap0" in argv


