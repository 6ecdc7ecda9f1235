"""newc archives: GNU cpio extracts what we wrote, bytes depend only on the entries, bad paths fail."""

from __future__ import annotations

import gzip
import lzma
import os
import stat
import subprocess
from pathlib import Path

import pytest

from imagebuilder.cpio import (
    CpioError,
    Entry,
    ZstdFrameError,
    archive_bytes,
    compress,
    compression_id,
    decompress,
    zstd_frame_end,
)

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
    else:  # the host's zstd program reads what the pinned library wrote
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


# -- zstd frames: their end from the headers alone (cidboot.stage.cpio.zstd_frame_end) ------------


def _zstd(data: bytes, **kw: object) -> bytes:
    import zstandard

    return bytes(zstandard.ZstdCompressor(**kw).compress(data))  # type: ignore[arg-type]


ZSTD_SAMPLES = {
    "layer": lambda: compress(archive_bytes([Entry.file("x", os.urandom(300_000)), Entry.file("y", b"a" * 400_000)],
                                            0), "zstd"),  # raw, RLE and compressed blocks, several of each
    "empty": lambda: _zstd(b""),
    "small, single segment": lambda: _zstd(b"hello " * 10),
    "checksum": lambda: _zstd(os.urandom(200_000) + b"\0" * 300_000, write_checksum=True),
    "no content size": lambda: _zstd(b"xyz" * 100_000, write_content_size=False),
    # by hand (RFC 8878 3.1.1): a 1-byte dictionary ID and a window descriptor, one raw last block
    # of 3 bytes; a 4-byte dictionary ID, a 2-byte content size, an RLE last block and a checksum
    "dictionary id": lambda: b"\x28\xb5\x2f\xfd" + bytes([0b0000_0001, 0x00, 0x07])
    + (3 << 3 | 0 << 1 | 1).to_bytes(3, "little") + b"abc",
    "rle, checksum": lambda: b"\x28\xb5\x2f\xfd" + bytes([0b0100_0111, 0x00]) + b"\x01\x02\x03\x04" + b"\x01\x00"
    + (257 << 3 | 1 << 1 | 1).to_bytes(3, "little") + b"z" + b"\xaa\xbb\xcc\xdd",
}


@pytest.mark.parametrize("name", sorted(ZSTD_SAMPLES))
def test_a_zstd_frames_end_is_found_from_its_headers_as_the_decoder_finds_it(name: str) -> None:
    import zstandard

    frame = ZSTD_SAMPLES[name]()
    after = b"\x1f\x8b more archives after it"
    for lead in (b"", b"\0" * 12):
        data = lead + frame + after
        assert zstd_frame_end(data, len(lead)) == len(lead) + len(frame)
        if name in ("dictionary id", "rle, checksum"):
            continue  # made by hand: no dictionary to decode with, a made-up checksum
        d = zstandard.ZstdDecompressor().decompressobj()
        d.decompress(data[len(lead):])
        assert d.unused_data == after  # the library's own idea of where the frame ends


def test_a_zstd_frame_cut_anywhere_is_refused_as_truncated() -> None:
    frame = ZSTD_SAMPLES["checksum"]()
    for cut in (4, 5, 7, 9, 12, 100, len(frame) // 2, len(frame) - 5, len(frame) - 1):
        with pytest.raises(ZstdFrameError, match=r"zstd frame at offset 0 is truncated"):
            zstd_frame_end(frame[:cut])


def test_a_corrupt_zstd_frame_is_refused_with_what_and_where() -> None:
    frame = bytearray(_zstd(os.urandom(1000) + b"abc" * 50_000))
    assert frame[4] == 0b1010_0000  # single segment, 4-byte content size, no checksum: the first block is at 9
    first_block = 9
    bad = bytearray(frame)
    bad[4] |= 0x08
    with pytest.raises(ZstdFrameError, match="reserved bit is set"):
        zstd_frame_end(bytes(bad))
    bad = bytearray(frame)
    bad[first_block] |= 0b110  # block type 3
    with pytest.raises(ZstdFrameError, match=f"block at offset {first_block} has the reserved block type"):
        zstd_frame_end(bytes(bad))
    bad = bytearray(frame)
    bad[first_block + 2] = 0xFF  # a size field far past the 128 KiB a block may hold
    with pytest.raises(ZstdFrameError, match=f"block at offset {first_block} is \\d+ bytes, more than the 131072"):
        zstd_frame_end(bytes(bad))
    with pytest.raises(ZstdFrameError, match="no zstd frame at offset 0"):
        zstd_frame_end(b"\x1f\x8b" + bytes(frame[2:]))
    # decompress() takes the frame's end from the walk, then lets the library check the blocks
    bad = bytearray(frame)
    bad[first_block + 3: first_block + 40] = b"\xff" * 37
    with pytest.raises(ZstdFrameError, match="zstd frame at offset 0: "):
        decompress(bytes(bad))


def test_zstd_layers_are_the_same_bytes_whatever_the_number_of_threads() -> None:
    """compress() uses zstd's multi-threaded mode (threads=2), whose output does not depend on the
    number of workers: a 2-core CI and a many-core host build the same layer."""
    import zstandard

    from imagebuilder.cpio import ZSTD_LEVEL

    raw = archive_bytes([Entry.file(f"f{i}", os.urandom(64) * 4000) for i in range(8)], 0)
    ours = compress(raw, "zstd")
    for threads in (1, 4):
        p = zstandard.ZstdCompressionParameters.from_level(ZSTD_LEVEL, threads=threads, write_checksum=False,
                                                           write_content_size=True)
        assert zstandard.ZstdCompressor(compression_params=p).compress(raw) == ours
    assert compression_id("zstd") == (f"zstd-{ZSTD_LEVEL} zstandard-{zstandard.__version__} "
                                      f"libzstd-{'.'.join(map(str, zstandard.ZSTD_VERSION))}")
    assert compression_id("gzip") == "gzip"  # the gzip layers' cache keys are unchanged
