"""Locks against the real Debian mirror: the kernel metapackage resolves to the ABI package the
mirror serves (pinned with its hash, its vmlinuz and lib/modules/<abi>/ are the ones the build
takes), and the QEMU harness re-locks its copy of a flow whose pinned kernel is gone, says so,
builds, and leaves the committed lock alone."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cidboot.ipld.cid import CID
from imagebuilder import flowfile
from imagebuilder.debpkg import parse_stanza, read_deb
from imagebuilder.lock import Lock, cache_dir, lock_path, make_lock, sha256_file

pytestmark = pytest.mark.build  # downloads pinned packages / builds images

REPO = Path(__file__).resolve().parents[2]
META = "linux-image-cloud-amd64"


def _apt_show(spec: str) -> dict[str, str]:
    proc = subprocess.run(["apt-cache", "show", "--no-all-versions", spec], capture_output=True, text=True,
                          check=True)
    return parse_stanza(proc.stdout)


def test_metapackage_locks_to_the_abi_package_the_mirror_serves(tmp_path: Path) -> None:
    d = tmp_path / "hello"
    shutil.copytree(REPO / "examples/hello", d, ignore=shutil.ignore_patterns("keys", "flow.lock", "__pycache__"))
    ff = flowfile.load(d / "flow.yaml", require_keys=False)
    assert ff.data["image"]["kernel"]["package"] == META
    lock = make_lock(ff)
    lock_path(ff.path).write_text(lock.to_json())

    meta = _apt_show(META)  # what the mirror serves today, read independently of imagebuilder.lock
    abi, _, rel = meta["Depends"].partition(" ")
    assert abi.startswith("linux-image-") and rel.startswith("(=")
    concrete = _apt_show(f"{abi}={rel.strip('(=) ')}")
    m = Lock.load(lock_path(ff.path)).meta[META]
    assert (m.version, m.sha256, m.resolves_to) == (meta["Version"], meta["SHA256"], abi)
    pin = lock.pin(META)
    assert (pin.name, pin.version, pin.sha256) == (abi, concrete["Version"], concrete["SHA256"])
    deb = cache_dir() / "debs" / pin.filename
    assert sha256_file(deb) == pin.sha256

    # the kernel and the modules the build takes follow the resolved package's ABI
    release = abi.removeprefix("linux-image-")
    paths = [f.path for f in read_deb(deb) if f.kind == "file"]
    assert f"boot/vmlinuz-{release}" in paths
    assert any(p.startswith(f"lib/modules/{release}/") and p.endswith("/virtio_net.ko") for p in paths)


def test_demo_path_relocks_its_copy_when_the_pinned_kernel_is_gone(tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    from qemu.harness import deploy

    committed = (REPO / "examples/hello/flow.lock").read_text()
    flow = deploy._copy_flow(REPO / "examples/hello", tmp_path / "work" / "workload")  # as deploy.prepare does
    lock = Lock.load(lock_path(flow))
    abi = lock.meta[META].resolves_to
    text = lock_path(flow).read_text()
    gone = text.replace(f'"version": "{lock.debs[abi].version}"', '"version": "6.1.0-gone"', 1)
    gone = gone.replace(f'"filename": "{lock.debs[abi].filename}"', '"filename": "gone.deb"', 1)
    assert gone.count("6.1.0-gone") == 1 and "gone.deb" in gone
    lock_path(flow).write_text(gone)

    built = deploy.build(flow, tmp_path / "store")  # the default layer cache: warm when hello was built before

    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "re-locked this run's copy" in ln]
    assert len(lines) == 1, err
    assert f"{META} {lock.meta[META].version} ({abi} 6.1.0-gone) -> " in lines[0], lines[0]
    relocked = Lock.load(lock_path(flow))
    assert relocked.pin(META).version == _apt_show(relocked.pin(META).name)["Version"]
    assert relocked.pin(META).sha256 == _apt_show(f"{relocked.pin(META).name}={relocked.pin(META).version}")["SHA256"]
    assert isinstance(built.manifest, CID) and built.kernel.stat().st_size > 1_000_000
    assert (REPO / "examples/hello/flow.lock").read_text() == committed  # never the committed lock
