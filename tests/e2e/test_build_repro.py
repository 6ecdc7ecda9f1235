"""Reproducible builds from the real pinned Debian packages: same flow -> same manifest CID;
one changed operation -> only the operations layer and the manifest change; stale pins fail
clearly and write nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cidboot.ipld.unixfs.exporter import export_file
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.manifest import SignedManifest
from imagebuilder import flowfile
from imagebuilder.lock import lock_path, make_lock

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A layer cache shared by the tests of this module (the first build fills it)."""
    return tmp_path_factory.mktemp("layer-cache")


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("flow") / "hello"
    shutil.copytree(REPO / "examples/hello", d, ignore=shutil.ignore_patterns("keys", "flow.lock", "__pycache__"))
    keys.write_keypair(keys.generate(), d / "keys/signer-1")
    ff = flowfile.load(d / "flow.yaml")
    lock_path(ff.path).write_text(make_lock(ff).to_json())  # apt-get download into ~/.cache/cidboot (reused)
    return d / "flow.yaml"


def _build(flow: Path, cache: Path, *out: str) -> dict[str, object]:
    env = {**os.environ, "CIDBOOT_BUILD_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(flow), "--json", *out],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


@pytest.mark.qemu
def test_image_boots_with_python_as_init(hello: Path, tmp_path: Path, warm_cache: Path) -> None:
    """Kernel + concatenated layers boot under QEMU (TCG): Python runs as PID 1 and loads the
    flow's kernel modules; the agent, started without the bootstrap's hand-off, refuses with its
    reason on the console and cidboot.stage.pid1 powers off (no panic)."""
    from cidboot.ipld.cid import CID
    from tests.support.boot_network import boot_until

    store = tmp_path / "store"
    res = _build(hello, warm_cache, "--store", str(store))
    bs = Blockstore(store)
    m = SignedManifest.decode(bs.get(CID.parse(str(res["manifest"])))).manifest
    parts = {lyr.role: b"".join(export_file(lyr.cid, bs.get)) for lyr in m.layers}
    console, _ = boot_until(tmp_path, None, until=r"reboot: Power down", timeout=180, kernel=parts["kernel"],
                            initrd=b"".join(parts[r] for r in ("runtime", "agent", "operations", "config")),
                            append=f"{m.cmdline} panic=-1", memory_mib=512)
    assert "Kernel panic" not in console, console[-3000:]
    assert "cidboot: fatal:" in console and "boot.json" in console, console[-3000:]
    # the flow's kernel modules were loaded by /init with finit_module, dependencies first
    mods = re.search(r"cidboot: loaded ([a-z0-9_ ]+)", console)
    assert mods, console[-3000:]
    loaded = mods[1].split()
    assert {"virtio_net", "virtio_pci", "virtio", "virtio_ring", "failover", "net_failover"} <= set(loaded)
    assert loaded.index("virtio") < loaded.index("virtio_net") and loaded.index("failover") < loaded.index("net_failover")
    assert "reboot: Power down" in console
