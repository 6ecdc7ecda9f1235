"""Provenance nodes: every dataflow Input as a signed DAG-CBOR node linked to its parents.

    node = {"input": {"value": v,                  # DAG-CBOR data model values only
                      "definition": str,
                      "origin": "seed" | "OPERATION:OUTPUT",
                      "operation": str | null,     # null exactly for seeds
                      "producer": COSE_Key bytes,  # who signed (flow authority or DICE alias key)
                      "flow": CID,                 # the flow block (manifest `flow`)
                      "parents": [CID, ...]},      # the inputs it was computed from
            "sig": COSE_Sign1 (untagged, detached payload = DAG-CBOR of "input")}

A value sealed to the flow owner (cidboot.dataflow.sealing) is not in the node: `"sealed": CID`
(the sealed-value block) takes the place of `"value"`, so the signature covers the sealed block's
CID and a verifier checks the chain without reading the value (`InputNode.value` is then None
until a reader with the key or an opening fills it in).

Choice: the node's CID is the CID of the whole *signed envelope* (DAG-CBOR, sha2-256), not of
the unsigned payload, so a parent link names the exact signed bytes: change a value, a parent
or a signature anywhere upstream and every CID below changes, and one CID fetch gives a
verifier everything it needs. Seeds have origin "seed", operation null and the flow as their
only parent. `origin` repeats `operation` on purpose (DFFML's origin string; a reader needs
no second field to know where an input may feed), and decode checks the two agree.
`decode_input` is strict (shape, types, DAG-CBOR canonical form, size); `verify_signature`
checks the node was signed by the key it names as producer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cidboot.errors import FormatError, VerificationError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.trust import cose
from cidboot.trust.cose import PrivateKey, PublicKey
from cidboot.trust.cose_key import decode_public_key, encode_public_key_bytes

MAX_NODE = 1 << 20
SEED = "seed"
FIELDS = frozenset({"value", "definition", "origin", "operation", "producer", "flow", "parents"})
SEALED_FIELDS = FIELDS - {"value"} | {"sealed"}


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
    sealed: CID | None = None  # the sealed-value block, when the value is sealed (value: None unless opened)

    @property
    def is_seed(self) -> bool:
        return self.operation is None

    @property
    def origin(self) -> str:
        """DFFML's origin: "seed" or "operation:output"."""
        return SEED if self.operation is None else f"{self.operation}:{self.output}"

    def producer_key(self) -> PublicKey:
        return decode_public_key(self.producer)


def make_input(*, value: Any, definition: str, flow: CID, parents: Sequence[CID], key: PrivateKey,
               operation: str | None = None, output: str | None = None, sealed: CID | None = None) -> tuple[CID, bytes]:
    """Sign and encode one node; returns (CID, block). With `sealed` (a sealed-value block's
    CID), the node links it in place of `value` (which is then not in the node)."""
    if (operation is None) != (output is None):
        raise ProvenanceFormatError("operation and output are both set (an operation's output) or both null (a seed)")
    if operation is not None and (":" in operation or not operation or not output):
        raise ProvenanceFormatError(f"operation {operation!r} / output {output!r}: non-empty, no ':' in the operation")
    payload = {"value": value, "definition": definition, "origin": SEED if operation is None else f"{operation}:{output}",
               "operation": operation, "flow": flow, "parents": list(parents),
               "producer": encode_public_key_bytes(key.public_key())}
    if sealed is not None:
        del payload["value"]
        payload["sealed"] = sealed
    try:
        raw = dagcbor.encode(payload)
    except FormatError as e:
        raise ProvenanceFormatError(f"{definition} value {value!r:.80}: not DAG-CBOR data: {e}") from None
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
    if not isinstance(inp, Mapping):
        raise ProvenanceFormatError(f"provenance node: input must be a map, not {type(inp).__name__}")
    want = SEALED_FIELDS if "sealed" in inp else FIELDS
    if set(inp) != want:
        missing, unknown = sorted(want - set(inp)), sorted(set(inp) - want)
        raise ProvenanceFormatError(f"provenance node: input: missing {missing}, unknown {unknown}")
    if not isinstance(inp["definition"], str) or not inp["definition"]:
        raise ProvenanceFormatError("provenance node: definition must be a non-empty string")
    op, origin = inp["operation"], inp["origin"]
    if not isinstance(origin, str):
        raise ProvenanceFormatError("provenance node: origin must be a string (\"seed\" or \"operation:output\")")
    if op is None:
        if origin != SEED:
            raise ProvenanceFormatError(f"provenance node: operation is null but origin is {origin!r}, not \"seed\"")
        out = None
    elif not isinstance(op, str) or not op:
        raise ProvenanceFormatError("provenance node: operation must be a non-empty string or null")
    else:
        prefix, sep, out = origin.partition(":")
        if prefix != op or not sep or not out:
            raise ProvenanceFormatError(f"provenance node: origin {origin!r} is not \"{op}:OUTPUT\"")
    if not isinstance(inp["flow"], CID):
        raise ProvenanceFormatError("provenance node: flow must be a CID link")
    parents = inp["parents"]
    if not isinstance(parents, list | tuple) or not all(isinstance(p, CID) for p in parents):
        raise ProvenanceFormatError("provenance node: parents must be a list of CID links")
    if not isinstance(inp["producer"], bytes):
        raise ProvenanceFormatError("provenance node: producer must be an encoded COSE_Key")
    sealed = inp.get("sealed")
    if "sealed" in inp and not isinstance(sealed, CID):
        raise ProvenanceFormatError("provenance node: sealed must be a CID link (a sealed-value block)")
    try:
        decode_public_key(inp["producer"])
    except FormatError as e:
        raise ProvenanceFormatError(f"provenance node: producer: {e}") from None
    return InputNode(cid or CID.of(block, DAG_CBOR), inp.get("value"), inp["definition"], op, out, inp["flow"],
                     tuple(parents), inp["producer"], sig, dagcbor.encode(dict(inp)), sealed)


decode_input = decode  # the name the issue uses


def verify_signature(node: InputNode) -> None:
    """Raise ForgedSignature unless the node's COSE_Sign1 verifies with its own producer key."""
    try:
        cose.verify1_detached(node.sig, node.producer_key(), node.payload)
    except FormatError as e:
        raise ForgedSignature(f"input {node.cid}: signature envelope: {e}") from None
    except VerificationError as e:
        raise ForgedSignature(f"input {node.cid}: not signed by its producer: {e}") from None
