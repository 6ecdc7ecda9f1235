"""Compression of the reproducible newc archives, plus the archive format re-exported.

The newc writer and reader live in cidboot.stage.cpio (the boot stages use them for the hand-off
archive); this module adds what only the builder needs: compressors run with fixed settings so
equal input gives equal output (gzip without a name or timestamp; xz with the CRC32 check the
kernel's decompressor requires; zstd through the `zstd` program).
"""

from __future__ import annotations

import gzip
import io
import lzma
import subprocess

from cidboot.stage.cpio import (
    MAGIC,
    TRAILER,
    CpioError,
    Entry,
    Member,
    archive_bytes,
    iter_newc,
    normalize_path,
    read_newc,
    source_date_epoch,
    write_newc,
)

COMPRESSIONS = ("none", "gzip", "xz", "zstd")

__all__ = ["COMPRESSIONS", "MAGIC", "TRAILER", "CpioError", "Entry", "Member", "archive_bytes", "compress",
           "decompress", "flash_initrd", "iter_newc", "normalize_path", "read_newc", "source_date_epoch", "write_newc"]


def compress(data: bytes, method: str) -> bytes:
    """Compress with fixed settings so equal input gives equal output on any machine."""
    if method == "none":
        return data
    if method == "gzip":
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
            gz.write(data)
        return buf.getvalue()
    if method == "xz":
        # the kernel's XZ decoder supports CRC32 (not the default CRC64) and no BCJ it was not built with
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                             filters=[{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": 1 << 20}])
    if method == "zstd":
        proc = subprocess.run(["zstd", "-q", "-19", "--no-check", "-c", "-"], input=data,
                              capture_output=True, check=False)
        if proc.returncode != 0:
            raise CpioError(f"zstd failed: {proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout
    raise CpioError(f"unknown compression {method!r} (one of {', '.join(COMPRESSIONS)})")


def decompress(data: bytes) -> bytes:
    """Undo `compress`, recognising the method by its magic bytes."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=False)
        if proc.returncode != 0:
            raise CpioError("zstd: cannot decompress")
        return proc.stdout
    return data


def flash_initrd(layers: list[bytes]) -> bytes:
    """The firmware's initrd as the flash holds it and the DICE engine measures it: its layers
    uncompressed, one newc archive after the other (the kernel unpacks concatenated archives).

    Why not the layers' gzip bytes, as a served stage's initrd: at power-on the kernel inflated
    the 16 MB of gzip into 45 MB under TCG in ~0.7 G instructions, most of the firmware's kernel
    time; an uncompressed archive is copied (docs/images.md, "The firmware's flash"). The layers
    (their CIDs, runtime.json, kernel.sha512) stay what the build made: only the flash bytes, and
    with them the L0 reference value, follow from this."""
    out = bytearray()
    for data in layers:
        raw = decompress(data)
        if raw[:6] != MAGIC or len(raw) % 4:
            raise CpioError(f"a flash layer is not a 4-byte aligned newc archive ({len(raw)} bytes)")
        out += raw
    return bytes(out)
