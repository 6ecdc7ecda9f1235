"""agent.validate.Validator on its own: one exception type per failed check, memoisation by
CID, deep chains without recursion, and a parent signed by someone else."""

from __future__ import annotations

import pytest

from agent.attested import AttestedAgents
from agent.audit import MemoryBlocks
from agent.validate import (
    MissingInput,
    TamperedInput,
    TamperedParent,
    UnattestedProducer,
    UnknownOperation,
    Validator,
    WrongFlow,
)
from cidboot.dataflow.model import DataFlow
from cidboot.dataflow.provenance import ForgedSignature, make_input
from cidboot.errors import VerificationError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.trust import keys
from cidboot.trust.cose_key import raw_public_bytes

FLOW = DataFlow.from_obj({"definitions": {"v": {"primitive": "int"}},
                          "operations": {"f": {"implementation": "m:f", "inputs": {"x": "v"}, "outputs": {"y": "v"}}},
                          "seed": [{"definition": "v", "value": 0}],
                          "flow": {"f": {"inputs": {"x": ["seed", {"f": "y"}]}}}})


class CountingStore(MemoryBlocks):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def get(self, cid: CID) -> bytes:
        self.reads += 1
        return super().get(cid)


def setup(n: int, placement: dict[str, list[str]] | None = None) -> tuple[Validator, list[CID], CountingStore]:
    key, authority = keys.generate(), keys.generate()
    store = CountingStore()
    cid, block = make_input(value=0, definition="v", flow=FLOW.cid, parents=[FLOW.cid], key=authority)
    store.put(cid, block)
    cids = [cid]
    for i in range(1, n):
        cid, block = make_input(value=i, definition="v", flow=FLOW.cid, parents=[cids[-1]], key=key, operation="f",
                                output="y")
        store.put(cid, block)
        cids.append(cid)
    attested = AttestedAgents()
    attested.add_self(raw_public_bytes(key.public_key()), "worker")
    v = Validator(FLOW, FLOW.cid, placement or {}, attested, store.get,
                  frozenset({raw_public_bytes(authority.public_key())}))
    return v, cids, store


def test_deep_chain_validates_once_per_node() -> None:
    v, cids, store = setup(3000)  # deeper than Python's recursion limit
    assert v.validate(cids[-1]).value == 2999
    assert store.reads == 3000
    v.validate(cids[-1])
    v.validate(cids[10])
    assert store.reads == 3000  # memoised by CID


def test_each_failure_has_its_own_type() -> None:
    v, cids, store = setup(3)
    with pytest.raises(MissingInput, match="block not available"):
        v.validate(CID.of(b"absent", DAG_CBOR))
    junk = dagcbor.encode({"not": "a node"})
    jcid = CID.of(junk, DAG_CBOR)
    store.put(jcid, junk)
    with pytest.raises(TamperedInput, match="exactly 'input' and 'sig'"):
        v.validate(jcid)
    other = DataFlow.from_obj({**FLOW.to_obj(), "seed": [{"definition": "v", "value": 1}]})
    ocid, oblock = make_input(value=1, definition="v", flow=other.cid, parents=[other.cid], key=keys.generate())
    store.put(ocid, oblock)
    with pytest.raises(WrongFlow, match="belongs to flow"):
        v.validate(ocid)
    stranger = keys.generate()
    scid, sblock = make_input(value=0, definition="v", flow=FLOW.cid, parents=[FLOW.cid], key=stranger)
    store.put(scid, sblock)
    with pytest.raises(UnattestedProducer, match="neither the flow authority nor an attested agent"):
        v.validate(scid)
    # a child of a stranger's seed: the child is fine, its parent is not
    v2, _cids, store2 = setup(1)
    store2.put(scid, sblock)
    k = keys.generate()  # an attested worker signs a child of the stranger's seed
    v2.attested.add_self(raw_public_bytes(k.public_key()), "worker")
    ccid, cblock = make_input(value=1, definition="v", flow=FLOW.cid, parents=[scid], key=k, operation="f", output="y")
    store2.put(ccid, cblock)
    with pytest.raises(TamperedParent, match=f"ancestor {scid}"):
        v2.validate(ccid)


def test_placement_and_forgery() -> None:
    v, cids, _store = setup(2, placement={"elsewhere": ["f"]})
    with pytest.raises(UnknownOperation, match="not placed on role 'worker'"):
        v.validate(cids[-1])
    assert issubclass(ForgedSignature, VerificationError) and issubclass(UnknownOperation, VerificationError)
