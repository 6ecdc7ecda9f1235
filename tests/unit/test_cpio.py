"""newc archives: GNU cpio extracts what we wrote, bytes depend only on the entries, bad paths fail."""

from __future__ import annotations

import gzip
import lzma
import os
import stat
import subprocess
from pathlib import Path

import pytest

from imagebuilder.cpio import CpioError, Entry, archive_bytes, compress, decompress, zstd_frame_end

ENTRIES = [
    Entry.file("usr/bin/hello", b"#!/bin/true\n", 0o755),
    Entry.file("etc/motd", b"hi\n" * 3),
    Entry.symlink("init", "usr/bin/hello"),
    Entry.directory("proc"),
    Entry.file("odd", b"x"),  # 1-byte data: exercises padding
]


def _extract(archive: bytes, dest: Path) -> list[str]:
    dest.mkdir()
    proc = subprocess.run(["cpio", "-idm", "--no-absolute-filenames", "--quiet", "-v"], input=archive,
                          cwd=dest, capture_output=True, check=True)
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True)
    assert proc.returncode == 0
    return listing.stdout.decode().split()


def test_gnu_cpio_extracts_what_we_wrote(tmp_path: Path) -> None:
    names = _extract(archive_bytes(ENTRIES, mtime=1234567), tmp_path / "x")
    # parents were added, directories come before their contents, sorted
    assert names == ["etc", "etc/motd", "init", "odd", "proc", "usr", "usr/bin", "usr/bin/hello"]
    root = tmp_path / "x"
    assert (root / "usr/bin/hello").read_bytes() == b"#!/bin/true\n"
    assert stat.S_IMODE((root / "usr/bin/hello").stat().st_mode) == 0o755
    assert (root / "etc/motd").read_bytes() == b"hi\nhi\nhi\n"
    assert os.readlink(root / "init") == "usr/bin/hello"
    assert (root / "odd").read_bytes() == b"x"
    assert (root / "proc").is_dir()
    assert int((root / "etc/motd").stat().st_mtime) == 1234567


def test_listing_shows_fixed_owner_and_mtime() -> None:
    out = subprocess.run(["cpio", "-tv", "--quiet"], input=archive_bytes(ENTRIES, mtime=0),
                         capture_output=True, check=True, env={**os.environ, "TZ": "UTC", "LC_ALL": "C"}).stdout.decode()
    for line in out.splitlines():
        fields = line.split()
        assert fields[2:4] == ["root", "root"] or fields[2:4] == ["0", "0"], line
        assert "1970" in line, line


def test_order_of_input_does_not_matter() -> None:
    assert archive_bytes(ENTRIES, 0) == archive_bytes(list(reversed(ENTRIES)), 0)
    assert archive_bytes(ENTRIES, 0) != archive_bytes(ENTRIES, 1)


def test_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert archive_bytes(ENTRIES) == archive_bytes(ENTRIES, 1700000000)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(CpioError, match="SOURCE_DATE_EPOCH must be an integer"):
        archive_bytes(ENTRIES)


def test_char_device_node() -> None:
    out = subprocess.run(["cpio", "-tv", "--quiet"], input=archive_bytes([Entry.chardev("dev/console", 5, 1)], 0),
                         capture_output=True, check=True).stdout.decode()
    line = [x for x in out.splitlines() if x.endswith("dev/console")][0]
    assert line.startswith("crw-------") and "5," in line and " 1 " in line


@pytest.mark.parametrize("method", ["gzip", "xz", "zstd"])
def test_compression_is_reproducible_and_decodes(method: str) -> None:
    raw = archive_bytes(ENTRIES, 0)
    a, b = compress(raw, method), compress(raw, method)
    assert a == b and a != raw
    if method == "gzip":
        assert gzip.decompress(a) == raw
        assert a[4:8] == b"\0\0\0\0"  # no mtime in the gzip header
    elif method == "xz":
        assert lzma.decompress(a) == raw
    else:
        assert subprocess.run(["zstd", "-dc"], input=a, capture_output=True, check=True).stdout == raw


@pytest.mark.parametrize(("entries", "message"), [
    ([Entry.file("../etc/passwd", b"")], "escapes the archive root"),
    ([Entry.file("a", b""), Entry.file("./a", b"")], "duplicate archive path 'a'"),
    ([Entry.file("a", b""), Entry.file("a/b", b"")], "parent 'a' is not a directory"),
    ([Entry("fifo", stat.S_IFIFO | 0o644)], "unsupported file type"),
    ([Entry.file("", b"")], "invalid archive path"),
])
def test_bad_entries(entries: list[Entry], message: str) -> None:
    with pytest.raises(CpioError, match=message):
        archive_bytes(entries, 0)


def test_unknown_compression() -> None:
    with pytest.raises(CpioError, match="unknown compression 'lz4'"):
        compress(b"", "lz4")


@pytest.mark.parametrize("first", ["gzip", "xz", "zstd", "none"])
@pytest.mark.parametrize("second", ["gzip", "xz", "zstd", "none"])
def test_decompress_reads_archives_compressed_each_its_own_way_one_after_the_other(first: str, second: str) -> None:
    """An initrd is the runtime layer (zstd) followed by the other layers (gzip), maybe with zero
    padding between them (iPXE aligns each initrd): undone segment by segment, as the kernel reads it."""
    a = archive_bytes([Entry.file("usr/bin/python3.11", b"elf" * 5000)], 0)
    b = archive_bytes([Entry.file("etc/cidboot/flow.json", b"{}" * 300)], 0)
    joined = compress(a, first) + b"\0" * 4 + compress(b, second)
    assert decompress(joined) == a + b
    assert decompress(compress(a, first)) == a


def test_a_truncated_zstd_frame_is_refused_not_half_read() -> None:
    a = compress(archive_bytes([Entry.file("x", os.urandom(300_000))], 0), "zstd")
    assert zstd_frame_end(a, 0) == len(a)
    with pytest.raises(CpioError, match="zstd frame at offset 0 is truncated"):
        decompress(a[:-10])
