"""UnixFS import identical to Kubo's `ipfs add`.

Kubo's defaults: fixed-size 256 KiB chunks, the balanced layout with at most 174 links per
node, CIDv0 with dag-pb leaves (UnixFS File nodes); `--cid-version 1` switches raw leaves on
and prints base32 CIDv1. A single-chunk file is its own root (for raw leaves: a raw block).
The balanced builder is the same shape as go-unixfs's: the tree deepens only when a level is
full, all leaves sit at the same depth, and each internal node records its children's file
sizes in `blocksizes`. Memory stays bounded: one chunk plus at most 174 links per level.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from cidboot.ipld import dagpb
from cidboot.ipld.cid import CID, DAG_PB, RAW
from cidboot.ipld.unixfs.data import DIRECTORY, FILE, SYMLINK, UnixFSData, UnixFSError

DEFAULT_CHUNK = 256 * 1024
MAX_LINKS = 174
MAX_CHUNK = 1024 * 1024  # Kubo refuses larger chunks (blocks above 1 MiB are not exchanged)


class BlockSink(Protocol):
    def put(self, cid: CID, data: bytes) -> None: ...


@dataclass(frozen=True)
class ImportOptions:
    cid_version: int = 0
    chunk_size: int = DEFAULT_CHUNK
    raw_leaves: bool | None = None  # None: Kubo's default (on for CIDv1, off for CIDv0); with
    # CIDv0 and raw leaves, the leaves are CIDv1 raw blocks under CIDv0 dag-pb parents, as in Kubo
    hidden: bool = False  # include dotfiles when importing a directory (Kubo: --hidden)

    def __post_init__(self) -> None:
        if self.cid_version not in (0, 1):
            raise UnixFSError(f"cid version must be 0 or 1, got {self.cid_version}")
        if not 1 <= self.chunk_size <= MAX_CHUNK:
            raise UnixFSError(f"chunk size must be 1..{MAX_CHUNK} bytes, got {self.chunk_size}")

    @property
    def use_raw_leaves(self) -> bool:
        return self.cid_version == 1 if self.raw_leaves is None else self.raw_leaves

    @staticmethod
    def parse_chunker(spec: str) -> int:
        """Parse Kubo's `--chunker size-N` (only fixed-size chunking is supported)."""
        if spec == "default":
            return DEFAULT_CHUNK
        if not spec.startswith("size-"):
            raise UnixFSError(f"unsupported chunker {spec!r}: only size-N is supported")
        try:
            n = int(spec[5:])
        except ValueError:
            raise UnixFSError(f"bad chunker size in {spec!r}") from None
        if not 1 <= n <= MAX_CHUNK:
            raise UnixFSError(f"chunker size {n} out of range 1..{MAX_CHUNK}")
        return n


@dataclass
class ImportResult:
    cid: CID
    size: int  # bytes of file content (for a directory: sum over its files)
    blocks: int = 0
    tsize: int = 0  # cumulative DAG size, as in the parent's link Tsize
    entries: list[tuple[str, CID]] = field(default_factory=list)  # for directories: path, CID


class _Node:
    """One finished node as its parent needs it."""

    __slots__ = ("cid", "filesize", "tsize")

    def __init__(self, cid: CID, filesize: int, tsize: int) -> None:
        self.cid, self.filesize, self.tsize = cid, filesize, tsize


