"""Provenance nodes: every dataflow Input as a signed DAG-CBOR node linked to its parents.

    node = {"input": {"value": v, "definition": str, "operation": str | null,
                      "output": str | null, "flow": CID, "parents": [CID...], "producer": COSE_Key bytes},
            "sig": COSE_Sign1 (untagged, detached payload = DAG-CBOR of "input")}

The node's CID is the CID of the whole node (DAG-CBOR, sha2-256), so a parent link names
the exact signed bytes: change a value, a parent or the signature anywhere upstream and every
CID below changes. Seeds have operation = output = null and the flow as their only parent.
`decode` is strict (shape, types, DAG-CBOR canonical form); `verify_signature` checks the
node was signed by the key it names as producer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cidboot import cose, dagcbor
from cidboot.cid import CID, DAG_CBOR
from cidboot.cose import PrivateKey, PublicKey
from cidboot.cose_key import decode_public_key, encode_public_key_bytes
from cidboot.errors import FormatError, VerificationError

MAX_NODE = 1 << 20


class ProvenanceFormatError(FormatError):
    """A provenance node is malformed (the message names the field)."""


class ForgedSignature(VerificationError):
    """The node's signature does not verify with the producer key it names."""


@dataclass(frozen=True)
class InputNode:
    cid: CID
    value: Any
    definition: str
    operation: str | None
    output: str | None
    flow: CID
    parents: tuple[CID, ...]
    producer: bytes  # encoded COSE_Key
    sig: bytes
    payload: bytes  # the DAG-CBOR the signature covers

    @property
    def is_seed(self) -> bool:
        return self.operation is None

    def producer_key(self) -> PublicKey:
        return decode_public_key(self.producer)


def make_input(*, value: Any, definition: str, flow: CID, parents: Sequence[CID], key: PrivateKey,
               operation: str | None = None, output: str | None = None) -> tuple[CID, bytes]:
    """Sign and encode one node; returns (CID, block)."""
    if (operation is None) != (output is None):
        raise ProvenanceFormatError("operation and output are both set (an operation's output) or both null (a seed)")
    payload = {"value": value, "definition": definition, "operation": operation, "output": output, "flow": flow,
               "parents": list(parents), "producer": encode_public_key_bytes(key.public_key())}
    raw = dagcbor.encode(payload)
    block = dagcbor.encode({"input": payload, "sig": cose.sign1(raw, key, tagged=False, detached=True)})
    return CID.of(block, DAG_CBOR), block


def decode(block: bytes, cid: CID | None = None) -> InputNode:
    """Parse a node (not its signature: see verify_signature). With `cid`, the block must hash to it."""
    if len(block) > MAX_NODE:
        raise ProvenanceFormatError(f"provenance node: {len(block)} bytes, more than {MAX_NODE}")
    if cid is not None:
        cid.verify(block)
    try:
        doc = dagcbor.decode(block)
    except FormatError as e:
        raise ProvenanceFormatError(f"provenance node: {e}") from None
    if not isinstance(doc, Mapping) or set(doc) != {"input", "sig"}:
        raise ProvenanceFormatError("provenance node: must be a map with exactly 'input' and 'sig'")
    inp, sig = doc["input"], doc["sig"]
    if not isinstance(sig, bytes):
        raise ProvenanceFormatError("provenance node: sig must be a byte string (COSE_Sign1)")
    if not isinstance(inp, Mapping) or set(inp) != {"value", "definition", "operation", "output", "flow", "parents",
                                                    "producer"}:
        raise ProvenanceFormatError("provenance node: input must have exactly value, definition, operation, output, "
                                    "flow, parents, producer")
    if not isinstance(inp["definition"], str) or not inp["definition"]:
        raise ProvenanceFormatError("provenance node: definition must be a non-empty string")
    op, out = inp["operation"], inp["output"]
    if not ((op is None and out is None) or (isinstance(op, str) and isinstance(out, str))):
        raise ProvenanceFormatError("provenance node: operation/output must both be strings or both null")
    if not isinstance(inp["flow"], CID):
        raise ProvenanceFormatError("provenance node: flow must be a CID link")
    parents = inp["parents"]
    if not isinstance(parents, list | tuple) or not all(isinstance(p, CID) for p in parents):
        raise ProvenanceFormatError("provenance node: parents must be a list of CID links")
    if not isinstance(inp["producer"], bytes):
        raise ProvenanceFormatError("provenance node: producer must be an encoded COSE_Key")
    try:
        decode_public_key(inp["producer"])
    except FormatError as e:
        raise ProvenanceFormatError(f"provenance node: producer: {e}") from None
    return InputNode(cid or CID.of(block, DAG_CBOR), inp["value"], inp["definition"], op, out, inp["flow"],
                     tuple(parents), inp["producer"], sig, dagcbor.encode(dict(inp)))


def verify_signature(node: InputNode) -> None:
    try:
        cose.verify1(node.sig, node.producer_key(), detached_payload=node.payload)
    except FormatError as e:
        raise ForgedSignature(f"input {node.cid}: signature envelope: {e}") from None
    except VerificationError as e:
        raise ForgedSignature(f"input {node.cid}: not signed by its producer: {e}") from None
