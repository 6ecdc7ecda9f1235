"""The content-addressing CLIs as a user runs them: exit codes, stdout, stderr."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, env: dict[str, str] | None = None, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, env={**os.environ, **(env or {})},
                          input=input, timeout=120)


def test_add_cat_round_trip_with_env_store(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    data = random.Random(1).randbytes(300_000)
    f.write_bytes(data)
    env = {"CIDBOOT_STORE": str(tmp_path / "store")}
    out = run("imagebuilder", "add", str(f), env=env)
    assert out.returncode == 0, out.stderr
    cid = out.stdout.decode().strip().splitlines()[-1]
    assert cid.startswith("Qm")
    assert (tmp_path / "store" / "blocks" / "SHARDING").exists()
    cat = run("imagebuilder", "cat", cid, env=env)
    assert cat.returncode == 0 and cat.stdout == data


def test_add_json_and_only_hash(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"hello\n")
    out = run("imagebuilder", "add", "--only-hash", "--cid-version", "1", "--json", str(f))
    doc = json.loads(out.stdout)
    assert doc["cid"] == "bafkreicysg23kiwv34eg2d7qweipxwosdo2py4ldv42nbauguluen5v6am" and doc["size"] == 6


def test_errors_go_to_stderr_with_exit_codes(tmp_path: Path) -> None:
    bad = run("imagebuilder", "cat", "not-a-cid", "--store", str(tmp_path))
    assert bad.returncode == 1 and bad.stdout == b"" and b"imagebuilder: error: invalid CID" in bad.stderr
    missing = run("imagebuilder", "add", str(tmp_path / "nope"))
    assert missing.returncode == 1 and b"no such file" in missing.stderr
    usage = run("imagebuilder", "car")
    assert usage.returncode == 2
    corrupt = tmp_path / "x.car"
    corrupt.write_bytes(b"\x05garbage")
    imp = run("imagebuilder", "car", "import", str(corrupt), "--store", str(tmp_path / "s"))
    assert imp.returncode == 1 and b"CAR header" in imp.stderr


@pytest.mark.parametrize("cmd", [["imagebuilder"], ["bootstrap"], ["agent"], ["firmware"], ["imagebuilder", "car", "export"]])
def test_help_everywhere(cmd: list[str]) -> None:
    out = run(*cmd, "--help")
    assert out.returncode == 0 and b"usage:" in out.stdout


def test_car_export_import_and_gateway_cat(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "k").write_bytes(random.Random(2).randbytes(500_000))
    a, b = tmp_path / "a", tmp_path / "b"
    root = run("imagebuilder", "add", "-q", "--cid-version", "1", str(tree), "--store", str(a)).stdout.decode().split()[-1]
    assert run("imagebuilder", "car", "export", root, "-o", str(tmp_path / "t.car"), "--store", str(a)).returncode == 0
    imp = run("imagebuilder", "car", "import", str(tmp_path / "t.car"), "--store", str(b))
    assert imp.stdout.decode().strip() == root
    gw = subprocess.Popen([sys.executable, "-m", "bootstrap", "gateway", "--store", str(b), "--listen", "127.0.0.1:0"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert gw.stdout is not None
        line = gw.stdout.readline().decode()
        url = line.split()[-1]
        out = run("imagebuilder", "cat", f"{root}/k", "--store", str(tmp_path / "c"), "--gateway", url)
        assert out.returncode == 0, out.stderr
        assert out.stdout == (tree / "k").read_bytes()
    finally:
        gw.terminate()
        gw.wait(10)


