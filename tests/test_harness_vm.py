"""The harness's QEMU driver on a real kernel: paused start, power-on over QMP, timestamped
console, QMP commands and events, exit on power-off; and the console timeline parser."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from imagebuilder.debpkg import read_deb
from imagebuilder.lock import Lock, fetch_deb
from qemu.harness import accel, timeline
from qemu.harness.vm import ConsoleLine, Guest, GuestError, GuestSpec

REPO = Path(__file__).resolve().parent.parent
KERNEL_PKG = "linux-image-6.1.0-56-cloud-amd64"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pin = Lock.load(REPO / "examples/hello/flow.lock").debs[KERNEL_PKG]
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


def test_kvm_is_only_used_when_forced_or_proven(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CIDBOOT_ACCEL", "tcg")
    assert accel.choose(None) == "tcg"
    monkeypatch.setenv("CIDBOOT_ACCEL", "auto")
    assert accel.choose(None) == "tcg"  # nothing to probe with
    monkeypatch.setenv("CIDBOOT_ACCEL", "fast")
    with pytest.raises(ValueError, match="tcg, kvm or auto"):
        accel.choose(None)


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
