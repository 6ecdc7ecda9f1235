"""The audit log: a signed hash chain in the block store; any change anywhere is detected."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.audit import AuditLog, AuditLogError, MemoryBlocks, verify_log
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.store.blockstore import Blockstore
from cidboot.trust import cose, keys


def test_chain_in_a_blockstore_verifies(tmp_path: Path) -> None:
    key = keys.generate()
    log = AuditLog(key, Blockstore(tmp_path))
    first = log.record("refused", "ForgedSignature: input x: not signed by its producer")
    log.record("run", "hello on 1 validated input(s)", operation="hello", inputs=[first.cid])
    assert log.head is not None and log.entries[1].prev == first.cid
    bodies = list(verify_log(log.head, Blockstore(tmp_path).get, key.public_key()))
    assert [(b["seq"], b["decision"]) for b in bodies] == [(1, "run"), (0, "refused")]
    assert bodies[1]["reason"].startswith("ForgedSignature")
    with pytest.raises(ValueError, match="decision must be one of"):
        log.record("maybe", "x")


def test_tampering_is_detected() -> None:
    key = keys.generate()
    store = MemoryBlocks()
    log = AuditLog(key, store)
    log.record("veto", "policy p vetoes hello", operation="hello")
    log.record("result", "hello.greeting -> greeting", operation="hello")
    assert log.head is not None
    with pytest.raises(AuditLogError, match="signature"):
        list(verify_log(log.head, store.get, keys.generate().public_key()))  # another agent's key
    # rewrite entry 0 (re-signed by a thief with their own key): its CID changes, so entry 1's link breaks
    doc = dagcbor.decode(store.get(log.entries[0].cid))
    doc["entry"]["reason"] = "nothing happened"
    doc["sig"] = cose.sign1(dagcbor.encode(doc["entry"]), keys.generate(), tagged=False, detached=True)
    forged = dagcbor.encode(doc)
    store.blocks[log.entries[0].cid] = forged  # a store that does not check CIDs on write
    with pytest.raises(AuditLogError, match=f"entry {log.entries[0].cid}"):
        list(verify_log(log.head, store.get, key.public_key()))
    # an entry of the wrong shape
    bad = dagcbor.encode({"entry": {"seq": 0}, "sig": b""})
    bad_cid = CID.of(bad, DAG_CBOR)
    store.put(bad_cid, bad)
    with pytest.raises(AuditLogError, match="not {entry:"):
        list(verify_log(bad_cid, store.get, key.public_key()))
    with pytest.raises(AuditLogError, match="entry"):
        list(verify_log(CID.of(b"missing", DAG_CBOR), store.get, key.public_key()))
