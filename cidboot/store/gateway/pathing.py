"""Resolve `/ipfs/{cid}/a/b` for the trustless gateway, keeping the blocks a client needs to
verify the path itself.

A trustless client checks every step of a path, so a CAR response starts with exactly the
blocks that were traversed: directory nodes, the HAMT shard nodes on the way to the entry (not
the whole HAMT), and DAG-CBOR documents whose fields were followed. Kept apart from the HTTP
server so the rules can be read and tested in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cidboot.errors import NotFoundError
from cidboot.ipld import dagcbor, dagpb
from cidboot.ipld.cid import CID, DAG_CBOR, DAG_PB
from cidboot.ipld.unixfs.data import DIRECTORY, HAMT_SHARD, UnixFSData, UnixFSError

GetBlock = Callable[[CID], bytes]
MAX_HAMT_DEPTH = 64


class PathNotFound(NotFoundError):
    """A path segment names nothing under the node it is looked up in (HTTP 404)."""


@dataclass(frozen=True)
class Resolved:
    terminal: CID  # the CID the path ends at (the entity the response is about)
    path_blocks: list[tuple[CID, bytes]]  # blocks traversed before it, in order
    roots: list[CID]  # the root, then the CID each followed link led to (X-Ipfs-Roots)


def _hamt_find(
    node: dagpb.PBNode, ufs: UnixFSData, name: str, get: GetBlock, depth: int = 0
) -> tuple[CID, list[tuple[CID, bytes]]] | None:
    """Find `name` in a HAMT shard; return its CID and the sub-shard blocks on the way.

    The entry lives under exactly one chain of shards, so a search gives the same blocks as a
    murmur3 lookup would (at the cost of reading sibling shards, which are not sent)."""
    if depth > MAX_HAMT_DEPTH:
        raise UnixFSError(f"HAMT deeper than {MAX_HAMT_DEPTH}")
    fanout = ufs.fanout or 256
    if fanout < 2 or fanout & (fanout - 1):
        raise UnixFSError(f"HAMT fanout {fanout} is not a power of two")
    width = len(f"{fanout - 1:X}")
    for link in node.links:
        lname = link.name or ""
        if len(lname) == width:
            block = get(link.cid)
            sub = dagpb.decode(block)
            subufs = UnixFSData.decode(sub.data)
            if subufs.type != HAMT_SHARD:
                raise UnixFSError(f"HAMT sub-shard {link.cid} is not a shard")
            found = _hamt_find(sub, subufs, name, get, depth + 1)
            if found is not None:
                return found[0], [(link.cid, block), *found[1]]
        elif lname[width:] == name:
            return link.cid, []
    return None


def _cbor_step(obj: Any, seg: str, cid: CID) -> Any:
    if isinstance(obj, dict):
        if seg not in obj:
            raise PathNotFound(f"no field {seg!r} in DAG-CBOR node {cid}")
        return obj[seg]
    if isinstance(obj, list):
        if not seg.isdigit() or int(seg) >= len(obj):
            raise PathNotFound(f"no index {seg!r} in a list of {len(obj)} in DAG-CBOR node {cid}")
        return obj[int(seg)]
    raise PathNotFound(f"cannot follow {seg!r} into a {type(obj).__name__} in DAG-CBOR node {cid}")


def resolve(root: CID, path: list[str], get: GetBlock) -> Resolved:
    """Follow `path` from `root` through UnixFS directories (plain or HAMT) and DAG-CBOR fields."""
    cid = root
    blocks: list[tuple[CID, bytes]] = []
    segs = list(path)
    roots = [root]
    while segs:
        block = get(cid)
        blocks.append((cid, block))
        if cid.codec == DAG_PB:
            name = segs.pop(0)
            node = dagpb.decode(block)
            ufs = UnixFSData.decode(node.data)
            if ufs.type == DIRECTORY:
                nxt = next((lk.cid for lk in node.links if lk.name == name), None)
                if nxt is None:
                    raise PathNotFound(f"no entry {name!r} in directory {cid}")
                cid = nxt
                roots.append(cid)
            elif ufs.type == HAMT_SHARD:
                found = _hamt_find(node, ufs, name, get)
                if found is None:
                    raise PathNotFound(f"no entry {name!r} in sharded directory {cid}")
                cid = found[0]
                blocks.extend(found[1])
                roots.append(cid)
            else:
                raise PathNotFound(f"{cid} is not a directory: cannot look up {name!r} in it")
        elif cid.codec == DAG_CBOR:
            obj: Any = dagcbor.decode(block)
            while segs and not isinstance(obj, CID):
                obj = _cbor_step(obj, segs.pop(0), cid)
            if isinstance(obj, CID):
                cid = obj
                roots.append(cid)
            else:
                # the path ends inside this document: the document is the entity
                blocks.pop()
                break
        else:
            raise PathNotFound(f"{cid} is a {cid.codec_name} block: it has no path {'/'.join(segs)!r}")
    return Resolved(cid, blocks, roots)
