""".deb reading without dpkg: a real pinned package, and malformed archives rejected precisely."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebuilder.debpkg import DebError, control_fields, read_deb
from imagebuilder.lock import fetch_deb, resolve_deb

pytestmark = pytest.mark.build  # downloads pinned packages / builds images


@pytest.fixture(scope="module")
def zlib_deb() -> Path:
    return fetch_deb(resolve_deb("zlib1g"), "apt-get update")


def test_real_package(zlib_deb: Path) -> None:
    fields = control_fields(zlib_deb)
    assert fields["Package"] == "zlib1g" and fields["Architecture"] == "amd64"
    files = {f.path: f for f in read_deb(zlib_deb)}
    lib = [p for p, f in files.items() if f.kind == "file" and "/libz.so.1." in p]
    assert len(lib) == 1 and files[lib[0]].data[:4] == b"\x7fELF"
    link = files["usr/lib/x86_64-linux-gnu/libz.so.1"] if "usr/lib/x86_64-linux-gnu/libz.so.1" in files \
        else files["lib/x86_64-linux-gnu/libz.so.1"]
    assert link.kind == "symlink" and link.target.startswith("libz.so.1.")


def test_truncated_member(zlib_deb: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.deb"
    cut.write_bytes(zlib_deb.read_bytes()[:2000])
    with pytest.raises(DebError, match="cut.deb: member 'data.tar.xz' runs past the end of the file"):
        read_deb(cut)


