"""Compression of the reproducible newc archives, plus the archive format re-exported.

The newc writer and reader live in cidboot.stage.cpio (the boot stages use them for the hand-off
archive); this module adds what only the builder needs: compressors run with fixed settings so
equal input gives equal output (gzip without a name or timestamp; xz with the CRC32 check the
kernel's decompressor requires; zstd through the pinned `zstandard` wheel, not the host's `zstd`).
"""

from __future__ import annotations

import gzip
import io
import lzma
import zlib
from typing import Any

from cidboot.stage.cpio import (
    MAGIC,
    TRAILER,
    ZSTD_MAGIC,
    CpioError,
    Entry,
    Member,
    ZstdFrameError,
    archive_bytes,
    iter_newc,
    normalize_path,
    read_header,
    read_newc,
    source_date_epoch,
    write_newc,
    zstd_frame_end,
)

COMPRESSIONS = ("none", "gzip", "xz", "zstd")

__all__ = ["COMPRESSIONS", "MAGIC", "TRAILER", "ZSTD_LEVEL", "ZSTD_MAGIC", "CpioError", "Entry", "Member", "ZstdFrameError",
           "archive_bytes", "compress", "compression_id", "decompress", "flash_initrd", "iter_newc", "normalize_path",
           "read_newc", "source_date_epoch", "write_newc", "zstd_frame_end"]

#: zstd's level (docs/images.md, "Compression": size against build time, measured)
ZSTD_LEVEL = 18


def _zstandard() -> Any:
    """The pinned `zstandard` wheel (pyproject.toml), imported when a zstd layer is made or read:
    it carries its own libzstd, so the bytes follow the pin, not the build host's `zstd`."""
    import zstandard

    return zstandard


def compression_id(method: str) -> str:
    """`method` with what decides its bytes beyond the input, for the layer cache's key: a layer
    cached by another zstd library or level is not taken for this one's. gzip, xz and none are
    their names alone (their settings are fixed here, zlib and liblzma are stable in output)."""
    if method != "zstd":
        return method
    z = _zstandard()
    return f"zstd-{ZSTD_LEVEL} zstandard-{z.__version__} libzstd-{'.'.join(map(str, z.ZSTD_VERSION))}"


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
        # one frame, content size in the header, no checksum (the layer is hashed whole: its CID);
        # threads=2 is zstd's multi-threaded mode, whose output is the same for any number of
        # workers >= 1 (not the same as threads=0's): same bytes on a 2-core CI and a 64-core host
        z = _zstandard()
        params = z.ZstdCompressionParameters.from_level(ZSTD_LEVEL, threads=2, write_checksum=False,
                                                        write_content_size=True)
        return bytes(z.ZstdCompressor(compression_params=params).compress(data))
    raise CpioError(f"unknown compression {method!r} (one of {', '.join(COMPRESSIONS)})")


def decompress(data: bytes) -> bytes:
    """Undo `compress`, recognising the method by its magic bytes. `data` may be several
    archives one after the other, each compressed its own way (an initrd: the runtime layer in
    zstd, the others in gzip), with zero padding between them: each is undone in turn and the
    results concatenated, as the kernel's unpacker reads them."""
    out = bytearray()
    off = 0
    while off < len(data):
        if data[off] == 0:  # padding between archives (iPXE aligns each initrd)
            off += 1
            continue
        end, raw = _segment(data, off)
        out += raw
        off = end
    return bytes(out)


def _segment(data: bytes, off: int) -> tuple[int, bytes]:
    """(end offset, uncompressed bytes) of the archive that starts at `off`."""
    head = data[off:off + 6]
    if head[:2] == b"\x1f\x8b":
        gz = zlib.decompressobj(wbits=31)
        raw = gz.decompress(data[off:])
        if not gz.eof:
            raise CpioError(f"gzip stream at offset {off} is truncated")
        return len(data) - len(gz.unused_data), raw
    if head == b"\xfd7zXZ\x00":
        xz = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        raw = xz.decompress(data[off:])
        if not xz.eof:
            raise CpioError(f"xz stream at offset {off} is truncated")
        return len(data) - len(xz.unused_data), raw
    if head[:4] == ZSTD_MAGIC:
        end = zstd_frame_end(data, off)
        z = _zstandard()
        d = z.ZstdDecompressor().decompressobj()
        try:
            raw = d.decompress(data[off:end])
        except z.ZstdError as e:
            raise ZstdFrameError(f"zstd frame at offset {off}: {e}") from None
        if not d.eof:
            raise ZstdFrameError(f"zstd frame at offset {off} is truncated")
        return end, raw
    if head == MAGIC:
        end = _newc_end(data, off)
        return end, data[off:end]
    return len(data), data[off:]  # not an archive this module wrote: handed back as it is


def _newc_end(data: bytes, off: int) -> int:
    """The end of the uncompressed newc archive at `off`: after its trailer member."""
    start = off
    while True:
        h = read_header(data, off, start)
        if h.is_trailer:
            return h.end
        off = h.end


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
