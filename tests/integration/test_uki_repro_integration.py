"""The bootstrap UKI is reproducible: built twice by `imagebuilder build --uki` from two clean layer caches (the pinned Debian
packages come from ~/.cache/cidboot): same flow, same UKI bytes, same CID. (OVMF booting the UKI
to a ready agent, over PXE and HTTP Boot: tests/e2e/test_uefi_boot_qemu.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cidboot.ipld.cid import CID
from cidboot.ipld.unixfs.exporter import export_file
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.manifest import RootOfTrust

pytestmark = [pytest.mark.build]  # builds the bootstrap twice (minutes)
REPO = Path(__file__).resolve().parents[2]


def _build(flow: Path, store: Path, cache: Path, uki_dir: Path) -> tuple[dict[str, object], float]:
    t = time.monotonic()
    env = {**os.environ, "CIDBOOT_BUILD_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(flow), "--json", "--store", str(store),
                           "--uki", f"{uki_dir}/"], capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout)), time.monotonic() - t


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The bootstrap flow (fresh keys, a trust anchor of its own) built twice into UKIs."""
    base = tmp_path_factory.mktemp("uki")
    flow_dir = base / "bootstrap"
    shutil.copytree(REPO / "bootstrap/image", flow_dir,
                    ignore=shutil.ignore_patterns("keys", "trust-anchor.json", "__pycache__", ".gitignore"))
    k = keys.generate()
    keys.write_keypair(k, flow_dir / "keys/signer-1")
    keys.write_root(RootOfTrust.from_public_keys([k.public_key()], 1), flow_dir / "trust-anchor.json")
    first, t1 = _build(flow_dir / "flow.yaml", base / "store", base / "cache-1", base / "tftp")
    second, t2 = _build(flow_dir / "flow.yaml", base / "store-2", base / "cache-2", base / "tftp-2")
    print(f"\nUKI builds from clean layer caches: {t1:.1f} s, {t2:.1f} s")
    return {"first": first, "second": second, "base": base}


def test_uki_built_twice_from_clean_caches_is_byte_identical(built: dict[str, object]) -> None:
    first, second, base = built["first"], built["second"], built["base"]
    assert isinstance(first, dict) and isinstance(second, dict) and isinstance(base, Path)
    assert first["uki"]["cid"] == second["uki"]["cid"]
    a, b = (base / "tftp/bootstrap-x86_64.efi").read_bytes(), (base / "tftp-2/bootstrap-x86_64.efi").read_bytes()
    assert a == b
    # the store holds the same bytes under that CID, pinned
    store = Blockstore(base / "store")
    cid = CID.parse(first["uki"]["cid"])
    assert b"".join(export_file(cid, store.get)) == a
    assert cid in set(store.pins())
    print(f"UKI {cid}: {len(a)} bytes")
