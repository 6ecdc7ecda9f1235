"""Build cache keyed by input hashes: a layer whose inputs did not change is not rebuilt.

Each layer's key is the SHA-256 of everything that can change its bytes (pins, source
files, settings, the builder's format version), so a cache hit is as good as a rebuild,
and an unchanged rebuild only re-hashes inputs and re-reads finished layers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "cidboot-image-1"  # bump when the layer layout changes


@functools.cache
def builder_digest() -> str:
    """The image builder's own code is an input too: a changed builder must not reuse old layers."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for p in sorted(here.rglob("*")):
        if p.is_file() and p.suffix in (".py", ".json") and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(here)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def key(role: str, inputs: Any) -> str:
    """Stable hash of a layer's role and JSON-able inputs."""
    blob = json.dumps({"format": FORMAT, "builder": builder_digest(), "role": role, "inputs": inputs},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class BuildCache:
    """Finished layer bytes by key, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, k: str) -> bytes | None:
        """The layer, or None. A hit refreshes the entry's mtime, so `prune --older-than`
        removes what no build used lately, not what was built long ago and used daily; an
        entry pruned while we look is a miss, not an error."""
        p = self.root / k
        try:
            data = p.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None
        try:
            os.utime(p)
        except OSError:
            pass
        return data

    def put(self, k: str, data: bytes) -> None:
        tmp = self.root / f".{k}.{os.getpid()}"
        tmp.write_bytes(data)
        tmp.replace(self.root / k)


KINDS = ("layers", "sysroots", "debs", "wheels", "wheels-unpacked")  # under cache_dir(): all rebuildable


@dataclass
class Pruned:
    entries: int = 0
    bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    removed: list[str] = field(default_factory=list)


def entry_size(p: Path) -> int:
    """Bytes of a cache entry: a file, or a directory tree (sysroots, unpacked wheels)."""
    try:
        if p.is_symlink() or not p.is_dir():
            return p.lstat().st_size
        return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() or f.is_symlink())
    except FileNotFoundError:
        return 0


def prune(dirs: Iterable[Path], older_than: float | None = None, *, now: float | None = None,
          dry_run: bool = False, max_bytes: int | None = None, keep_since: float | None = None) -> Pruned:
    """Remove top-level entries of `dirs`: all of them, those whose mtime is more than
    `older_than` seconds ago, and/or the least recently used beyond `max_bytes` in total (the
    newest are kept while they fit). Entries used at or after `keep_since` (the build that is
    pruning) are always kept, so a cap smaller than one build does not undo that build.
    Everything in the cache is rebuilt or re-downloaded (and re-verified against flow.lock) on
    the next build, so pruning costs time, never correctness."""
    now = time.time() if now is None else now
    out = Pruned()
    entries: list[tuple[float, Path]] = []
    for d in dirs:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            try:
                entries.append((p.lstat().st_mtime, p))
            except FileNotFoundError:
                continue
    selective = older_than is not None or max_bytes is not None
    kept_total = 0
    for mtime, p in sorted(entries, key=lambda e: (-e[0], str(e[1]))):  # newest first: LRU order for the cap
        size = entry_size(p)
        protected = keep_since is not None and mtime >= keep_since
        young = older_than is None or now - mtime <= older_than
        fits = max_bytes is None or kept_total + size <= max_bytes
        if selective and (protected or (young and fits)):
            out.kept += 1
            out.kept_bytes += size
            kept_total += size
            continue
        if not dry_run:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        out.entries += 1
        out.bytes += size
        out.removed.append(str(p))
    out.removed.sort()
    return out
