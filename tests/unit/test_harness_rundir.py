"""`python -m qemu.harness boot` without --keep: the run dir shrinks to what a user reads
afterwards (report.json, consoles, the boot server's log and fleet state), and nothing outside
the dirs a run makes is touched. The layout is a real run's (a one-device hello boot)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from qemu.harness import rundir
from qemu.harness.commands import boot as boot_cmd

BIG = 256 * 1024
# (path under OUT, size): what one measured device's run leaves (sizes scaled down)
LAYOUT = {
    "work/firmware/built/vmlinuz": BIG, "work/firmware/built/initrd.img": BIG, "work/firmware/keys/signer.pem": 119,
    "work/bootstrap/built/vmlinuz": BIG, "work/bootstrap/trust-anchor.json": 300,
    "work/workload/built/initrd.img": BIG, "work/workload/flow.yaml": 900, "work/store/blocks/QE/x.data": BIG,
    "lab/tftp/bootstrap/vmlinuz": BIG, "lab/tftp/bootstrap/initrd.img": BIG,
    "lab/devices/device-0/uds": 32, "lab/devices/device-0/nvram.img": BIG, "lab/devices/device-0/fw_cfg-dice.cbor": 559,
    "lab/devices/device-0/run/console.log": 2158, "lab/devices/device-0/run/console.raw": 1875,
    "lab/devices/device-0/run/qemu.argv.json": 855, "lab/devices/device-0/run/qemu.stderr": 0,
    "lab/boot-server.log": 4000, "lab/devices.yaml": 80, "lab/device-roots.json": 300,
    "lab/server-state/leases.json": 200, "lab/server-state/fleet.sqlite": 40960,
    "lab/server-state/fleet-blocks/blocks/AB/y.data": 500,
}
KEPT = ["lab/boot-server.log", "lab/device-roots.json", "lab/devices.yaml", "lab/devices/device-0/run/console.log",
        "lab/devices/device-0/run/console.raw", "lab/devices/device-0/run/qemu.argv.json",
        "lab/devices/device-0/run/qemu.stderr", "lab/server-state/fleet.sqlite"]


def _run_dir(out: Path) -> None:
    for rel, size in LAYOUT.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"\0" * size)


def _files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def test_clean_keeps_what_a_user_reads_and_removes_images_store_keys_and_disks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run_dir(out)
    (out / "report.json").write_text("{}")
    (out / "notes.txt").write_text("the user's own file in --out")  # not ours: stays
    c = rundir.clean(out)
    assert _files(out) == sorted([*KEPT, "notes.txt", "report.json"])
    assert c.kept == KEPT
    assert c.before > 8 * BIG and c.after < 60 * 1024
    assert "kept report.json" in c.line() and "--keep" in c.line()
    assert not (out / "lab" / "devices" / "device-0" / "uds").exists()  # the device secret goes too


def test_clean_spares_the_store_the_user_gave(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run_dir(out)
    rundir.clean(out, spare=(out / "work" / "store",))
    assert (out / "work" / "store" / "blocks" / "QE" / "x.data").exists()
    assert not (out / "work" / "firmware").exists()


def _args(tmp_path: Path, keep: bool) -> argparse.Namespace:
    flow = tmp_path / "hello" / "flow.yaml"
    flow.parent.mkdir(exist_ok=True)
    flow.write_text("name: hello\n")
    return argparse.Namespace(flow=str(flow), out=tmp_path / "out", store=None, keys=[], devices=1, keep=keep)


@pytest.mark.parametrize("keep", [False, True])
def test_boot_cleans_its_run_dir_unless_keep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str], keep: bool) -> None:
    def fake_boot(args: argparse.Namespace, out: Path) -> dict[str, Any]:
        _run_dir(out)
        return {"devices": []}

    monkeypatch.setattr(boot_cmd, "_boot", fake_boot)
    report = boot_cmd.boot(_args(tmp_path, keep))
    out = tmp_path / "out"
    on_disk = json.loads((out / "report.json").read_text())
    if keep:
        assert _files(out) == sorted([*LAYOUT, "report.json"]) and "run_dir" not in on_disk
    else:
        assert _files(out) == sorted([*KEPT, "report.json"])
        assert report["run_dir"]["kept"] == KEPT and on_disk["run_dir"]["bytes_after"] < 60 * 1024
        assert "run dir cleaned:" in capsys.readouterr().err


def test_a_failed_boot_is_cleaned_too_and_the_error_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_boot(args: argparse.Namespace, out: Path) -> dict[str, Any]:
        _run_dir(out)
        raise RuntimeError("boot server did not start")

    monkeypatch.setattr(boot_cmd, "_boot", fake_boot)
    with pytest.raises(RuntimeError, match="did not start"):
        boot_cmd.boot(_args(tmp_path, False))
    assert _files(tmp_path / "out") == KEPT
