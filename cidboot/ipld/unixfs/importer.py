"""UnixFS import identical to Kubo's `ipfs add`.

Kubo's defaults: fixed-size 256 KiB chunks, the balanced layout with at most 174 links per
node, CIDv0 with dag-pb leaves (UnixFS File nodes); `--cid-version 1` switches raw leaves on
and prints base32 CIDv1. A single-chunk file is its own root (for raw leaves: a raw block).
The balanced builder is the same shape as go-unixfs's: the tree deepens only when a level is
full, all leaves sit at the same depth, and each internal node records its children's file
sizes in `blocksizes`. Memory stays bounded: one chunk plus at most 174 links per level.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from cidboot.ipld import dagpb
from cidboot.ipld.cid import CID, DAG_PB, RAW
from cidboot.ipld.multihash import SHA2_256, Multihash
from cidboot.ipld.unixfs.data import DIRECTORY, FILE, SYMLINK, UnixFSData, UnixFSError, file_leaf_frame

DEFAULT_CHUNK = 256 * 1024
MAX_LINKS = 174
MAX_CHUNK = 1024 * 1024  # Kubo refuses larger chunks (blocks above 1 MiB are not exchanged)


class BlockSink(Protocol):
    def put(self, cid: CID, data: bytes) -> None: ...


@contextmanager
def _batch(sink: BlockSink | None) -> Iterator[None]:
    """Around an import: when the sink batches (a `Blockstore`: its `writer`), one batch for the
    whole import, written as a fetch is: more than FLATFS_FIRST (16) new blocks land in one pack
    file, fewer in flatfs files, and the import returns once what it wrote is durable (the
    batch's fsyncs). `skip_present`: an import, unlike a fetch, does not know which blocks the
    store holds, so a block already stored intact, or repeated in the file, is not written
    again (as a lone `put` writes nothing for it), and the batch counts the new ones itself to
    choose pack or flatfs. The blocks still go through the sink's own `put` (a subclass's
    bookkeeping sees them); inside the batch, `put` queues to it. A sink with no `writer`
    (Kubo, a CAR, a build's collector) is written block by block, as ever."""
    writer = getattr(sink, "writer", None) if sink is not None else None
    if writer is None:
        yield
        return
    with writer(skip_present=True):
        yield


@dataclass(frozen=True)
class ImportOptions:
    """How to chunk and link a file (CID version, chunk size, raw leaves): Kubo's defaults."""

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
    """What an import produced: the root CID, content size, blocks written and the DAG's size."""

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
        self.pb_version = opts.cid_version  # dag-pb nodes: CIDv0 in the v0 profile
        self._full_frame: tuple[bytes, bytes] | None = None

    def emit(self, data: bytes, codec: int) -> CID:
        cid = CID.of(data, codec, 0 if (codec == DAG_PB and self.opts.cid_version == 0) else 1)
        if self.sink is not None:
            self.sink.put(cid, data)
        self.blocks += 1
        return cid

    def leaf(self, chunk: bytes | memoryview) -> _Node:
        """One leaf, hashed where the chunk lies: no block is assembled unless a sink wants it.

        `chunk` may be a view of the reader's reused buffer; it is hashed (and, for a sink,
        copied) before the next read overwrites it.
        """
        n = len(chunk)
        if self.progress:
            self.progress(n)
        self.blocks += 1
        if self.opts.use_raw_leaves:
            cid = CID(1, RAW, Multihash(SHA2_256, hashlib.sha256(chunk).digest()))
            if self.sink is not None:
                self.sink.put(cid, bytes(chunk))
            return _Node(cid, n, n)
        head, tail = self._frame(n)
        h = hashlib.sha256(head)
        h.update(chunk)
        h.update(tail)
        cid = CID(self.pb_version, DAG_PB, Multihash(SHA2_256, h.digest()))
        if self.sink is not None:
            self.sink.put(cid, b"".join((head, chunk, tail)))
        return _Node(cid, n, len(head) + n + len(tail))

    def _frame(self, n: int) -> tuple[bytes, bytes]:
        if n == self.opts.chunk_size:  # every chunk but the last: framed once per import
            if self._full_frame is None:
                self._full_frame = file_leaf_frame(n)
            return self._full_frame
        return file_leaf_frame(n)

    def parent(self, children: list[_Node]) -> _Node:
        total = sum(c.filesize for c in children)
        data = UnixFSData(FILE, None, total, [c.filesize for c in children]).encode()
        links = [dagpb.PBLink(c.cid, "", c.tsize) for c in children]
        block = dagpb.encode(dagpb.PBNode(links, data))
        return _Node(self.emit(block, DAG_PB), total, len(block) + sum(c.tsize for c in children))

    def file(self, stream: BinaryIO) -> _Node:
        """Import one file's bytes from `stream` as Kubo's balanced layout."""
        leaves = self._leaves(stream)
        root = next(leaves)  # an empty file is one empty leaf
        pending = next(leaves, None)
        depth = 1
        while pending is not None:
            children = [root]
            pending = self._fill(children, depth, pending, leaves)
            root = self.parent(children)
            depth += 1
        return root

    def _fill(self, children: list[_Node], depth: int, pending: _Node | None, leaves: Iterator[_Node]) -> _Node | None:
        """Fill `children` (a node at `depth`) up to MAX_LINKS; return the next unused leaf."""
        while len(children) < MAX_LINKS and pending is not None:
            if depth == 1:
                children.append(pending)
                pending = next(leaves, None)
            else:
                sub: list[_Node] = []
                pending = self._fill(sub, depth - 1, pending, leaves)
                children.append(self.parent(sub))
        return pending

    def _leaves(self, stream: BinaryIO) -> Iterator[_Node]:
        """Yield the file's leaves in order, at least one (an empty file has one empty leaf).

        Every chunk is read into the same buffer and hashed from it, so the import allocates
        nothing per chunk (large allocations are fresh zeroed pages each time, which cost as
        much as hashing them); a leaf is made before the next read, so the buffer is free again.
        """
        size = self.opts.chunk_size
        buf = bytearray(size)
        view = memoryview(buf)
        readinto = getattr(stream, "readinto", None)
        first = True
        while True:
            n = _read_full(stream, readinto, view, size)
            if n == 0 and not first:
                return
            first = False
            yield self.leaf(view[:n])
            if n < size:
                return


def _read_full(stream: BinaryIO, readinto: Callable[[memoryview], int | None] | None, view: memoryview, size: int) -> int:
    """Fill view[:size] from `stream`; fewer bytes only at the end of the stream."""
    n = 0
    while n < size:
        if readinto is not None:
            got = readinto(view[n:size])
            if got is None:  # a non-blocking stream with nothing ready: not the end of the file
                raise UnixFSError("cannot import from a non-blocking stream (read returned no data yet)")
        else:
            part = stream.read(size - n)
            if part is None:
                raise UnixFSError("cannot import from a non-blocking stream (read returned no data yet)")
            got = len(part)
            if got > size - n:
                raise UnixFSError(f"stream returned {got} bytes when {size - n} were asked for")
            view[n : n + got] = part
        if not got:
            break
        n += got
    return n


def import_file(
    source: str | os.PathLike[str] | BinaryIO,
    sink: BlockSink | None,
    opts: ImportOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Import one file's bytes; `sink=None` only hashes (`--only-hash`).

    Into a `Blockstore`, the import is one batch of its writer (`_batch`): a file of more than
    16 new blocks lands in one pack file, a smaller one (or a small change to a file the
    store holds) in flatfs files, and every block is on
    the disk when this returns (an fsync of each file the batch wrote), as a lone `put`'s is.
    What a crash mid-import leaves is what a crash mid-fetch leaves: blocks whole, absent,
    or torn (a short flatfs file, an index entry naming bytes that never reached the disk, a
    pack with no index, which is invisible and removed by `gc`); every read hashes the block
    against its CID, so a torn one is refused as damaged (CIDMismatch), never served, and the
    next import or fetch of it writes it again. The caller pins the root after the return."""
    opts = opts or ImportOptions()
    b = _Builder(sink, opts, progress)
    with _batch(sink):
        if isinstance(source, str | os.PathLike):
            with open(source, "rb", buffering=0) as f:  # unbuffered: readinto lands in our buffer
                node = b.file(f)
        else:
            node = b.file(source)
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
    Into a `Blockstore`, the whole tree is one batch, written and made durable as `import_file`
    says (more than 16 new blocks in all: one pack).
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
            with open(p, "rb", buffering=0) as f:
                node = b.file(f)
        else:
            raise UnixFSError(f"{p}: cannot import a special file")
        listing.append((rel, node.cid))
        return node

    with _batch(sink):
        root = walk(Path(path), "")
    return ImportResult(root.cid, root.filesize, b.blocks, root.tsize, sorted(listing))
