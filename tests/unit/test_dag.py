"""Link extraction per codec and the depth-first, duplicate-free walk the trustless gateway's
CAR responses (and pinning/gc) rely on."""

from __future__ import annotations

import pytest

from cidboot.errors import FormatError
from cidboot.ipld import dag, dagcbor, dagpb
from cidboot.ipld.cid import CID, DAG_CBOR, DAG_PB, RAW


def _store() -> tuple[dict[CID, bytes], CID, list[CID]]:
    """root(dag-pb) -> [a(dag-cbor) -> [x, y], x, b(dag-pb) -> [y]]; x and y are raw."""
    blocks: dict[CID, bytes] = {}

    def put(data: bytes, codec: int) -> CID:
        cid = CID.of(data, codec)
        blocks[cid] = data
        return cid

    x, y = put(b"x", RAW), put(b"y", RAW)
    a = put(dagcbor.encode({"l": [x, {"deep": y}], "n": 1}), DAG_CBOR)
    b = put(dagpb.encode(dagpb.PBNode([dagpb.PBLink(y, "y")])), DAG_PB)
    root = put(dagpb.encode(dagpb.PBNode([dagpb.PBLink(a, "a"), dagpb.PBLink(x, "x"), dagpb.PBLink(b, "b")])), DAG_PB)
    return blocks, root, [a, x, y, b]


def test_links_per_codec() -> None:
    blocks, root, (a, x, y, b) = _store()
    assert dag.links(root, blocks[root]) == [a, x, b]
    assert dag.links(a, blocks[a]) == [x, y]  # tag-42 CIDs found inside lists and maps
    assert dag.links(x, blocks[x]) == []


def test_walk_is_depth_first_in_link_order_without_duplicates() -> None:
    blocks, root, (a, x, y, b) = _store()
    fetched: list[CID] = []

    def get(cid: CID) -> bytes:
        fetched.append(cid)
        return blocks[cid]

    assert [c for c, _ in dag.walk(root, get)] == [root, a, x, y, b]
    assert fetched == [root, a, x, y, b]  # duplicates are not even fetched
    assert [c for c, _ in dag.walk(root, blocks.__getitem__, skip_dups=False)] == [root, a, x, y, x, b, y]


def test_malformed_and_unknown_codecs_raise_format_errors() -> None:
    with pytest.raises(FormatError):
        dag.links(CID.of(b"\xff", DAG_PB), b"\xff")
    with pytest.raises(FormatError):
        dag.links(CID.of(b"\xff", DAG_CBOR), b"\xff")
    with pytest.raises(dag.UnsupportedCodec, match="cannot read links"):
        dag.links(CID.of(b"{}", 0x0129), b"{}")
