"""Links between blocks, whatever their codec: what pinning, gc, CAR export and the
gateway's `dag-scope=all` walk."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from cidboot.errors import FormatError
from cidboot.ipld import dagcbor, dagpb
from cidboot.ipld.cid import CID, DAG_CBOR, DAG_PB, RAW


class UnsupportedCodec(FormatError):
    """A block's codec is one we cannot read links from."""


def _cbor_links(obj: Any, out: list[CID]) -> None:
    if isinstance(obj, CID):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _cbor_links(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _cbor_links(v, out)


def links(cid: CID, block: bytes) -> list[CID]:
    """The CIDs `block` links to, in order."""
    if cid.codec == RAW:
        return []
    if cid.codec == DAG_PB:
        return [link.cid for link in dagpb.decode(block).links]
    if cid.codec == DAG_CBOR:
        out: list[CID] = []
        _cbor_links(dagcbor.decode(block), out)
        return out
    raise UnsupportedCodec(f"cannot read links of {cid.codec_name} block {cid}")


def walk(root: CID, get_block: Callable[[CID], bytes], *, skip_dups: bool = True) -> Iterator[tuple[CID, bytes]]:
    """Depth-first, links in order, each block once: the order of a trustless-gateway CAR.

    Identity CIDs carry their bytes inline and are yielded without a fetch.
    """
    seen: set[bytes] = set()
    stack = [root]
    while stack:
        cid = stack.pop()
        key = cid.multihash.encode()
        if skip_dups and key in seen:
            continue
        seen.add(key)
        block = cid.multihash.digest if cid.is_identity else get_block(cid)
        yield cid, block
        stack.extend(reversed(links(cid, block)))


class WalkCost:
    """What a depth-first walk of a DAG yields: each block once (`unique_*`) and with every
    duplicate repeated (`visits`, `bytes`, what a `dups=y` CAR carries). A plain record: this
    module is imported by every stage's block store, and a frozen dataclass's generated methods
    cost ~3 M guest instructions at import for a figure only the gateway server computes."""

    __slots__ = ("unique_blocks", "unique_bytes", "visits", "bytes")

    def __init__(self, unique_blocks: int, unique_bytes: int, visits: int, bytes: int) -> None:
        self.unique_blocks = unique_blocks
        self.unique_bytes = unique_bytes
        self.visits = visits
        self.bytes = bytes

    def __eq__(self, other: object) -> bool:
        return type(other) is WalkCost and (self.unique_blocks, self.unique_bytes, self.visits, self.bytes) == \
            (other.unique_blocks, other.unique_bytes, other.visits, other.bytes)

    def __hash__(self) -> int:
        return hash((self.unique_blocks, self.unique_bytes, self.visits, self.bytes))

    def __repr__(self) -> str:
        return (f"WalkCost(unique_blocks={self.unique_blocks}, unique_bytes={self.unique_bytes}, "
                f"visits={self.visits}, bytes={self.bytes})")

    @property
    def duplicate_visits(self) -> int:
        return self.visits - self.unique_blocks

    @property
    def duplicate_bytes(self) -> int:
        return self.bytes - self.unique_bytes


def walk_cost(root: CID, get_block: Callable[[CID], bytes]) -> WalkCost:
    """The cost of `walk(root, skip_dups=False)` without walking it: each distinct block is read
    once and the repeat counts are summed bottom-up, so a diamond-shaped DAG of 40 blocks whose
    duplicate walk is 2^40 visits costs 40 reads to measure. (Content addressing rules out cycles.)"""
    done: dict[bytes, tuple[int, int]] = {}  # key -> (visits, bytes) of its subtree with duplicates
    pending: dict[bytes, tuple[int, list[CID]]] = {}
    unique_bytes = 0
    stack: list[tuple[CID, bool]] = [(root, False)]
    while stack:
        cid, expanded = stack.pop()
        key = cid.multihash.encode()
        if not expanded:
            if key in done or key in pending:
                continue
            block = cid.multihash.digest if cid.is_identity else get_block(cid)
            kids = links(cid, block)
            pending[key] = (len(block), kids)
            unique_bytes += len(block)
            stack.append((cid, True))
            stack.extend((k, False) for k in kids)
            continue
        size, kids = pending.pop(key)
        visits, nbytes = 1, size
        for k in kids:
            kv, kb = done[k.multihash.encode()]
            visits, nbytes = visits + kv, nbytes + kb
        done[key] = (visits, nbytes)
    total_visits, total_bytes = done[root.multihash.encode()]
    return WalkCost(len(done), unique_bytes, total_visits, total_bytes)
