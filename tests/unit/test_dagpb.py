"""dag-pb codec against the IPLD spec: published vectors, the canonical byte form, and the
malformed inputs a strict decoder must refuse (the tests in test_unixfs.py cover the basics).

The CID strings below are well-known values from the IPLD dag-pb fixtures and Kubo itself (the
empty node, the empty UnixFS directory, the empty UnixFS file); they are not computed here.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cidboot.errors import FormatError
from cidboot.ipld import dagpb
from cidboot.ipld.cid import CID, DAG_PB, RAW


@pytest.mark.parametrize(
    "node, hex_bytes, cid_v0",
    [
        (dagpb.PBNode(), "", "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n"),
        (dagpb.PBNode(data=b"\x08\x01"), "0a020801", "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"),
        (dagpb.PBNode(data=b"\x08\x02\x18\x00"), "0a0408021800", "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"),
    ],
)
def test_known_vectors(node: dagpb.PBNode, hex_bytes: str, cid_v0: str) -> None:
    raw = dagpb.encode(node)
    assert raw.hex() == hex_bytes
    assert str(CID.of(raw, DAG_PB, version=0)) == cid_v0
    assert dagpb.decode(raw) == node


def test_empty_data_and_empty_name_are_not_absent() -> None:
    # The spec distinguishes a missing field from an empty one; both must survive a round trip.
    assert dagpb.encode(dagpb.PBNode(data=b"")) == b"\x0a\x00"
    assert dagpb.decode(b"\x0a\x00").data == b""
    assert dagpb.decode(b"").data is None
    cid = CID.of(b"x", RAW)
    with_empty = dagpb.encode(dagpb.PBNode([dagpb.PBLink(cid, "", 0)]))
    without = dagpb.encode(dagpb.PBNode([dagpb.PBLink(cid)]))
    assert with_empty != without
    assert dagpb.decode(with_empty).links[0] == dagpb.PBLink(cid, "", 0)
    assert dagpb.decode(without).links[0] == dagpb.PBLink(cid, None, None)


def test_link_field_layout_is_hash_name_tsize() -> None:
    cid = CID.of(b"x", RAW)
    raw = dagpb.encode(dagpb.PBNode([dagpb.PBLink(cid, "a", 300)]))
    link = b"\x0a" + bytes([len(bytes(cid))]) + bytes(cid) + b"\x12\x01a" + b"\x18\xac\x02"
    assert raw == b"\x12" + bytes([len(link)]) + link


def test_links_keep_the_given_order() -> None:
    # Sorting is the UnixFS layer's job (Kubo sorts directory entries); the codec keeps order.
    links = [dagpb.PBLink(CID.of(bytes([i]), RAW), name) for i, name in enumerate("cab")]
    assert [x.name for x in dagpb.decode(dagpb.encode(dagpb.PBNode(links))).links] == ["c", "a", "b"]


def _link(body: bytes) -> bytes:
    return b"\x12" + bytes([len(body)]) + body


CID_FIELD = b"\x0a\x22" + bytes(CID.of(b"x", DAG_PB, version=0))


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"\x0a\x80\x00", "not minimally encoded"),  # non-minimal length varint
        (b"\x00\x00", "field number 0"),
        (b"\x0d\x00\x00\x00\x00", "wire type 5"),  # fixed32 Data
        (b"\x09" + b"\x00" * 8, "wire type 1"),  # fixed64 Data
        (b"\x10\x01", "unexpected field 2"),  # Links as a varint
        (b"\x0a\x01", "runs past the end"),  # truncated Data
        (b"\x0a\x00\x00", "field number 0"),  # trailing garbage byte after Data
        (b"\x0a", "bad field key|length"),  # key without length
        (_link(CID_FIELD + b"\x12\x02\xff\xfe"), "not valid UTF-8"),
        (_link(CID_FIELD + b"\x18\x01\x12\x00"), "out of order"),  # Tsize before Name
        (_link(CID_FIELD + CID_FIELD), "out of order or repeated"),
        (_link(CID_FIELD + b"\x20\x01"), "unexpected field 4"),
        (_link(CID_FIELD + b"\x1a\x00"), "unexpected field 3"),  # Tsize with the wrong wire type
        (_link(b"\x12\x00"), "missing Hash"),
    ],
)
def test_rejects_malformed(raw: bytes, why: str) -> None:
    with pytest.raises(dagpb.DagPbError, match=why):
        dagpb.decode(raw)


def test_rejects_oversized_block() -> None:
    with pytest.raises(dagpb.DagPbError, match="exceeds"):
        dagpb.decode(b"\x0a" + b"\x00" * dagpb.MAX_BLOCK)


def test_error_is_a_format_error() -> None:
    assert issubclass(dagpb.DagPbError, FormatError)


_names = st.one_of(st.none(), st.text(max_size=20))
_tsizes = st.one_of(st.none(), st.integers(min_value=0, max_value=2**63 - 1))
_links = st.builds(dagpb.PBLink, st.binary(max_size=8).map(lambda b: CID.of(b, RAW)), _names, _tsizes)
_nodes = st.builds(dagpb.PBNode, st.lists(_links, max_size=5), st.one_of(st.none(), st.binary(max_size=64)))


@given(_nodes)
def test_round_trip_any_node(node: dagpb.PBNode) -> None:
    raw = dagpb.encode(node)
    assert dagpb.decode(raw) == node
    assert dagpb.encode(dagpb.decode(raw)) == raw


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_format_error(raw: bytes) -> None:
    try:
        node = dagpb.decode(raw)
    except FormatError:
        return
    assert dagpb.encode(node) == raw  # anything accepted is already canonical
