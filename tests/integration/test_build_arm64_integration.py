"""arm64 images (issue 14 item 3), built by the real `imagebuilder build` from the committed arm64
flows and locks, with the Debian arm64 packages and aarch64 wheels they pin (fetched into
~/.cache/cidboot; on an amd64 host through the private arm64 apt state):

- the arm64 bootstrap UKI (Debian's linuxaa64.efi.stub from the pinned systemd-boot-efi .deb) is
  reproducible: built twice from clean layer caches, same bytes, same CID; a PE for AArch64;
- every ELF file the hello image ships is EM_AARCH64, and its kernel is an arm64 Image;
- the two-device example builds for arm64 too.
(AAVMF booting the arm64 hello to a ready agent: tests/e2e/test_uefi_arm64_qemu.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cidboot.ipld.cid import CID
from cidboot.ipld.unixfs.exporter import export_file
from cidboot.stage.cpio import iter_newc
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.manifest import RootOfTrust, SignedManifest
from imagebuilder import uki
from imagebuilder.cpio import decompress

pytestmark = [pytest.mark.build]  # three arm64 builds (minutes)
REPO = Path(__file__).resolve().parents[2]
EM_AARCH64, EM_X86_64 = 183, 62


def _build(flow: Path, store: Path, cache: Path, *extra: str) -> tuple[dict[str, object], float]:
    t = time.monotonic()
    env = {**os.environ, "CIDBOOT_BUILD_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(flow), "--json", "--store", str(store),
                           *extra], capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout)), time.monotonic() - t


def _copy(src: Path, dst: Path, anchor: bool = False) -> None:
    """The flow dir with a fresh key for every key its arm64 flow names (and a trust anchor)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("keys", "trust-anchor.json", "__pycache__", "built"))
    names = yaml.safe_load((dst / "flow-arm64.yaml").read_text())["trust"]["keys"]
    pairs = [keys.generate() for _ in names]
    for k, name in zip(pairs, names, strict=True):
        keys.write_keypair(k, (dst / name).with_suffix(""))
    if anchor:
        keys.write_root(RootOfTrust.from_public_keys([k.public_key() for k in pairs], 1), dst / "trust-anchor.json")


def test_arm64_bootstrap_uki_built_twice_from_clean_caches_is_identical(tmp_path: Path) -> None:
    _copy(REPO / "bootstrap/image", tmp_path / "bootstrap", anchor=True)
    flow = tmp_path / "bootstrap/flow-arm64.yaml"
    first, t1 = _build(flow, tmp_path / "store", tmp_path / "cache-1", "--uki", f"{tmp_path / 'uki-1'}/")
    second, t2 = _build(flow, tmp_path / "store-2", tmp_path / "cache-2", "--uki", f"{tmp_path / 'uki-2'}/")
    print(f"\narm64 bootstrap UKI builds from clean layer caches: {t1:.1f} s, {t2:.1f} s")
    assert isinstance(first["uki"], dict) and isinstance(second["uki"], dict)
    assert first["uki"]["cid"] == second["uki"]["cid"] and first["manifest"] == second["manifest"]
    a = (tmp_path / "uki-1/bootstrap-arm64.efi").read_bytes()
    assert a == (tmp_path / "uki-2/bootstrap-arm64.efi").read_bytes()
    pe = uki.parse_pe(a, "arm64 UKI")
    assert pe.machine == 0xAA64
    assert [s.name for s in pe.sections][-4:] == list(uki.UKI_SECTIONS)
    assert str(first["uki"]["stub"]).endswith("_arm64.deb")  # the pinned stub, not a host file
    store = Blockstore(tmp_path / "store")
    assert b"".join(export_file(CID.parse(str(first["uki"]["cid"])), store.get)) == a


def _elf_machines(archive: bytes) -> dict[str, int]:
    out = {}
    for m, data in iter_newc(decompress(archive)):
        if stat.S_ISREG(m.mode) and data[:4] == b"\x7fELF":
            out[m.path] = struct.unpack_from("<H", data, 18)[0]
    return out


def test_arm64_examples_build_and_ship_only_aarch64_code(tmp_path: Path) -> None:
    _copy(REPO / "examples/hello", tmp_path / "hello")
    _copy(REPO / "examples/two-device", tmp_path / "two-device")
    hello, t1 = _build(tmp_path / "hello/flow-arm64.yaml", tmp_path / "store", tmp_path / "cache")
    two, t2 = _build(tmp_path / "two-device/flow-arm64.yaml", tmp_path / "store", tmp_path / "cache")
    print(f"\narm64 builds: hello {t1:.1f} s, two-device {t2:.1f} s")
    store = Blockstore(tmp_path / "store")
    for result in (hello, two):
        m = SignedManifest.decode(store.get(CID.parse(str(result["manifest"])))).manifest
        parts = {lyr.role: b"".join(export_file(lyr.cid, store.get)) for lyr in m.layers}
        assert parts["kernel"][0x38:0x3C] == b"ARM\x64"  # the arm64 Image header magic
        assert "console=ttyAMA0" in m.cmdline
        machines = _elf_machines(parts["runtime"])
        assert any(n.endswith("python3.11") for n in machines) and any(".so" in n for n in machines)
        assert set(machines.values()) == {EM_AARCH64}, {n: v for n, v in machines.items() if v != EM_AARCH64}
        # kernel modules are the agent layer's (the runtime is the arch's shared one: docs/images.md)
        agent = _elf_machines(parts["agent"])
        assert set(agent.values()) == {EM_AARCH64}
        mods = [n for n in agent if n.endswith(".ko")]
        assert not [n for n in machines if n.endswith(".ko")]
        assert any("virtio_net" in n for n in mods) and any("virtio_pci" in n for n in mods)
