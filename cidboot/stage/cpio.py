"""Reproducible newc cpio archives (the Linux initramfs format): writer and reader.

Shared by the image builder (layers) and the boot stages (the hand-off archive a stage appends
to the next stage's initrd, see cidboot.stage.handoff). An initramfs's bytes are hashed into a layer
CID and into the device's measurements, so the archive must depend only on the files given:
paths are sorted, every entry gets the same mtime (SOURCE_DATE_EPOCH, default 0), uid/gid 0 and
inode numbers assigned in path order. Compression lives in imagebuilder.cpio (the stages never
compress, and must not import subprocess-driven compressors).
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from cidboot.errors import FormatError

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
TRAILER_NAME = TRAILER.encode()


class CpioError(FormatError):
    """An entry cannot go into an archive (bad path, duplicate, wrong kind)."""


class Entry:
    """One archive member. `path` is relative ("usr/bin/python3"); kind comes from `mode`. A value
    (field equality and hash, never changed), written out rather than a frozen dataclass, whose
    generated methods cost every stage that imports this module ~3 M guest instructions."""

    __slots__ = ("path", "mode", "data")

    def __init__(self, path: str, mode: int, data: bytes = b"") -> None:
        self.path = path
        self.mode = mode
        self.data = data

    def __eq__(self, other: object) -> bool:
        return type(other) is Entry and (self.path, self.mode, self.data) == (other.path, other.mode, other.data)

    def __hash__(self) -> int:
        return hash((self.path, self.mode, self.data))

    def __repr__(self) -> str:
        return f"Entry(path={self.path!r}, mode={self.mode:#o}, data=<{len(self.data)} bytes>)"

    @classmethod
    def file(cls, path: str, data: bytes, perm: int = 0o644) -> Entry:
        return cls(path, stat.S_IFREG | perm, data)

    @classmethod
    def directory(cls, path: str, perm: int = 0o755) -> Entry:
        return cls(path, stat.S_IFDIR | perm)

    @classmethod
    def symlink(cls, path: str, target: str) -> Entry:
        return cls(path, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def chardev(cls, path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        # data carries "major:minor" so an Entry stays a plain value
        return cls(path, stat.S_IFCHR | perm, f"{major}:{minor}".encode())


def normalize_path(path: str) -> str:
    """The canonical relative form of an archive path; rejects anything that could escape."""
    if not path or "\0" in path:
        raise CpioError(f"invalid archive path {path!r}")
    if not (path[0] == "/" or path[-1] == "/" or "//" in path or path == "." or path == ".." or path.startswith(("./", "../"))
            or "/./" in path or "/../" in path or path.endswith(("/.", "/.."))):
        return path  # already canonical (normpath would return it unchanged): the hand-over checks hundreds
    p = posixpath.normpath(path.lstrip("/"))
    if p in (".", "") or p.startswith("../") or p == "..":
        raise CpioError(f"archive path {path!r} escapes the archive root")
    return p


def _complete(entries: Iterable[Entry]) -> list[Entry]:
    """Sorted entries with every missing parent directory added (0755)."""
    by_path: dict[str, Entry] = {}
    for e in entries:
        p = normalize_path(e.path)
        if p in by_path:
            raise CpioError(f"duplicate archive path {p!r}")
        if not (stat.S_ISREG(e.mode) or stat.S_ISDIR(e.mode) or stat.S_ISLNK(e.mode) or stat.S_ISCHR(e.mode)):
            raise CpioError(f"{p}: unsupported file type {oct(e.mode)}")
        by_path[p] = Entry(p, e.mode, e.data)
    for p in list(by_path):
        parent = posixpath.dirname(p)
        while parent:
            existing = by_path.get(parent)
            if existing is None:
                by_path[parent] = Entry.directory(parent)
            elif not stat.S_ISDIR(existing.mode):
                raise CpioError(f"{p}: parent {parent!r} is not a directory")
            parent = posixpath.dirname(parent)
    # sorting by path components keeps every directory before its contents
    return [by_path[k] for k in sorted(by_path, key=lambda s: s.split("/"))]


def _header(ino: int, mode: int, nlink: int, mtime: int, size: int, rdev: tuple[int, int], name: bytes) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_newc(entries: Iterable[Entry], out: BinaryIO, mtime: int | None = None) -> int:
    """Write a newc archive of `entries` (order does not matter) to `out`; returns bytes written."""
    if mtime is None:
        mtime = source_date_epoch()
    total = 0

    def emit(b: bytes) -> None:
        nonlocal total
        out.write(b)
        total += len(b)

    for ino, e in enumerate(_complete(entries), start=1):
        name = e.path.encode()
        rdev = (0, 0)
        data = e.data
        if stat.S_ISCHR(e.mode):
            major, minor = (int(x) for x in e.data.decode().split(":"))
            rdev, data = (major, minor), b""
        elif stat.S_ISDIR(e.mode):
            data = b""
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        hdr = _header(ino, e.mode, nlink, mtime, len(data), rdev, name) + name + b"\0"
        emit(hdr + _pad(len(hdr)))
        emit(data + _pad(len(data)))
    hdr = _header(0, 0, 1, 0, 0, (0, 0), TRAILER.encode()) + TRAILER.encode() + b"\0"
    emit(hdr + _pad(len(hdr)))
    return total


def archive_bytes(entries: Iterable[Entry], mtime: int | None = None) -> bytes:
    buf = io.BytesIO()
    write_newc(entries, buf, mtime)
    return buf.getvalue()


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH from the environment (reproducible-builds.org), default 0."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "0")
    try:
        value = int(raw)
    except ValueError:
        raise CpioError(f"SOURCE_DATE_EPOCH must be an integer, got {raw!r}") from None
    if not 0 <= value < 2**32:
        raise CpioError(f"SOURCE_DATE_EPOCH out of range: {value}")
    return value


class Member:
    """One member read back from an archive (for `inspect`: the image's attack surface; for the
    hand-over: what to write). A value: compared and hashed by its fields, never changed. Written
    out rather than a frozen dataclass, whose generated methods cost every stage importing this
    module ~3 M instructions, and whose __init__ (object.__setattr__ per field) runs for each of
    the hundreds of members a hand-over parses."""

    __slots__ = ("path", "mode", "size", "target", "rdev")

    def __init__(self, path: str, mode: int, size: int, target: str = "", rdev: tuple[int, int] = (0, 0)) -> None:
        self.path = path
        self.mode = mode
        self.size = size
        self.target = target  # a symlink's target
        self.rdev = rdev  # (major, minor) of a device node

    def _key(self) -> tuple[str, int, int, str, tuple[int, int]]:
        return self.path, self.mode, self.size, self.target, self.rdev

    def __eq__(self, other: object) -> bool:
        return type(other) is Member and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Member(path={self.path!r}, mode={self.mode:#o}, size={self.size}, target={self.target!r}, "
                f"rdev={self.rdev!r})")


class Header:
    """One newc header as read, with where its data lies: the one header parser, for the image
    builder's `inspect` and for reading archives appended to other archives (so padding counts
    from the archive's own first byte, `start`). A plain class, not a dataclass: it is only ever
    read, and generating a frozen dataclass's methods at import cost every stage that imports
    this module ~3 M instructions (a third of its import)."""

    __slots__ = ("mode", "size", "rdev", "name", "body", "end")

    def __init__(self, mode: int, size: int, rdev: tuple[int, int], name: bytes, body: int, end: int) -> None:
        self.mode = mode
        self.size = size
        self.rdev = rdev
        self.name = name
        self.body = body  # offset of the member's data in the buffer
        self.end = end  # offset of the next header (data padded to 4 bytes from `start`)

    @property
    def is_trailer(self) -> bool:
        return self.name == TRAILER_NAME


_HEX = b"0123456789abcdefABCDEF"


def header_fields(hdr: bytes, off: int) -> tuple[int, int, int, int, int]:
    """(mode, filesize, rdevmajor, rdevminor, namesize) of the 110-byte newc header `hdr` found at
    `off`: the magic, then thirteen fields of exactly eight hex digits each (no sign, space or
    underscore, which int() alone would let through), parsed as one number."""
    if len(hdr) < 110 or hdr[:6] != MAGIC:
        raise CpioError(f"not a newc header at offset {off}")
    fields = hdr[6:110]
    if fields.translate(None, _HEX):
        raise CpioError(f"bad hex field in the header at offset {off}")
    v = int(fields, 16)  # field i (0-based) is bits 32 * (12 - i) .. +32
    return (v >> 352) & 0xFFFFFFFF, (v >> 192) & 0xFFFFFFFF, (v >> 96) & 0xFFFFFFFF, (v >> 64) & 0xFFFFFFFF, \
        (v >> 32) & 0xFFFFFFFF


def read_header(buf: bytes | memoryview, off: int, start: int = 0) -> Header:
    """The newc header at `off` of an archive beginning at `start`; anything malformed or running
    past the buffer raises CpioError naming the offset."""
    mode, size, major, minor, namesize = header_fields(bytes(buf[off:off + 110]), off)
    name_end = off + 110 + namesize
    if namesize < 1 or name_end > len(buf):
        raise CpioError(f"name runs past the end at offset {off}")
    body = name_end + (-(name_end - start) % 4)
    if body + size > len(buf):
        raise CpioError(f"member at offset {off} runs past the end")
    end = body + size + (-(body + size - start) % 4)
    return Header(mode, size, (major, minor), bytes(buf[off + 110:name_end - 1]), body, end)


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_BLOCK_MAX = 128 << 10  # RFC 8878 3.1.1.2.3: no block regenerates more than min(window, 128 KiB)


class ZstdFrameError(CpioError):
    """A zstd frame whose end cannot be found from its headers: truncated, or not a frame
    (the message names the frame's offset and what is wrong at which offset)."""


def zstd_frame_end(data: bytes | memoryview, off: int = 0) -> int:
    """The end offset of the zstd frame at `off`, read from its frame and block headers alone
    (RFC 8878 3.1.1: magic, frame header, blocks up to the one marked last, optional 4-byte
    checksum): no decompression, so no zstd library, which Python 3.11 lacks. How a boot server
    finds where a zstd runtime layer ends in a bootstrap initrd (switch_root.runtime_prefix) and
    how the image builder cuts an initrd into its segments.

    A frame that runs past the end of `data`, sets the header's reserved bit, uses the reserved
    block type, or has a block larger than its window allows raises ZstdFrameError naming the
    offset (a corrupt size field would otherwise send the walk anywhere). The blocks' contents are
    not checked: the kernel's decompressor does that when it unpacks them."""
    where = f"zstd frame at offset {off}"
    n = len(data)
    if bytes(data[off:off + 4]) != ZSTD_MAGIC:
        raise ZstdFrameError(f"no zstd frame at offset {off} (magic {bytes(data[off:off + 4]).hex() or 'missing'})")
    if off + 5 > n:
        raise ZstdFrameError(f"{where} is truncated in its frame header")
    fhd = data[off + 4]
    if fhd & 0x08:
        raise ZstdFrameError(f"{where}: the frame header's reserved bit is set (not a zstd frame)")
    single = fhd >> 5 & 1
    fcs_size = (single, 2, 4, 8)[fhd >> 6]
    pos = off + 5
    if single:
        window = None  # the window is the content size, read below
    else:
        if pos + 1 > n:
            raise ZstdFrameError(f"{where} is truncated in its frame header")
        wd = data[pos]
        base = 1 << (10 + (wd >> 3))
        window = base + (base >> 3) * (wd & 7)
        pos += 1
    pos += (0, 1, 2, 4)[fhd & 3]  # dictionary ID
    if pos + fcs_size > n:
        raise ZstdFrameError(f"{where} is truncated in its frame header")
    if window is None:
        window = int.from_bytes(bytes(data[pos:pos + fcs_size]), "little") + (256 if fcs_size == 2 else 0)
    pos += fcs_size
    block_max = min(window, _ZSTD_BLOCK_MAX)
    while True:
        if pos + 3 > n:
            raise ZstdFrameError(f"{where} is truncated: a block header at offset {pos} needs 3 bytes, "
                                 f"{max(n - pos, 0)} left")
        bh = int.from_bytes(bytes(data[pos:pos + 3]), "little")
        kind, size = bh >> 1 & 3, bh >> 3
        if kind == 3:
            raise ZstdFrameError(f"{where}: the block at offset {pos} has the reserved block type")
        if size > block_max:
            raise ZstdFrameError(f"{where}: the block at offset {pos} is {size} bytes, more than the "
                                 f"{block_max} its window allows")
        pos += 3 + (1 if kind == 1 else size)  # an RLE block holds one byte, repeated `size` times
        if pos > n:
            raise ZstdFrameError(f"{where} is truncated: its block ends at offset {pos}, the data at {n}")
        if bh & 1:
            break
    if fhd & 0x04:
        pos += 4  # content checksum
        if pos > n:
            raise ZstdFrameError(f"{where} is truncated in its checksum")
    return pos


def iter_newc(data: bytes) -> Iterator[tuple[Member, bytes]]:
    """Each member of one newc archive with its data (file content or link target), in archive
    order, up to the trailer; anything malformed raises CpioError with the offset."""
    off = 0
    while True:
        h = read_header(data, off)
        if h.is_trailer:
            return
        content = data[h.body:h.body + h.size]
        yield Member(h.name.decode(errors="replace"), h.mode, h.size,
                     content.decode(errors="replace") if stat.S_ISLNK(h.mode) else "", h.rdev), content
        off = h.end


def read_newc(data: bytes) -> list[Member]:
    """Members of a newc archive; rejects anything malformed with the offset."""
    return [m for m, _ in iter_newc(data)]
