"""PID-1 module ordering from the real Debian cloud kernel's .modinfo (depends=)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from imagebuilder import kmod
from imagebuilder.debpkg import read_deb
from imagebuilder.lock import cache_dir, fetch_deb, resolve_kernel

pytestmark = pytest.mark.build  # downloads pinned packages / builds images

KERNEL = "linux-image-cloud-amd64"  # the metapackage: whatever ABI the mirror serves today


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The kernel's virtio/failover/fw_cfg modules, from the .deb (downloaded once into the cache)."""
    deb = fetch_deb(resolve_kernel(KERNEL)[1], "apt-get update")
    assert deb.parent == cache_dir() / "debs"
    d = tmp_path_factory.mktemp("ko")
    wanted = ("virtio_net.ko", "net_failover.ko", "failover.ko", "virtio.ko", "virtio_ring.ko", "qemu_fw_cfg.ko")
    for f in read_deb(deb):
        if f.kind == "file" and f.path.rsplit("/", 1)[-1] in wanted:
            (d / f.path.rsplit("/", 1)[-1]).write_bytes(f.data)
    return kmod.module_index(d)


def test_virtio_net_loads_after_its_dependencies(modules: dict[str, Path]) -> None:
    order = kmod.load_order(["virtio_net", "qemu_fw_cfg"], modules)
    assert set(order) == {"virtio_net", "net_failover", "failover", "virtio", "virtio_ring", "qemu_fw_cfg"}
    for name in order:
        deps = kmod.modinfo(modules[name].read_bytes()).get("depends", [""])[0]
        for dep in filter(None, deps.split(",")):
            assert order.index(dep) < order.index(name), (dep, name)
    assert order.index("failover") < order.index("net_failover") < order.index("virtio_net")


def test_modinfo_matches_the_kernels_own_tool(modules: dict[str, Path]) -> None:
    info = kmod.modinfo(modules["virtio_net"].read_bytes())
    assert info["name"] == ["virtio_net"]
    proc = subprocess.run(["/sbin/modinfo", "-F", "depends", str(modules["virtio_net"])],
                          capture_output=True, text=True, check=True)
    assert sorted(info["depends"][0].split(",")) == sorted(proc.stdout.strip().split(","))


def test_missing_dependency_is_named(modules: dict[str, Path]) -> None:
    partial = {k: v for k, v in modules.items() if k != "failover"}
    with pytest.raises(kmod.ModuleNotFound, match="kernel module failover not in the image "
                                                  r"\(needed by virtio_net -> net_failover\)"):
        kmod.load_order(["virtio_net"], partial)