class _Builder:
    def __init__(self, sink: BlockSink | None, opts: ImportOptions, progress: Callable[[int], None] | None):
        self.sink, self.opts, self.progress = sink, opts, progress
        self.blocks = 0

    def emit(self, data: bytes, codec: int) -> CID:
        cid = CID.of(data, codec, 0 if (codec == DAG_PB and self.opts.cid_version == 0) else 1)
        if self.sink is not None:
            self.sink.put(cid, data)
        self.blocks += 1
        return cid

    def leaf(self, chunk: bytes) -> _Node:
        if self.progress:
            self.progress(len(chunk))
        if self.opts.use_raw_leaves:
            return _Node(self.emit(chunk, RAW), len(chunk), len(chunk))
        block = dagpb.encode(dagpb.PBNode([], UnixFSData(FILE, chunk or None, len(chunk)).encode()))
        return _Node(self.emit(block, DAG_PB), len(chunk), len(block))

    def parent(self, children: list[_Node]) -> _Node:
        total = sum(c.filesize for c in children)
        data = UnixFSData(FILE, None, total, [c.filesize for c in children]).encode()
        links = [dagpb.PBLink(c.cid, "", c.tsize) for c in children]
        block = dagpb.encode(dagpb.PBNode(links, data))
        return _Node(self.emit(block, DAG_PB), total, len(block) + sum(c.tsize for c in children))

    def file(self, chunks: Iterator[bytes]) -> _Node:
        first = next(chunks, None)
        root = self.leaf(first if first is not None else b"")
        pending = next(chunks, None)
        depth = 1
        while pending is not None:
            children = [root]
            pending = self._fill(children, depth, pending, chunks)
            root = self.parent(children)
            depth += 1
        return root

    def _fill(self, children: list[_Node], depth: int, pending: bytes | None, chunks: Iterator[bytes]) -> bytes | None:
        """Fill `children` (a node at `depth`) up to MAX_LINKS; return the next unused chunk."""
        while len(children) < MAX_LINKS and pending is not None:
            if depth == 1:
                children.append(self.leaf(pending))
                pending = next(chunks, None)
            else:
                sub: list[_Node] = []
                pending = self._fill(sub, depth - 1, pending, chunks)
                children.append(self.parent(sub))
        return pending


def _chunks(stream: BinaryIO, size: int) -> Iterator[bytes]:
    while True:
        buf = bytearray()
        while len(buf) < size:
            part = stream.read(size - len(buf))
            if not part:
                break
            buf += part
        if not buf:
            return
        yield bytes(buf)
        if len(buf) < size:
            return


def import_file(
    source: str | os.PathLike[str] | BinaryIO,
    sink: BlockSink | None,
    opts: ImportOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Import one file's bytes; `sink=None` only hashes (`--only-hash`)."""
    opts = opts or ImportOptions()
    b = _Builder(sink, opts, progress)
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            node = b.file(_chunks(f, opts.chunk_size))
    else:
        node = b.file(_chunks(source, opts.chunk_size))
    return ImportResult(node.cid, node.filesize, b.blocks, node.tsize)


def import_bytes(data: bytes, sink: BlockSink | None, opts: ImportOptions | None = None) -> ImportResult:
    return import_file(io.BytesIO(data), sink, opts)


def _dir_node(b: _Builder, entries: list[tuple[str, _Node]]) -> _Node:
    entries.sort(key=lambda e: e[0].encode("utf-8"))
    links = [dagpb.PBLink(n.cid, name, n.tsize) for name, n in entries]
    block = dagpb.encode(dagpb.PBNode(links, UnixFSData(DIRECTORY).encode()))
    return _Node(b.emit(block, DAG_PB), sum(n.filesize for _, n in entries), len(block) + sum(n.tsize for _, n in entries))


def import_path(
    path: str | os.PathLike[str],
    sink: BlockSink | None,
    opts: ImportOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Import a file or a directory tree like `ipfs add -r` (dotfiles skipped unless hidden=True).

    Directories are plain UnixFS directories; Kubo switches to a HAMT shard above ~256 KiB of
    links, which this importer does not produce (such directories get a different CID).
    """
    opts = opts or ImportOptions()
    b = _Builder(sink, opts, progress)
    listing: list[tuple[str, CID]] = []

    def walk(p: Path, rel: str) -> _Node:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(p).encode()
            block = dagpb.encode(dagpb.PBNode([], UnixFSData(SYMLINK, target).encode()))
            node = _Node(b.emit(block, DAG_PB), 0, len(block))
        elif stat.S_ISDIR(st.st_mode):
            kids = []
            for child in sorted(p.iterdir(), key=lambda c: c.name.encode()):
                if child.name.startswith(".") and not opts.hidden:
                    continue
                kids.append((child.name, walk(child, f"{rel}/{child.name}" if rel else child.name)))
            node = _dir_node(b, kids)
        elif stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                node = b.file(_chunks(f, opts.chunk_size))
        else:
            raise UnixFSError(f"{p}: cannot import a special file")
        listing.append((rel, node.cid))
        return node

    root = walk(Path(path), "")
    return ImportResult(root.cid, root.filesize, b.blocks, root.tsize, sorted(listing))
