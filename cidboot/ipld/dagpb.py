"""The dag-pb codec (IPLD spec), strict: what UnixFS nodes are made of.

Encoding follows the spec's canonical form (Links before Data, fields in order) so our
blocks hash exactly like Kubo's; decoding rejects unknown fields, repeated Data, wrong wire
types and trailing garbage instead of skipping them.
"""

from __future__ import annotations

from cidboot.errors import FormatError
from cidboot.ipld import protobuf as pb
from cidboot.ipld import varint
from cidboot.ipld.cid import CID, CIDError

MAX_BLOCK = 4 * 1024 * 1024


class DagPbError(FormatError):
    """A block is not valid dag-pb."""


class PBLink:
    """A dag-pb link: the target CID, its name and cumulative size (both optional on the wire).
    A value (field equality and hash, never changed), written out rather than a frozen slotted
    dataclass: that one is built twice and generates six methods at import (~3 M guest
    instructions in each stage importing the block store), and its __init__ goes through
    object.__setattr__ for every field of every link decoded."""

    __slots__ = ("cid", "name", "tsize")

    def __init__(self, cid: CID, name: str | None = None, tsize: int | None = None) -> None:
        self.cid = cid
        self.name = name
        self.tsize = tsize

    def __eq__(self, other: object) -> bool:
        return type(other) is PBLink and self.cid == other.cid and self.name == other.name and self.tsize == other.tsize

    def __hash__(self) -> int:
        return hash((self.cid, self.name, self.tsize))

    def __repr__(self) -> str:
        return f"PBLink(cid={self.cid!r}, name={self.name!r}, tsize={self.tsize!r})"

    def encode(self) -> bytes:
        out = pb.field_bytes(1, bytes(self.cid))
        if self.name is not None:
            out += pb.field_bytes(2, self.name.encode("utf-8"))
        if self.tsize is not None:
            out += pb.field_varint(3, self.tsize)
        return out


class PBNode:
    """A dag-pb node: its links, in encoded order, and its opaque data (field equality; written
    out for the same reason as PBLink)."""

    __slots__ = ("links", "data")

    def __init__(self, links: list[PBLink] | None = None, data: bytes | None = None) -> None:
        self.links: list[PBLink] = [] if links is None else links
        self.data = data

    def __eq__(self, other: object) -> bool:
        return type(other) is PBNode and self.links == other.links and self.data == other.data

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass was

    def __repr__(self) -> str:
        return f"PBNode(links={self.links!r}, data={self.data!r})"


def encode(node: PBNode) -> bytes:
    out = bytearray()
    for link in node.links:
        out += pb.field_bytes(2, link.encode())
    if node.data is not None:
        out += pb.field_bytes(1, node.data)
    return bytes(out)


def data_only_head(data_len: int) -> bytes:
    """The bytes before Data in a link-less node whose Data is `data_len` bytes long.

    `encode(PBNode([], data)) == data_only_head(len(data)) + data`: an importer can hash a
    leaf as head + data without assembling the block.
    """
    return pb.key(1, pb.LEN) + varint.encode(data_len)


def _decode_link(raw: bytes, index: int) -> PBLink:
    what = f"dag-pb link {index}"
    cid: CID | None = None
    name: str | None = None
    tsize: int | None = None
    last = 0
    for fno, wt, val in pb.iter_fields(raw, DagPbError, what):
        if fno <= last:
            raise DagPbError(f"{what}: field {fno} out of order or repeated")
        last = fno
        if fno == 1 and wt == pb.LEN:
            try:
                cid = CID.decode(bytes(val))
            except CIDError as e:
                raise DagPbError(f"{what}: bad Hash: {e}") from None
        elif fno == 2 and wt == pb.LEN:
            try:
                name = bytes(val).decode("utf-8")
            except UnicodeDecodeError:
                raise DagPbError(f"{what}: Name is not valid UTF-8") from None
        elif fno == 3 and wt == pb.VARINT:
            tsize = int(val)
        else:
            raise DagPbError(f"{what}: unexpected field {fno} (wire type {wt})")
    if cid is None:
        raise DagPbError(f"{what}: missing Hash")
    return PBLink(cid, name, tsize)


def decode(block: bytes) -> PBNode:
    if len(block) > MAX_BLOCK:
        raise DagPbError(f"dag-pb block of {len(block)} bytes exceeds {MAX_BLOCK}")
    node = PBNode()
    seen_data = False
    for fno, wt, val in pb.iter_fields(bytes(block), DagPbError, "dag-pb node"):
        if fno == 2 and wt == pb.LEN:
            if seen_data:
                raise DagPbError("dag-pb node: Links after Data (not canonical)")
            node.links.append(_decode_link(bytes(val), len(node.links)))
        elif fno == 1 and wt == pb.LEN:
            if seen_data:
                raise DagPbError("dag-pb node: Data appears twice")
            seen_data = True
            node.data = bytes(val)
        else:
            raise DagPbError(f"dag-pb node: unexpected field {fno} (wire type {wt})")
    return node
