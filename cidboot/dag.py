"""Links between blocks, whatever their codec: what pinning, gc, CAR export and the
gateway's `dag-scope=all` walk."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from cidboot import dagcbor, dagpb
from cidboot.cid import CID, DAG_CBOR, DAG_PB, RAW
from cidboot.errors import FormatError


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
