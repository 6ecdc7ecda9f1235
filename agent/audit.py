"""The audit log: every decision the agent makes (run, veto, refused input, accepted peer),
as a hash chain of signed DAG-CBOR entries in the block store.

Each entry links the previous one by CID and is signed by the agent's alias key (COSE_Sign1,
detached over the DAG-CBOR of the entry), so the head CID commits to the whole history and
nobody without the key can rewrite it. The head is served by the agent and published with
its results. The store is anything with put/get (cidboot.store.blockstore.Blockstore on an agent,
MemoryBlocks in tests and benchmarks).

    entry = {"entry": {"seq": int, "decision": "run"|"veto"|"refused"|"accepted"|"result"|"error",
                       "operation": str | null, "inputs": [CID...], "reason": str, "prev": CID | null},
             "sig": COSE_Sign1 (untagged, detached payload = DAG-CBOR of "entry")}

Public API: AuditLog(key, store).record(decision, reason, operation=None, inputs=None) -> Entry;
.head (CID | None); .entries; .find(decision, operation=None); verify_log(head, get, public_key).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from cidboot.errors import CidbootError, VerificationError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.trust import cose
from cidboot.trust.cose import PrivateKey, PublicKey

DECISIONS = ("run", "veto", "refused", "accepted", "result", "error")  # error: an operation failed (raised)


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


class ConsoleAudit(AuditLog):
    """The device's audit log (agent.device), also printing each refusal and veto on the console
    (`cidboot: audit: ...`) and as a fleet event, so a device's refusals are visible in the boot
    log without fetching the log."""

    def __init__(self, key: PrivateKey, store: BlockSink, console: TextIO | None) -> None:
        super().__init__(key, store)
        self.console = console

    def record(self, decision: str, reason: str, *, operation: str | None = None,
               inputs: list[CID] | None = None) -> Entry:
        entry = super().record(decision, reason, operation=operation, inputs=inputs)
        if decision in ("refused", "veto", "error"):
            from cidboot.stage import events  # the device's: already imported by agent.device
            from cidboot.stage.console import say

            say(f"cidboot: audit: {decision}: {reason}", self.console)
            events.emit("agent", decision, reason=reason, operation=operation, cid=inputs[0] if inputs else None, entry=entry.cid)
        return entry


class AuditLogError(VerificationError):
    """The audit log does not verify: a link, a signature, an entry's shape or its sequence."""


ENTRY_KEYS = frozenset({"seq", "decision", "operation", "inputs", "reason", "prev"})


def verify_log(head: CID, get: Callable[[CID], bytes], key: PublicKey) -> Iterator[dict[str, Any]]:
    """Walk the chain from `head` back to entry 0, yielding each entry (newest first) after
    checking its CID, shape, signature (by `key`, the agent's alias key) and sequence number.
    Raises AuditLogError naming the entry."""
    cid: CID | None = head
    expect = None
    while cid is not None:
        try:
            block = get(cid)
            cid.verify(block)
            doc = dagcbor.decode(block)
        except (CidbootError, KeyError, OSError) as e:
            raise AuditLogError(f"audit log: entry {cid}: {e}") from None
        if not isinstance(doc, dict) or set(doc) != {"entry", "sig"} or not isinstance(doc["entry"], dict) \
                or set(doc["entry"]) != ENTRY_KEYS or not isinstance(doc["sig"], bytes):
            raise AuditLogError(f"audit log: entry {cid}: not {{entry: {sorted(ENTRY_KEYS)}, sig}}")
        body = doc["entry"]
        try:
            cose.verify1_detached(doc["sig"], key, dagcbor.encode(body))
        except CidbootError as e:
            raise AuditLogError(f"audit log: entry {cid}: signature: {e}") from None
        if not isinstance(body["seq"], int) or (expect is not None and body["seq"] != expect):
            raise AuditLogError(f"audit log: entry {cid} has seq {body['seq']!r}, expected {expect}")
        if body["prev"] is not None and not isinstance(body["prev"], CID):
            raise AuditLogError(f"audit log: entry {cid}: prev must be a CID link or null")
        yield body
        expect = body["seq"] - 1
        cid = body["prev"]
    if expect not in (None, -1):
        raise AuditLogError("audit log: the chain ends before entry 0")
