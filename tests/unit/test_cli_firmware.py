"""The `firmware` console script: was a parser with no subcommands (`invalid choice: 'run'
(choose from )`); now `run` (the stage, PID 1 only) and `measure` (the reference value)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cidboot.trust.measure import code_hash_of_blobs
from firmware.cli import main
from imagebuilder.build import parse_reference

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_real_subcommands() -> None:
    out = subprocess.run([sys.executable, "-m", "firmware", "--help"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 0 and "measure" in out.stdout and "run" in out.stdout and "PID 1" in out.stdout


def test_run_refuses_outside_pid_1(capsys: pytest.CaptureFixture[str]) -> None:
    """It kexecs or powers off: on a host that would be the host."""
    assert main(["run"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("firmware: error: firmware run is the boot stage")


def test_measure_is_the_code_hash_l0_derives_cdi_1_from(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"kernel" * 1000)
    (tmp_path / "a.img").write_bytes(b"initrd part a")
    (tmp_path / "b.img").write_bytes(b"initrd part b")
    (tmp_path / "boot.cfg").write_bytes(b'{"manifest": "x"}')
    args = [str(tmp_path / "vmlinuz"), str(tmp_path / "a.img"), str(tmp_path / "b.img")]
    assert main(["measure", *args]) == 0
    hexhash = capsys.readouterr().out.strip()
    # firmware.stage: boot_code_hash(kernel, initrds), each initrd on its own, in the script's order
    assert hexhash == code_hash_of_blobs([b"kernel" * 1000, b"initrd part a", b"initrd part b"]).hex()
    assert hexhash != code_hash_of_blobs([b"kernel" * 1000, b"initrd part ainitrd part b"]).hex()
    assert parse_reference(f"bootstrap={hexhash}")[1] == bytes.fromhex(hexhash)  # what --reference takes
    assert main(["measure", *args, "--bootconfig", str(tmp_path / "boot.cfg"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["code_hash"] == hexhash and doc["config_hash"] == hashlib.sha512(b'{"manifest": "x"}').hexdigest()
    assert main(["measure", str(tmp_path / "nope"), str(tmp_path / "a.img")]) == 1
    assert "No such file or directory" in capsys.readouterr().err


def test_measure_takes_a_built_bootstrap_initrd_as_the_server_lists_it(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """initrd.img carrying its runtime layer's runtime.json: measured as boot.ipxe lists it (runtime
    layer, then the rest), the bootstrap's reference value; the two served files give the same."""
    from cidboot.trust.measure import boot_code_hash
    from tests.unit.test_firmware_netboot import bootstrap_initrd

    runtime, rest = bootstrap_initrd()
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "initrd.img").write_bytes(runtime + rest)
    (tmp_path / "runtime.img").write_bytes(runtime)
    (tmp_path / "initrd-rest.img").write_bytes(rest)
    want = boot_code_hash(b"kernel", [runtime, rest]).hex()
    assert main(["measure", str(tmp_path / "vmlinuz"), str(tmp_path / "initrd.img")]) == 0
    assert capsys.readouterr().out.strip() == want
    assert main(["measure", str(tmp_path / "vmlinuz"), str(tmp_path / "runtime.img"),
                 str(tmp_path / "initrd-rest.img")]) == 0
    assert capsys.readouterr().out.strip() == want
