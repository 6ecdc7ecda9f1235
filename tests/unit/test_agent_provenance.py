"""Provenance nodes (cidboot.dataflow.provenance): the signed envelope, its CID, strict decoding with a
precise message per malformation, and signature checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from cidboot.dataflow.provenance import (
    ForgedSignature,
    ProvenanceFormatError,
    decode_input,
    make_input,
    verify_signature,
)
from cidboot.errors import VerificationError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.trust import cose, keys
from cidboot.trust.cose_key import encode_public_key_bytes

FLOW = CID.of(dagcbor.encode({"flow": 1}), DAG_CBOR)
KEY = keys.generate()


def test_round_trip_seed_and_output() -> None:
    scid, sblock = make_input(value="world", definition="name", flow=FLOW, parents=[FLOW], key=KEY)
    seed = decode_input(sblock, scid)
    assert seed.is_seed and seed.origin == "seed" and seed.operation is None and seed.output is None
    ocid, oblock = make_input(value={"a": [1, 2]}, definition="greeting", flow=FLOW, parents=[scid], key=KEY,
                              operation="hello", output="greeting")
    out = decode_input(oblock, ocid)
    assert (out.origin, out.operation, out.output, out.parents) == ("hello:greeting", "hello", "greeting", (scid,))
    verify_signature(seed)
    verify_signature(out)
    assert ocid == CID.of(oblock, DAG_CBOR)  # the CID covers the signed envelope
    raw = dagcbor.decode(oblock)
    assert set(raw) == {"input", "sig"} and raw["input"]["origin"] == "hello:greeting"


def test_a_changed_signature_changes_the_cid_and_a_foreign_one_is_forged() -> None:
    cid, block = make_input(value=1, definition="n", flow=FLOW, parents=[FLOW], key=KEY)
    doc = dagcbor.decode(block)
    other = keys.generate()
    doc["sig"] = cose.sign1(dagcbor.encode(doc["input"]), other, tagged=False, detached=True)
    forged = dagcbor.encode(doc)
    assert CID.of(forged, DAG_CBOR) != cid
    with pytest.raises(ForgedSignature, match="not signed by its producer"):
        verify_signature(decode_input(forged))
    with pytest.raises(VerificationError):
        decode_input(forged, cid)  # claimed under the old CID: the bytes do not hash to it


def _payload() -> dict[str, Any]:
    return {"value": 1, "definition": "n", "origin": "op:y", "operation": "op", "flow": FLOW, "parents": [FLOW],
            "producer": encode_public_key_bytes(KEY.public_key())}


def _with(change: Callable[[dict[str, Any]], None]) -> bytes:
    p = _payload()
    change(p)
    return dagcbor.encode({"input": p, "sig": b"\x80"})


@pytest.mark.parametrize("block, match", [
    (b"", "provenance node"),
    (dagcbor.encode([1, 2]), "exactly 'input' and 'sig'"),
    (dagcbor.encode({"input": _payload(), "sig": "text"}), "sig must be a byte string"),
    (dagcbor.encode({"input": [1], "sig": b""}), "input must be a map, not list"),
    (_with(lambda p: p.pop("origin")), r"missing \['origin'\], unknown \[\]"),
    (_with(lambda p: p.update(extra=1)), r"missing \[\], unknown \['extra'\]"),
    (_with(lambda p: p.update(definition="")), "definition must be a non-empty string"),
    (_with(lambda p: p.update(origin=7)), "origin must be a string"),
    (_with(lambda p: p.update(operation=None)), "operation is null but origin is 'op:y'"),
    (_with(lambda p: p.update(origin="other:y")), "origin 'other:y' is not \"op:OUTPUT\""),
    (_with(lambda p: p.update(origin="op:")), "origin 'op:' is not"),
    (_with(lambda p: p.update(operation=3)), "operation must be a non-empty string or null"),
    (_with(lambda p: p.update(flow=str(FLOW))), "flow must be a CID link"),
    (_with(lambda p: p.update(parents=[str(FLOW)])), "parents must be a list of CID links"),
    (_with(lambda p: p.update(producer="key")), "producer must be an encoded COSE_Key"),
    (_with(lambda p: p.update(producer=b"\xa0")), "provenance node: producer:"),
    (b"\xa2" + b"\x00" * 10, "provenance node"),  # not canonical / truncated CBOR
    (b"\x00" * ((1 << 20) + 1), "more than 1048576"),
])
def test_malformed_nodes_give_precise_errors(block: bytes, match: str) -> None:
    with pytest.raises(ProvenanceFormatError, match=match):
        decode_input(block)


def test_non_canonical_cbor_is_refused() -> None:
    _cid, block = make_input(value=1, definition="n", flow=FLOW, parents=[FLOW], key=KEY)
    # the same map with "input" before "sig": same data, not DAG-CBOR's (length-first) key order
    doc = dagcbor.decode(block)
    import cbor2
    link = cbor2.CBORTag(42, b"\x00" + bytes(FLOW))
    swapped = cbor2.dumps({"input": {**doc["input"], "flow": link, "parents": [link]}, "sig": doc["sig"]})
    with pytest.raises(ProvenanceFormatError, match="provenance node"):
        decode_input(swapped)


def test_make_input_refuses_half_an_origin() -> None:
    with pytest.raises(ProvenanceFormatError, match="both set"):
        make_input(value=1, definition="n", flow=FLOW, parents=[], key=KEY, operation="op")
    with pytest.raises(ProvenanceFormatError, match="no ':' in the operation"):
        make_input(value=1, definition="n", flow=FLOW, parents=[], key=KEY, operation="a:b", output="y")
