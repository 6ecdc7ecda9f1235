"""The boot benchmark's path from a harness report to its table, JSON and SVG, on a recorded
console (the guest stages are not needed: the console protocol of docs/boot-chain.md is)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from bench import bench_boot
from qemu.harness import timeline

SAMPLE_CONSOLE = """\
[   0.053] SeaBIOS (version 1.16.2-debian-1.16.2-1)
[   0.402] [    0.000000] Linux version 6.1.0-56-cloud-amd64
[   2.611] cidboot-stage: firmware start
[   9.874] cidboot-stage: firmware handover code=0123456789abcdef
[  10.310] [    0.000000] Linux version 6.1.0-56-cloud-amd64
[  12.950] cidboot-stage: bootstrap start mode=measured
[  21.402] cidboot-stage: bootstrap handover manifest=bafyreiexample
[  24.118] cidboot-stage: agent start
[  26.500] cidboot-stage: agent ready url=http://10.77.0.10:8000
[  27.020] cidboot: result greeting="hello, world"
"""


def sample_report(console: str) -> dict[str, Any]:
    tl = timeline.parse(timeline.read_log(console))
    return {"accel": "tcg", "devices": [{"name": "device-0", "appraisal": {"status": "affirming", "reasons": []},
                                         "boot_timeline": tl.to_obj()}]}


def test_stage_times_from_a_recorded_console() -> None:
    report = sample_report(SAMPLE_CONSOLE)
    assert report["devices"][0]["boot_timeline"]["events"]["agent"] == {"start": 24.118, "ready": 26.5}
    assert bench_boot.stages_from_report(report) == {"firmware": 9.874, "bootstrap": 11.528, "image": 5.098}


def test_each_stage_splits_into_its_boot_and_its_work() -> None:
    phases = bench_boot.phases_from_report(sample_report(SAMPLE_CONSOLE))
    assert phases == [("firmware boot", 0.0, 2.611), ("firmware", 2.611, 7.263),
                      ("bootstrap boot", 9.874, 3.076), ("bootstrap", 12.95, 8.452),
                      ("image boot", 21.402, 2.716), ("image", 24.118, 2.382)]
    rows, bars = bench_boot.summarize(20.0, bench_boot.stages_from_report(sample_report(SAMPLE_CONSOLE)), None, phases)
    assert bars[-1] == ("boot | work", phases) and rows[-1] == {"boot": "ours: image work", "seconds": 2.38}


def test_the_median_boot_is_one_real_boot_of_the_runs() -> None:
    slow = sample_report(SAMPLE_CONSOLE)
    fast = sample_report(SAMPLE_CONSOLE.replace("[  26.500] cidboot-stage: agent ready",
                                                "[  25.000] cidboot-stage: agent ready"))
    slower = sample_report(SAMPLE_CONSOLE.replace("[  26.500] cidboot-stage: agent ready",
                                                  "[  40.000] cidboot-stage: agent ready"))
    assert sum(bench_boot.stages_from_report(fast).values()) == 25.0
    assert bench_boot.median_boot([slower, fast, slow]) is slow  # not the first, not the fastest
    assert bench_boot.median_boot([slower, fast]) is fast  # an even count: the lower middle
    assert bench_boot.median_boot([slow]) is slow


def test_rows_and_svg(tmp_path: Path) -> None:
    rows, bars = bench_boot.summarize(20.0, bench_boot.stages_from_report(sample_report(SAMPLE_CONSOLE)))
    assert rows[0] == {"boot": "plain iPXE + busybox (reference)", "seconds": 20.0}
    assert rows[-1]["seconds"] == 26.5 and rows[-1]["ratio_vs_reference"] == 1.32
    bench_boot.svg_timeline(bars, tmp_path / "t.svg")
    svg = ET.parse(tmp_path / "t.svg").getroot()  # well-formed
    titles = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}title")]
    assert titles == ["reference: 20.00 s", "firmware: 9.87 s", "bootstrap: 11.53 s", "image: 5.10 s"]
    only_ref, ref_bars = bench_boot.summarize(20.0, {})  # a run whose chain did not come up
    assert len(only_ref) == 1 and len(ref_bars) == 1


def test_main_with_a_report_writes_json_and_svg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = tmp_path / "report.json"
    report.write_text(json.dumps(sample_report(SAMPLE_CONSOLE)))
    monkeypatch.setattr(bench_boot, "pinned_kernel", lambda dest: dest)
    runs = iter([21.0, 19.0, 22.0])
    monkeypatch.setattr(bench_boot, "reference_boot",
                        lambda kernel, work, accel="tcg": {"to_marker_s": next(runs), "accel": accel})
    assert bench_boot.main(["--out", str(tmp_path / "out"), "--report", str(report), "--quick"]) == 0
    doc = json.loads((tmp_path / "out" / "bench_boot.json").read_text())
    assert doc["rows"][0]["seconds"] == 21.0  # the median of three reference boots
    assert doc["notes"]["accel"] == "tcg" and doc["notes"]["appraisal"] == "affirming"
    assert (tmp_path / "out" / "boot_timeline.svg").read_text().startswith("<svg")


def test_busybox_initramfs_is_reproducible_and_has_a_console() -> None:
    from imagebuilder.cpio import decompress, read_newc

    data = bench_boot.busybox_initramfs()
    assert data == bench_boot.busybox_initramfs()
    names = {m.path for m in read_newc(decompress(data))}
    assert {"init", "bin/busybox", "dev/console"} <= names


def test_each_firmware_kind_is_compared_with_its_own_plain_boot(tmp_path: Path) -> None:
    """uefi-* boots against the plain UEFI PXE boot, bios-ipxe against plain iPXE; the summary
    names the reference each figure was divided by."""
    from bench import summary

    report = sample_report(SAMPLE_CONSOLE)  # 26.5 s power-on to ready
    refs = {bench_boot.REF_IPXE: 10.0, bench_boot.REF_UEFI: 20.0}
    rows, bars = bench_boot.firmware_rows({"bios-ipxe": report, "uefi-pxe": report}, refs)
    by = {r["boot"]: r for r in rows}
    assert by["ours (bios-ipxe): power-on to agent ready"]["ratio_vs_reference"] == 2.65
    assert by["ours (uefi-pxe): power-on to agent ready"]["ratio_vs_reference"] == 1.32
    assert len(bars) == 2
    doc = {"rows": [{"boot": bench_boot.REF_IPXE, "seconds": 10.0}, {"boot": bench_boot.REF_UEFI, "seconds": 20.0},
                    *rows], "notes": {"accel": "tcg"}}
    figs = {f.name: f for f in summary._boot(doc)}
    uefi = figs["boot (tcg) ours (uefi-pxe): power-on to agent ready vs plain UEFI PXE + busybox UKI"]
    assert uefi.reference == 20.0 and uefi.ratio == 1.32
    assert figs["boot (tcg) ours (bios-ipxe): power-on to agent ready vs plain iPXE + busybox"].reference == 10.0


def test_an_arm64_row_is_not_divided_by_an_x86_64_reference() -> None:
    """AAVMF's uefi-http boot of the hello flow gets its own row (arch named) and, with no plain
    AAVMF boot in the run, no ratio (never an x86_64 one): the summary shows its seconds and says why."""
    from bench import summary

    report = sample_report(SAMPLE_CONSOLE)
    refs = {bench_boot.REF_IPXE: 10.0, bench_boot.REF_UEFI: 20.0}
    rows, bars = bench_boot.firmware_rows({"uefi-http": report}, refs, "arm64")
    (row,) = rows
    assert row["boot"] == "ours (uefi-http, arm64): power-on to agent ready" and row["arch"] == "arm64"
    assert row["seconds"] == 26.5 and row["ratio_vs_reference"] is None and "AAVMF" in row["note"]
    assert bars[0][0] == "ours uefi-http, arm64"
    doc = {"rows": [{"boot": bench_boot.REF_IPXE, "seconds": 10.0}, *rows], "notes": {"accel": "tcg"}}
    (fig,) = summary._boot(doc)
    assert fig.name == "boot (tcg) ours (uefi-http, arm64): power-on to agent ready"
    assert fig.ours == 26.5 and fig.reference is None and fig.ratio is None and "AAVMF" in (fig.note or "")
    # with the plain AAVMF boot of the same run, the row is divided by it
    rows, _ = bench_boot.firmware_rows({"uefi-http": report}, {**refs, bench_boot.REF_AAVMF: 13.25}, "arm64")
    assert rows[0]["ratio_vs_reference"] == 2.0 and rows[0]["reference"] == bench_boot.REF_AAVMF
    doc = {"rows": [{"boot": bench_boot.REF_AAVMF, "seconds": 13.25, "arch": "arm64"}, *rows], "notes": {"accel": "tcg"}}
    (fig,) = summary._boot(doc)
    assert fig.name.endswith("vs plain AAVMF HTTP Boot, same kernel, no userspace") and fig.ratio == 2.0


def test_arm64_boots_uefi_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        bench_boot.main(["--arch", "arm64", "--firmware", "uefi-http,dice"])
    assert e.value.code == 2 and "--arch arm64 boots UEFI only" in capsys.readouterr().err


def test_arm64_boots_the_harness_with_its_arch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def boot(kind: str, out: Path, arch: str = "x86_64") -> dict[str, Any]:
        calls.append((kind, arch))
        return sample_report(SAMPLE_CONSOLE)

    monkeypatch.setattr(bench_boot, "pinned_kernel", lambda dest, arch="x86_64": dest)
    monkeypatch.setattr(bench_boot, "harness_boot", boot)
    monkeypatch.setattr(bench_boot, "reference_boot", lambda kernel, work, accel="tcg", uefi=False, arch="x86_64":
                        {"to_marker_s": 13.25 if arch == "arm64" else 10.0, "uefi": uefi, "arch": arch})
    monkeypatch.setattr("qemu.harness.accel.choose", lambda kernel: "tcg")
    assert bench_boot.main(["--out", str(tmp_path / "out"), "--arch", "arm64", "--quick", "--runs", "2"]) == 0
    doc = json.loads((tmp_path / "out" / "bench_boot.json").read_text())
    assert calls == [("uefi-http", "arm64")] and doc["notes"]["arch"] == "arm64"
    assert not doc["notes"]["uefi_reference_runs"]  # the x86_64 UEFI reference is no arm64 reference
    assert len(doc["notes"]["arm64_reference_runs"]) == 2  # one before our boot, one after
    row = next(r for r in doc["rows"] if r["boot"] == "ours (uefi-http, arm64): power-on to agent ready")
    assert row["ratio_vs_reference"] == 2.0 and row["reference"] == bench_boot.REF_AAVMF
