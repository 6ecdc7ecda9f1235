"""Read UnixFS files and directories back out of a DAG, through any `get_block(cid)`.

Every block comes through `get_block`, which is where verification happens (the store
verifies on read, the network client verifies before it returns), so the exporter itself
only has to check that the DAG has a valid UnixFS shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from cidboot.ipld import dagpb
from cidboot.ipld.cid import CID, DAG_PB, RAW
from cidboot.ipld.unixfs.data import DIRECTORY, FILE, HAMT_SHARD, SYMLINK, TYPE_NAMES, UnixFSData, UnixFSError
from cidboot.ipld.unixfs.data import RAW as T_RAW

GetBlock = Callable[[CID], bytes]
MAX_DEPTH = 64


class DirEntry:
    """One entry of a UnixFS directory: its name, CID and the link's cumulative size. A value
    (field equality and hash), written out rather than a frozen dataclass (import cost, as
    dagpb.PBLink)."""

    __slots__ = ("name", "cid", "tsize")

    def __init__(self, name: str, cid: CID, tsize: int | None) -> None:
        self.name = name
        self.cid = cid
        self.tsize = tsize

    def __eq__(self, other: object) -> bool:
        return type(other) is DirEntry and (self.name, self.cid, self.tsize) == (other.name, other.cid, other.tsize)

    def __hash__(self) -> int:
        return hash((self.name, self.cid, self.tsize))

    def __repr__(self) -> str:
        return f"DirEntry(name={self.name!r}, cid={self.cid!r}, tsize={self.tsize!r})"


def _node(cid: CID, get_block: GetBlock) -> tuple[dagpb.PBNode, UnixFSData]:
    node = dagpb.decode(get_block(cid))
    return node, UnixFSData.decode(node.data)


def file_size(cid: CID, get_block: GetBlock) -> int:
    if cid.codec == RAW:
        return len(get_block(cid))
    if cid.is_identity and cid.codec != DAG_PB:
        return len(cid.multihash.digest)
    node, ufs = _node(cid, get_block)
    if ufs.type not in (FILE, T_RAW):
        raise UnixFSError(f"{cid} is a UnixFS {TYPE_NAMES[ufs.type]}, not a file")
    if ufs.filesize is not None:
        return ufs.filesize
    return len(ufs.data or b"") + sum(ufs.blocksizes)


def iter_file_blocks(
    cid: CID, get_block: GetBlock, start: int = 0, end: int | None = None, _depth: int = 0
) -> Iterator[tuple[CID, bytes, bytes]]:
    """Yield (cid, block, file bytes it contributes to [start, end)) for exactly the blocks of
    the file that overlap the range, depth-first: what both byte export and the gateway's
    `entity-bytes` CAR need."""
    if _depth > MAX_DEPTH:
        raise UnixFSError(f"file DAG deeper than {MAX_DEPTH} at {cid}")
    if cid.codec == RAW:
        data = cid.multihash.digest if cid.is_identity else get_block(cid)
        yield cid, data, data[start:end]
        return
    if cid.codec != DAG_PB:
        raise UnixFSError(f"{cid} is {cid.codec_name}, not a UnixFS file")
    block = get_block(cid)
    node = dagpb.decode(block)
    ufs = UnixFSData.decode(node.data)
    if ufs.type not in (FILE, T_RAW):
        raise UnixFSError(f"{cid} is a UnixFS {TYPE_NAMES[ufs.type]}, not a file")
    if node.links and len(node.links) != len(ufs.blocksizes):
        raise UnixFSError(f"{cid}: {len(node.links)} links but {len(ufs.blocksizes)} blocksizes")
    seg = ufs.data or b""
    hi = len(seg) if end is None else min(end, len(seg))
    yield cid, block, seg[start:hi] if start < hi else b""
    pos = len(seg)
    for link, bs in zip(node.links, ufs.blocksizes, strict=False):
        if end is not None and pos >= end:
            return
        if pos + bs > start:
            sub_end = None if end is None else end - pos
            yield from iter_file_blocks(link.cid, get_block, max(start - pos, 0), sub_end, _depth + 1)
        pos += bs


def export_range(cid: CID, get_block: GetBlock, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Yield the file's bytes in [start, end), fetching only the blocks that overlap it."""
    if end is not None and end <= start:
        return
    for _, _, seg in iter_file_blocks(cid, get_block, start, end):
        if seg:
            yield seg


def export_file(cid: CID, get_block: GetBlock) -> Iterator[bytes]:
    return export_range(cid, get_block, 0, None)


def list_dir(cid: CID, get_block: GetBlock) -> list[DirEntry]:
    """Entries of a plain or HAMT-sharded directory, sorted by name."""
    node, ufs = _node(cid, get_block)
    if ufs.type == DIRECTORY:
        return [DirEntry(link.name or "", link.cid, link.tsize) for link in node.links]
    if ufs.type == HAMT_SHARD:
        out: list[DirEntry] = []
        _walk_shard(cid, node, ufs, get_block, out, 0)
        return sorted(out, key=lambda e: e.name.encode())
    raise UnixFSError(f"{cid} is a UnixFS {TYPE_NAMES[ufs.type]}, not a directory")


def _walk_shard(cid: CID, node: dagpb.PBNode, ufs: UnixFSData, get_block: GetBlock, out: list[DirEntry], depth: int) -> None:
    # Link names are a hex bucket prefix (two characters for the usual fanout of 256) followed
    # by the entry name; a link that is only the prefix points to a sub-shard. Listing needs no
    # hashing; lookups of one name could use murmur3, but boot images never need that.
    if depth > MAX_DEPTH:
        raise UnixFSError(f"HAMT deeper than {MAX_DEPTH} at {cid}")
    fanout = ufs.fanout or 256
    if fanout & (fanout - 1) or fanout < 2:
        raise UnixFSError(f"HAMT shard {cid}: fanout {fanout} is not a power of two")
    width = len(f"{fanout - 1:X}")
    for link in node.links:
        name = link.name or ""
        if len(name) < width:
            raise UnixFSError(f"HAMT shard {cid}: link name {name!r} shorter than its prefix")
        if len(name) == width:
            sub, subufs = _node(link.cid, get_block)
            if subufs.type != HAMT_SHARD:
                raise UnixFSError(f"HAMT shard {cid}: sub-shard {link.cid} is not a shard")
            _walk_shard(link.cid, sub, subufs, get_block, out, depth + 1)
        else:
            out.append(DirEntry(name[width:], link.cid, link.tsize))


def resolve_path(root: CID, path: str, get_block: GetBlock) -> CID:
    """Follow a /-separated path of directory entries from `root`."""
    cid = root
    for part in [p for p in path.split("/") if p]:
        for e in list_dir(cid, get_block):
            if e.name == part:
                cid = e.cid
                break
        else:
            from cidboot.errors import NotFoundError

            raise NotFoundError(f"no entry {part!r} in directory {cid}")
    return cid


def is_symlink(cid: CID, get_block: GetBlock) -> bool:
    if cid.codec != DAG_PB:
        return False
    return _node(cid, get_block)[1].type == SYMLINK
