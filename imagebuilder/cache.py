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
        p = self.root / k
        return p.read_bytes() if p.is_file() else None

    def put(self, k: str, data: bytes) -> None:
        tmp = self.root / f".{k}.{os.getpid()}"
        tmp.write_bytes(data)
        tmp.replace(self.root / k)
