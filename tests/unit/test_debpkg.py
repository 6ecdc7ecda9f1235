""".deb reading without dpkg: a real pinned package, and malformed archives rejected precisely."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebuilder.debpkg import DebError, ar_members, read_deb


def test_not_ar(tmp_path: Path) -> None:
    with pytest.raises(DebError, match="x.deb: not an ar archive"):
        ar_members(b"PK\x03\x04", "x.deb")


def test_corrupt_header(tmp_path: Path) -> None:
    bad = b"!<arch>\n" + b"debian-binary   " + b"0" * 32 + b"notanumber" + b"`\n" + b"2.0\n"
    with pytest.raises(DebError, match="bad member size in ar header at offset 8"):
        ar_members(bad, "bad.deb")


def test_not_a_binary_package(tmp_path: Path) -> None:
    f = tmp_path / "empty.deb"
    f.write_bytes(b"!<arch>\n")
    with pytest.raises(DebError, match="empty.deb: not a Debian 2.0 binary package"):
        read_deb(f)
