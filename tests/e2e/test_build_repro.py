"""The hello image built from the real pinned Debian packages boots under QEMU with Python as
PID 1. The build fixtures are the reproducibility tests' (tests/integration/test_build_repro_integration.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cidboot.ipld.unixfs.exporter import export_file
from cidboot.store.blockstore import Blockstore
from cidboot.trust.manifest import SignedManifest
from tests.support.hello_flow import build_json


@pytest.mark.qemu
def test_image_boots_with_python_as_init(hello: Path, tmp_path: Path, warm_cache: Path) -> None:
    """Kernel + concatenated layers boot under QEMU (TCG): Python runs as PID 1 and loads the
    flow's kernel modules; the agent, started without the bootstrap's hand-off, refuses with its
    reason on the console and cidboot.stage.pid1 powers off (no panic)."""
    from cidboot.ipld.cid import CID
    from tests.support.boot_network import boot_until

    store = tmp_path / "store"
    res = build_json(hello, warm_cache, "--store", str(store))
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
