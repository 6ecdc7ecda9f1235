"""Private results: values sealed to the flow owner (docs/privacy.md, "Private results").

A flow may name an owner (flow.yaml `owner:`, carried in the signed manifest's `owner`):

    owner: {recipients: [age1...], seal: results | all}

Then the agent stores a value as a *sealed-value block* and the provenance node links it
instead of holding the value (cidboot.dataflow.provenance: `sealed` in place of `value`):

    sealed-value block = DAG-CBOR {"format": "age-v1", "sealed": <age file of DAG-CBOR(value)>}

so the node's CID and signature cover the sealed block's CID, and the sealed block's CID covers
its bytes: a third party validates the chain (links, signatures, producers, input sets) without
the owner's key and without seeing a value; only the owner's age identity opens it
(`imagebuilder show --key`, or `age -d` on the `sealed` bytes).

`seal: results` seals the values no operation of the flow consumes (the flow's results);
`seal: all` also seals seeds and intermediate outputs. An intermediate value another agent
consumes crosses the attested peer channel as the sealed block plus an *opening* (its age file
key, which opens that one file and nothing else), never stored:

    opening = DAG-CBOR {"opening": {"sealed": CID, "file_key": 16 bytes}}

The receiver checks the file key against the sealed block (age's header MAC, then the payload's
tags), so the value it computes on is exactly the one the producer signed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cidboot.errors import FormatError, VerificationError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.trust.private import sealed as age
from cidboot.trust.private.owner import SEAL_MODES, Owner, OwnerFormatError

__all__ = ["FORMAT", "MAX_SEALED", "SEAL_MODES", "Owner", "OwnerFormatError", "SealedValue", "SealedValueError",
           "SealedValueUnavailable", "decode_opening", "decode_sealed", "is_sealed_block", "make_opening", "open_value",
           "open_with_opening", "seal_value"]

FORMAT = "age-v1"
MAX_SEALED = 1 << 20  # bytes of one sealed-value block (a provenance node is bounded the same way)


class SealedValueError(FormatError):
    """A block is not a sealed-value block or an opening (the message says which part)."""


class SealedValueUnavailable(VerificationError):
    """A value is sealed and this reader has neither the owner's identity nor an opening for it."""


@dataclass(frozen=True)
class SealedValue:
    cid: CID
    data: bytes  # the age file

    @property
    def recipients(self) -> int:
        return age.recipient_count(self.data)


def seal_value(value: Any, recipients: list[bytes]) -> tuple[CID, bytes, bytes]:
    """(CID, sealed-value block, file key) for a DAG-CBOR value."""
    blob, file_key = age.seal_keyed(recipients, dagcbor.encode(value))
    block = dagcbor.encode({"format": FORMAT, "sealed": blob})
    return CID.of(block, DAG_CBOR), block, file_key


def is_sealed_block(doc: Any) -> bool:
    return isinstance(doc, Mapping) and set(doc) == {"format", "sealed"}


def decode_sealed(block: bytes, cid: CID | None = None) -> SealedValue:
    """Parse a sealed-value block (its age header too: a damaged header is refused here, without
    a key). With `cid`, the block must hash to it (a tampered blob fails by its CID)."""
    if len(block) > MAX_SEALED:
        raise SealedValueError(f"sealed value: {len(block)} bytes, more than {MAX_SEALED}")
    if cid is not None:
        cid.verify(block)
    try:
        doc = dagcbor.decode(block)
    except FormatError as e:
        raise SealedValueError(f"sealed value: {e}") from None
    if not is_sealed_block(doc) or doc["format"] != FORMAT or not isinstance(doc["sealed"], bytes):
        raise SealedValueError(f"sealed value: must be {{format: {FORMAT!r}, sealed: bytes}}")
    sv = SealedValue(cid or CID.of(block, DAG_CBOR), doc["sealed"])
    if sv.recipients < 1:
        raise SealedValueError("sealed value: no X25519 recipient in its age header")
    return sv


def _value(plaintext: bytes, cid: CID) -> Any:
    try:
        return dagcbor.decode(plaintext)
    except FormatError as e:
        raise SealedValueError(f"sealed value {cid}: the plaintext is not DAG-CBOR: {e}") from None


def open_value(block: bytes, identities: list[age.Identity], cid: CID | None = None) -> Any:
    """The value, for the owner (raises age.NoMatchingIdentity for a wrong key)."""
    sv = decode_sealed(block, cid)
    return _value(age.open_sealed(identities, sv.data), sv.cid)


def open_with_opening(block: bytes, file_key: bytes, cid: CID | None = None) -> Any:
    """The value, for a peer given the file key (raises age.HeaderMacError for another file's key)."""
    sv = decode_sealed(block, cid)
    return _value(age.open_with_file_key(file_key, sv.data), sv.cid)


def make_opening(sealed: CID, file_key: bytes) -> tuple[CID, bytes]:
    block = dagcbor.encode({"opening": {"sealed": sealed, "file_key": file_key}})
    return CID.of(block, DAG_CBOR), block


def decode_opening(block: bytes, cid: CID | None = None) -> tuple[CID, bytes] | None:
    """(sealed CID, file key) when the block is an opening; None when it is not one (another
    kind of block); SealedValueError when it claims to be one but is malformed."""
    if len(block) > 256:
        return None
    try:
        doc = dagcbor.decode(block)
    except FormatError:
        return None
    if not isinstance(doc, Mapping) or set(doc) != {"opening"}:
        return None
    if cid is not None:
        cid.verify(block)
    o = doc["opening"]
    if not isinstance(o, Mapping) or set(o) != {"sealed", "file_key"} or not isinstance(o["sealed"], CID) \
            or not isinstance(o["file_key"], bytes) or len(o["file_key"]) != 16:
        raise SealedValueError("opening: must be {opening: {sealed: CID, file_key: 16 bytes}}")
    return o["sealed"], o["file_key"]
