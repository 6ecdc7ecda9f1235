"""The shared-library closure of ELF programs inside a staged root, read with pyelftools.

An image must carry every library its interpreter and extension modules load, and nothing
else. Running `ldd` would execute the target's loader on the build host (wrong for another
architecture, and it trusts the binary), so the closure is computed statically: PT_INTERP,
DT_NEEDED, DT_RPATH / DT_RUNPATH (with $ORIGIN) and the loader's default directories, all
resolved inside the staged tree, never on the host. Every object's ELF machine and class are
checked against the target architecture, so a stray host library can never slip in.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from cidboot.errors import FormatError, NotFoundError, VerificationError

# target arch -> (e_machine, ELF class, multiarch triplet)
ARCHES: dict[str, tuple[str, int, str]] = {
    "amd64": ("EM_X86_64", 64, "x86_64-linux-gnu"),
    "arm64": ("EM_AARCH64", 64, "aarch64-linux-gnu"),
    "riscv64": ("EM_RISCV", 64, "riscv64-linux-gnu"),
}
ALIASES = {"x86_64": "amd64", "aarch64": "arm64"}


class ElfFormatError(FormatError):
    """A file that should be an ELF object is not one (or is corrupt)."""


class ElfMachineError(VerificationError):
    """An ELF object is built for another machine or class than the image's target."""


class MissingLibraryError(NotFoundError):
    """A DT_NEEDED library is not in the staged tree for the target architecture."""


class Tree(Protocol):
    """Read-only view of a staged root; paths are absolute within the tree ("/usr/lib/...")."""

    def read(self, path: str) -> bytes | None: ...
    def readlink(self, path: str) -> str | None: ...


class DirTree:
    """A staged root on disk."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _host(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def read(self, path: str) -> bytes | None:
        p = self._host(path)
        return p.read_bytes() if p.is_file() and not p.is_symlink() else None

    def readlink(self, path: str) -> str | None:
        p = self._host(path)
        return str(p.readlink()) if p.is_symlink() else None


@dataclass
class MemTree:
    """A staged root in memory: regular files and symlinks by absolute path."""

    files: dict[str, bytes] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)

    def read(self, path: str) -> bytes | None:
        return self.files.get(path)

    def readlink(self, path: str) -> str | None:
        return self.links.get(path)


@dataclass
class Closure:
    """What to copy: regular files (real paths) and the symlinks met on the way to them."""

    files: list[str] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)
    needed: dict[str, list[str]] = field(default_factory=dict)  # object -> its DT_NEEDED names


@dataclass(frozen=True)
class ElfInfo:
    machine: str
    elfclass: int
    interp: str | None
    needed: tuple[str, ...]
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]


def target(arch: str) -> tuple[str, int, str]:
    key = ALIASES.get(arch, arch)
    if key not in ARCHES:
        raise FormatError(f"unknown target architecture {arch!r} (one of {', '.join(sorted(ARCHES))})")
    return ARCHES[key]


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def parse(data: bytes, name: str) -> ElfInfo:
    """The fields of one ELF object that decide what it loads."""
    if not is_elf(data):
        raise ElfFormatError(f"{name}: not an ELF file")
    try:
        elf = ELFFile(io.BytesIO(data))
        interp = None
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_INTERP":
                interp = seg.get_interp_name()  # type: ignore[attr-defined]
        needed: list[str] = []
        rpath: list[str] = []
        runpath: list[str] = []
        for sec in elf.iter_sections():
            if not isinstance(sec, DynamicSection):
                continue
            for tag in sec.iter_tags():
                if tag.entry.d_tag == "DT_NEEDED":
                    needed.append(tag.needed)  # type: ignore[attr-defined]
                elif tag.entry.d_tag == "DT_RPATH":
                    rpath.extend(x for x in tag.rpath.split(":") if x)  # type: ignore[attr-defined]
                elif tag.entry.d_tag == "DT_RUNPATH":
                    runpath.extend(x for x in tag.runpath.split(":") if x)  # type: ignore[attr-defined]
        return ElfInfo(elf["e_machine"], elf.elfclass, interp, tuple(needed), tuple(rpath), tuple(runpath))
    except (ELFError, ValueError, KeyError, IndexError) as e:
        raise ElfFormatError(f"{name}: corrupt ELF: {e}") from None


def resolve(tree: Tree, path: str, links: dict[str, str] | None = None) -> str | None:
    """Follow symlinks inside the tree (absolute targets stay inside it); None if absent."""
    parts = [p for p in path.split("/") if p]
    cur = "/"
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            cur = posixpath.dirname(cur.rstrip("/")) or "/"
            continue
        nxt = posixpath.join(cur, part)
        target_ = tree.readlink(nxt)
        if target_ is not None:
            hops += 1
            if hops > 40:
                return None
            if links is not None:
                links[nxt] = target_
            base = "/" if target_.startswith("/") else cur
            parts = [p for p in target_.split("/") if p] + parts
            cur = base
            continue
        cur = nxt
    return cur if tree.read(cur) is not None else None


def _default_dirs(triplet: str) -> list[str]:
    return [f"/lib/{triplet}", f"/usr/lib/{triplet}", "/lib64", "/usr/lib64", "/lib", "/usr/lib"]


def closure(tree: Tree, roots: Iterable[str], arch: str = "amd64") -> Closure:
    """Every object the loader would map for `roots` (ELF paths in the tree), in a fixed order."""
    machine, elfclass, triplet = target(arch)
    out = Closure()
    seen: set[str] = set()
    queue = sorted(set(roots))
    while queue:
        req = queue.pop(0)
        links: dict[str, str] = {}
        real = resolve(tree, req, links)
        if real is None:
            raise MissingLibraryError(f"{req}: not in the staged tree")
        out.links.update(links)
        if real in seen:
            continue
        seen.add(real)
        data = tree.read(real)
        assert data is not None
        info = parse(data, real)
        if info.machine != machine or info.elfclass != elfclass:
            raise ElfMachineError(f"{real}: built for {info.machine} ELF{info.elfclass}, "
                                  f"target {arch} needs {machine} ELF{elfclass}")
        out.files.append(real)
        out.needed[real] = list(info.needed)
        if info.interp:
            queue.append(info.interp)
        origin = posixpath.dirname(real)
        search = [] if info.runpath else list(info.rpath)
        search += list(info.runpath) + _default_dirs(triplet)
        search = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for d in search]
        for lib in info.needed:
            queue.append(_find(tree, lib, search, real, machine, elfclass, arch))
    out.files.sort()
    out.links = dict(sorted(out.links.items()))
    return out


def _find(tree: Tree, lib: str, search: list[str], needed_by: str, machine: str, elfclass: int, arch: str) -> str:
    if "/" in lib:
        return lib if lib.startswith("/") else posixpath.join(posixpath.dirname(needed_by), lib)
    wrong = None
    for d in search:
        cand = posixpath.normpath(posixpath.join(d, lib))
        real = resolve(tree, cand)
        if real is None:
            continue
        data = tree.read(real)
        assert data is not None
        try:
            info = parse(data, real)
        except ElfFormatError:
            continue
        if info.machine == machine and info.elfclass == elfclass:
            return cand
        wrong = f"{real} ({info.machine})"  # the loader skips objects of another machine, so do we
    hint = f"; only {wrong} was found, for another machine" if wrong else ""
    raise MissingLibraryError(f"{lib}, needed by {needed_by}, not found for {arch} in "
                              f"{', '.join(dict.fromkeys(search))}{hint}")
