"""The UnixFS `Data` protobuf message carried in a dag-pb node's Data field."""

from __future__ import annotations

from cidboot.errors import FormatError
from cidboot.ipld import dagpb, varint
from cidboot.ipld import protobuf as pb

RAW, DIRECTORY, FILE, METADATA, SYMLINK, HAMT_SHARD = 0, 1, 2, 3, 4, 5
TYPE_NAMES = {RAW: "raw", DIRECTORY: "directory", FILE: "file", METADATA: "metadata",
              SYMLINK: "symlink", HAMT_SHARD: "hamt-shard"}


class UnixFSError(FormatError):
    """A dag-pb node's Data is not a valid UnixFS message, or the DAG is not a valid UnixFS shape."""


def file_leaf_frame(n: int) -> tuple[bytes, bytes]:
    """(head, tail) such that head + chunk + tail is the dag-pb leaf Kubo makes for an
    `n`-byte chunk without raw leaves: PBNode{Data: UnixFS{Type: File, Data: chunk, filesize: n}}.

    The chunk itself is never copied into a block: the importer hashes head, chunk and tail
    in turn. An empty chunk has no Data field, as in Kubo (and `UnixFSData(FILE, None, 0)`).
    """
    inner_head = pb.field_varint(1, FILE) + (pb.key(2, pb.LEN) + varint.encode(n) if n else b"")
    tail = pb.field_varint(3, n)
    return dagpb.data_only_head(len(inner_head) + n + len(tail)) + inner_head, tail


class UnixFSData:
    """The UnixFS Data message inside a dag-pb node (type, inline data, sizes, HAMT fields, mode).
    Field equality; written out rather than a slotted dataclass (built twice, with its methods
    generated from source at import: ~2-3 M guest instructions in each stage with a block store)."""

    __slots__ = ("type", "data", "filesize", "blocksizes", "hash_type", "fanout", "mode")

    def __init__(self, type: int, data: bytes | None = None, filesize: int | None = None,
                 blocksizes: list[int] | None = None, hash_type: int | None = None, fanout: int | None = None,
                 mode: int | None = None) -> None:
        self.type = type
        self.data = data
        self.filesize = filesize
        self.blocksizes: list[int] = [] if blocksizes is None else blocksizes
        self.hash_type = hash_type
        self.fanout = fanout
        self.mode = mode

    def _key(self) -> tuple[object, ...]:
        return self.type, self.data, self.filesize, self.blocksizes, self.hash_type, self.fanout, self.mode

    def __eq__(self, other: object) -> bool:
        return type(other) is UnixFSData and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass was

    def __repr__(self) -> str:
        return ("UnixFSData(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")")

    def encode(self) -> bytes:
        out = pb.field_varint(1, self.type)
        if self.data is not None:
            out += pb.field_bytes(2, self.data)
        if self.filesize is not None:
            out += pb.field_varint(3, self.filesize)
        for bs in self.blocksizes:
            out += pb.field_varint(4, bs)
        if self.hash_type is not None:
            out += pb.field_varint(5, self.hash_type)
        if self.fanout is not None:
            out += pb.field_varint(6, self.fanout)
        if self.mode is not None:
            out += pb.field_varint(7, self.mode)
        return out

    @classmethod
    def decode(cls, raw: bytes | None) -> UnixFSData:
        if raw is None:
            raise UnixFSError("dag-pb node has no Data, so it is not a UnixFS node")
        out = cls(type=-1)
        for fno, wt, val in pb.iter_fields(raw, UnixFSError, "UnixFS Data"):
            if fno == 1 and wt == pb.VARINT:
                out.type = int(val)
            elif fno == 2 and wt == pb.LEN:
                out.data = bytes(val)
            elif fno == 3 and wt == pb.VARINT:
                out.filesize = int(val)
            elif fno == 4 and wt == pb.VARINT:
                out.blocksizes.append(int(val))
            elif fno == 4 and wt == pb.LEN:  # packed encoding, accepted on read
                buf, pos = bytes(val), 0
                while pos < len(buf):
                    v, pos = varint.decode(buf, pos)
                    out.blocksizes.append(v)
            elif fno == 5 and wt == pb.VARINT:
                out.hash_type = int(val)
            elif fno == 6 and wt == pb.VARINT:
                out.fanout = int(val)
            elif fno == 7 and wt == pb.VARINT:
                out.mode = int(val)
            elif fno == 8 and wt == pb.LEN:
                pass  # mtime: read and ignored (we never write it: builds are reproducible)
            else:
                raise UnixFSError(f"UnixFS Data: unexpected field {fno} (wire type {wt})")
        if out.type not in TYPE_NAMES:
            raise UnixFSError(f"UnixFS Data: missing or unknown Type {out.type}")
        return out
