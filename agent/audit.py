"""The audit log: every decision the agent makes (run, veto, refused input, accepted peer),
as a hash chain of signed DAG-CBOR entries in the block store.

Each entry links the previous one by CID and is signed by the agent's alias key (COSE_Sign1,
detached over the DAG-CBOR of the entry), so the head CID commits to the whole history and
nobody without the key can rewrite it. The head is served by the agent and published with
its results.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from cidboot import cose, dagcbor
from cidboot.cid import CID, DAG_CBOR
from cidboot.cose import PrivateKey, PublicKey
from cidboot.errors import VerificationError

DECISIONS = ("run", "veto", "refused", "accepted", "result")


class BlockSink(Protocol):
    def put(self, cid: CID, data: bytes) -> None: ...
    def get(self, cid: CID) -> bytes: ...


class MemoryBlocks:
    def __init__(self) -> None:
        self.blocks: dict[CID, bytes] = {}

    def put(self, cid: CID, data: bytes) -> None:
        cid.verify(data)
        self.blocks[cid] = data

    def get(self, cid: CID) -> bytes:
        return self.blocks[cid]

    def has(self, cid: CID) -> bool:
        return cid in self.blocks


@dataclass(frozen=True)
class Entry:
    cid: CID
    seq: int
    decision: str
    operation: str | None
    inputs: list[CID]
    reason: str
    prev: CID | None


class AuditLog:
    def __init__(self, key: PrivateKey, store: BlockSink) -> None:
        self.key, self.store = key, store
        self.head: CID | None = None
        self.seq = 0
        self.entries: list[Entry] = []
        self._lock = threading.Lock()

    def record(self, decision: str, reason: str, *, operation: str | None = None, inputs: list[CID] | None = None) -> Entry:
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}")
        with self._lock:
            body: dict[str, Any] = {"seq": self.seq, "decision": decision, "operation": operation,
                                    "inputs": list(inputs or []), "reason": reason, "prev": self.head}
            raw = dagcbor.encode(body)
            block = dagcbor.encode({"entry": body, "sig": cose.sign1(raw, self.key, tagged=False, detached=True)})
            cid = CID.of(block, DAG_CBOR)
            self.store.put(cid, block)
            e = Entry(cid, self.seq, decision, operation, list(inputs or []), reason, self.head)
            self.entries.append(e)
            self.head, self.seq = cid, self.seq + 1
            return e

    def find(self, decision: str, operation: str | None = None) -> list[Entry]:
        return [e for e in self.entries if e.decision == decision and (operation is None or e.operation == operation)]


def verify_log(head: CID, get: Any, key: PublicKey) -> Iterator[dict[str, Any]]:
    """Walk the chain from `head` back to the first entry, checking every link and signature."""
    cid: CID | None = head
    expect = None
    while cid is not None:
        block = get(cid)
        cid.verify(block)
        doc = dagcbor.decode(block)
        body = doc["entry"]
        cose.verify1(doc["sig"], key, detached_payload=dagcbor.encode(body))
        if expect is not None and body["seq"] != expect:
            raise VerificationError(f"audit log: entry {cid} has seq {body['seq']}, expected {expect}")
        yield body
        expect = body["seq"] - 1
        cid = body["prev"]
    if expect not in (None, -1):
        raise VerificationError("audit log: the chain ends before entry 0")
