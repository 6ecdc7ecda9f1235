"""`bootstrap serve --arch`: a server offers boot files for the device architectures it is told,
and builds nothing for the others (the harness's server, in a namespace with no Debian mirror,
used to try to build the arm64 bootstrap at start on a machine that had never fetched its packages)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bootstrap import bootfiles
from bootstrap.commands import serve
from cidboot.errors import CidbootError
from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore


def _tftp_root(tmp_path: Path, arch: str) -> Path:
    root = tmp_path / "tftp"
    for name in bootfiles.ARCH_FILES[arch]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"built by the harness: " + name.encode())
    return root


def test_served_names_per_arch_cover_every_served_name_once() -> None:
    assert bootfiles.served_names(["arm64"]) == [bootfiles.UKI_NAMES["arm64"]]
    x86 = bootfiles.served_names(["x86_64"])
    assert bootfiles.UKI_NAMES["arm64"] not in x86 and bootfiles.KERNEL_NAME in x86
    assert sorted(bootfiles.served_names(bootfiles.ARCH_FILES)) == sorted(bootfiles.SERVED_NAMES)
    assert len(set(bootfiles.SERVED_NAMES)) == len(bootfiles.SERVED_NAMES)


def test_a_server_for_one_arch_builds_nothing_for_the_other(tmp_path: Path) -> None:
    root = _tftp_root(tmp_path, "x86_64")
    store = Blockstore(tmp_path / "store")  # empty: building a bootstrap would need its manifest
    args = argparse.Namespace(arch=["x86_64"], tftp_root=root, manifest=str(CID.parse("bafkqaaa")),
                              store=store.path, upstream=[])
    files = serve.boot_files(args, tmp_path / "cache", store)
    assert set(files) == set(bootfiles.ARCH_FILES["x86_64"])
    assert all(p.is_relative_to(root) for p in files.values())
    args.arch = None  # the default, every arch: the arm64 UKI is missing, so it would be built
    with pytest.raises(CidbootError, match="cannot build the bootstrap: manifest bafkqaaa"):
        serve.boot_files(args, tmp_path / "cache", store)


def test_serve_takes_arch_and_refuses_one_it_cannot_offer() -> None:
    p = argparse.ArgumentParser()
    serve.register(p.add_subparsers())
    base = ["serve", "--interface", "br0", "--store", "s", "--manifest", "m", "--dhcp-range", "10.0.0.2-10.0.0.9"]
    assert p.parse_args([*base, "--arch", "arm64", "--arch", "x86_64"]).arch == ["arm64", "x86_64"]
    assert p.parse_args(base).arch is None
    with pytest.raises(SystemExit):
        p.parse_args([*base, "--arch", "riscv64"])
