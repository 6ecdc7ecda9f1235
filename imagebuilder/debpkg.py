"""Read Debian .deb packages without dpkg: the `ar` container, then `data.tar.*` and `control`.

The image builder takes its kernel, interpreter and shared libraries from pinned .deb files and
must not run maintainer scripts or touch the host's package database, so it unpacks the archive
itself. Members are returned in memory with their modes, so the caller decides which files
reach an image (most of a package never does).
"""

from __future__ import annotations

import io
import posixpath
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from cidboot.errors import FormatError

AR_MAGIC = b"!<arch>\n"


class DebError(FormatError):
    """The file is not a well-formed .deb package."""


@dataclass(frozen=True)
class DebFile:
    """A regular file, symlink or directory from a package's data tarball."""

    path: str  # relative, normalised: "usr/bin/python3.11"
    mode: int  # permission bits only
    kind: str  # "file", "symlink" or "dir"
    data: bytes = b""
    target: str = ""  # symlink target as stored


def ar_members(blob: bytes, name: str = "package") -> dict[str, bytes]:
    """The members of a System V / GNU `ar` archive, by name."""
    if not blob.startswith(AR_MAGIC):
        raise DebError(f"{name}: not an ar archive (bad magic)")
    out: dict[str, bytes] = {}
    off = len(AR_MAGIC)
    while off < len(blob):
        hdr = blob[off:off + 60]
        if len(hdr) < 60 or hdr[58:60] != b"`\n":
            raise DebError(f"{name}: truncated or corrupt ar header at offset {off}")
        member = hdr[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(hdr[48:58].decode("ascii").strip())
        except ValueError:
            raise DebError(f"{name}: bad member size in ar header at offset {off}") from None
        start = off + 60
        if start + size > len(blob):
            raise DebError(f"{name}: member {member!r} runs past the end of the file")
        out[member] = blob[start:start + size]
        off = start + size + (size & 1)
    return out


def _decompress(member: str, data: bytes, name: str) -> bytes:
    if member.endswith(".zst"):
        proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=False)
        if proc.returncode != 0:
            raise DebError(f"{name}: {member}: zstd failed")
        return proc.stdout
    return data


def _tar(members: dict[str, bytes], prefix: str, name: str) -> tarfile.TarFile:
    for m, data in members.items():
        if m.startswith(prefix + ".tar"):
            try:
                return tarfile.open(fileobj=io.BytesIO(_decompress(m, data, name)), mode="r:*")
            except tarfile.TarError as e:
                raise DebError(f"{name}: {m}: {e}") from None
    raise DebError(f"{name}: no {prefix}.tar.* member")


def read_deb(path: str | Path) -> list[DebFile]:
    """Every file, symlink and directory of the package's data tarball (hard links copied)."""
    p = Path(path)
    members = ar_members(p.read_bytes(), p.name)
    if members.get("debian-binary", b"").strip() != b"2.0":
        raise DebError(f"{p.name}: not a Debian 2.0 binary package")
    tf = _tar(members, "data", p.name)
    out: dict[str, DebFile] = {}
    for info in tf.getmembers():
        rel = posixpath.normpath(info.name.lstrip("./").lstrip("/")) if info.name not in (".", "./") else "."
        if rel == "." or rel.startswith(".."):
            continue
        if info.isdir():
            out[rel] = DebFile(rel, info.mode & 0o7777, "dir")
        elif info.issym():
            out[rel] = DebFile(rel, 0o777, "symlink", target=info.linkname)
        elif info.islnk():
            src = out.get(posixpath.normpath(info.linkname.lstrip("./")))
            if src is None:
                raise DebError(f"{p.name}: hard link {rel} to missing {info.linkname}")
            out[rel] = DebFile(rel, src.mode, "file", src.data)
        elif info.isfile():
            f = tf.extractfile(info)
            assert f is not None
            out[rel] = DebFile(rel, info.mode & 0o7777, "file", f.read())
    return list(out.values())


def control_fields(path: str | Path) -> dict[str, str]:
    """The package's control stanza (Package, Version, Architecture, Depends...)."""
    p = Path(path)
    tf = _tar(ar_members(p.read_bytes(), p.name), "control", p.name)
    for info in tf.getmembers():
        if posixpath.basename(info.name) == "control":
            f = tf.extractfile(info)
            assert f is not None
            return parse_stanza(f.read().decode())
    raise DebError(f"{p.name}: no control file")


def parse_stanza(text: str) -> dict[str, str]:
    """RFC-822-style Debian control fields; continuation lines join the previous field."""
    fields: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
    return fields
