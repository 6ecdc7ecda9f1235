"""CARv1 (Content Addressable aRchive): streaming read and write.

A CAR is a DAG-CBOR header `{version: 1, roots: [CID...]}` followed by varint-framed
`(CID, block)` sections. The reader verifies every block against its CID before handing it
out, so a CAR from anywhere can be imported without trusting its source.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol

from cidboot.errors import FormatError
from cidboot.ipld import dagcbor, varint
from cidboot.ipld.cid import CID, CIDError

MAX_HEADER = 1024 * 1024
DEFAULT_MAX_BLOCK = 4 * 1024 * 1024
CARV2_PRAGMA = bytes.fromhex("0aa16776657273696f6e02")
#: bytes `CarReader.views` reads first of each section: the longest CID it can meet (an identity
#: multihash of 128 bytes with its varints) and, for a block, its first bytes
SECTION_HEAD = 160


class Readable(Protocol):
    """What CarReader reads from besides a file: an HTTP response body (the fetch client's)."""

    def read(self, n: int, /) -> bytes: ...

    def readinto(self, b: bytearray | memoryview, /) -> int: ...


class CarError(FormatError):
    """A CAR stream is malformed (the message names the section and byte offset)."""


class CarWriter:
    def __init__(self, stream: BinaryIO, roots: list[CID]) -> None:
        self.stream = stream
        header = dagcbor.encode({"roots": list(roots), "version": 1})
        stream.write(varint.encode(len(header)) + header)
        self.bytes_written = len(varint.encode(len(header))) + len(header)
        self.blocks = 0

    def write(self, cid: CID, data: bytes) -> None:
        raw = bytes(cid)
        head = varint.encode(len(raw) + len(data))
        self.stream.write(head + raw)
        self.stream.write(data)
        self.bytes_written += len(head) + len(raw) + len(data)
        self.blocks += 1

    # lets a CarWriter be a BlockSink for the UnixFS importer
    put = write


def encode_header(roots: list[CID]) -> bytes:
    header = dagcbor.encode({"roots": list(roots), "version": 1})
    return varint.encode(len(header)) + header


def encode_section(cid: CID, data: bytes) -> bytes:
    return section_head(cid, len(data)) + data


def section_head(cid: CID, size: int) -> bytes:
    """A section's bytes before its block of `size` bytes (length varint, CID): a streaming
    writer sends this and the block as they are, without joining them (a copy of the block)."""
    raw = bytes(cid)
    return varint.encode(len(raw) + size) + raw


class CarReader:
    """Iterate `(cid, block)` over a CARv1 stream (a CARv2 is unwrapped to its inner CARv1)."""

    def __init__(self, stream: BinaryIO | Readable, *, verify: bool = True,
                 max_block_size: int = DEFAULT_MAX_BLOCK) -> None:
        self.stream, self.verify, self.max_block_size = stream, verify, max_block_size
        self.offset = 0
        self._remaining: int | None = None
        self.roots = self._read_header()

    def _read(self, n: int, what: str) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise CarError(f"truncated {what} at byte {self.offset}: wanted {n} bytes, got {len(data)}")
        self.offset += n
        return data

    def _varint(self, what: str) -> int | None:
        raw = bytearray()
        while True:
            if self._remaining is not None and self.offset >= self._remaining:
                if raw:
                    raise CarError(f"truncated {what} varint at byte {self.offset}")
                return None
            c = self.stream.read(1)
            if not c:
                if raw:
                    raise CarError(f"truncated {what} varint at byte {self.offset}")
                return None
            self.offset += 1
            raw += c
            if not c[0] & 0x80:
                try:
                    return varint.decode(raw)[0]
                except FormatError as e:
                    raise CarError(f"bad {what} varint at byte {self.offset - len(raw)}: {e}") from None
            if len(raw) >= varint.MAX_BYTES:
                raise CarError(f"{what} varint too long at byte {self.offset - len(raw)}")

    def _read_header(self) -> list[CID]:
        n = self._varint("header length")
        if n is None:
            raise CarError("empty CAR: no header")
        if n == 0 or n > MAX_HEADER:
            raise CarError(f"CAR header length {n} out of range 1..{MAX_HEADER}")
        raw = self._read(n, "header")
        if varint.encode(n) + raw == CARV2_PRAGMA:
            return self._unwrap_v2()
        try:
            header = dagcbor.decode(raw)
        except FormatError as e:
            raise CarError(f"CAR header is not DAG-CBOR: {e}") from None
        if not isinstance(header, dict) or set(header) != {"roots", "version"}:
            raise CarError(f"CAR header must be a map of exactly roots and version, got {header!r:.80}")
        if header["version"] != 1:
            raise CarError(f"unsupported CAR version {header['version']!r}")
        roots = header["roots"]
        if not isinstance(roots, list) or not roots or not all(isinstance(r, CID) for r in roots):
            raise CarError("CAR header roots must be a non-empty list of CIDs")
        return roots

    def _unwrap_v2(self) -> list[CID]:
        hdr = self._read(40, "CARv2 header")
        data_offset = int.from_bytes(hdr[16:24], "little")
        data_size = int.from_bytes(hdr[24:32], "little")
        skip = data_offset - self.offset
        if skip < 0:
            raise CarError(f"CARv2 data offset {data_offset} points inside the header")
        self._read(skip, "CARv2 padding")
        base = self.offset
        roots = self._read_header()
        self._remaining = base + data_size
        return roots

    def _section_length(self, start: int) -> int | None:
        """The next section's length (None at the end of the CAR), bounded by max_block_size."""
        n = self._varint("section length")
        if n is not None and (n == 0 or n > self.max_block_size + 128):
            raise CarError(f"section at byte {start}: length {n} out of range")
        return n

    def __iter__(self) -> Iterator[tuple[CID, bytes]]:
        while True:
            start = self.offset
            n = self._section_length(start)
            if n is None:
                return
            section = self._read(n, f"section at byte {start}")
            try:
                cid, off = CID.read(section)
            except CIDError as e:
                raise CarError(f"section at byte {start}: bad CID: {e}") from None
            data = section[off:]
            if self.verify:
                cid.verify(data)
            yield cid, data

    def views(self, take: Callable[[int], bytearray] | None = None) -> Iterator[tuple[CID, memoryview]]:
        """Iterate like `iter(reader)`, but each block is a memoryview into a buffer instead of
        a bytes object of its own. Without `take`: one buffer the reader reuses (replaced by a
        larger one when a block needs it), so a view is valid only until the next step. With
        `take(size)`: a buffer of at least `size` bytes from the caller for each block (the
        fetch client's come from the store's batch writer, which reuses them once written).
        Read with the stream's `readinto` (an HTTP response de-chunks into it), so a block's
        bytes are copied once, from the socket into the buffer. The section's length varint, its
        CID and the block's first bytes come in one small read (`SECTION_HEAD` plus a varint's
        worth; those block bytes are copied to the buffer's start); a read that took the start
        of the next section (a section shorter than that) keeps it for the next step, and none
        reads past a CARv2's inner CARv1."""
        readinto = self.stream.readinto  # type: ignore[union-attr]  # BinaryIO lacks it; files and HTTP responses have it
        read = self.stream.read
        buf = memoryview(bytearray(0))
        carry = b""  # bytes read past the end of the last section (one shorter than a section head)
        while True:
            start = self.offset
            # One read for the section's length varint, its CID and its block's first bytes
            # (never past the data of a CARv2): the three came in four reads, each through
            # the HTTP body's de-chunking.
            want = SECTION_HEAD + varint.MAX_BYTES
            if self._remaining is not None:
                want = min(want, self._remaining - start)
            head = carry + read(want - len(carry)) if len(carry) < want else carry
            carry = b""
            if not head:
                return
            try:
                n, vlen = varint.decode(head)
            except FormatError as e:
                what = "truncated" if len(head) < want and len(head) < varint.MAX_BYTES else "bad"
                raise CarError(f"{what} section length varint at byte {start}: {e}") from None
            if n == 0 or n > self.max_block_size + 128:
                raise CarError(f"section at byte {start}: length {n} out of range")
            if len(head) - vlen > n:  # the next section starts in what was read
                carry = head[vlen + n:]
                head = head[: vlen + n]
            if len(head) - vlen < min(n, SECTION_HEAD):
                raise CarError(f"truncated section at byte {start}: wanted {n} bytes, got {len(head) - vlen}")
            try:
                cid, off = CID.read(head, vlen)
            except CIDError as e:
                raise CarError(f"section at byte {start}: bad CID: {e}") from None
            size = n + vlen - off
            if take is not None:
                buf = memoryview(take(size))
            elif len(buf) < size:  # a new buffer, not a resize: a view the consumer kept stays valid
                buf = memoryview(bytearray(max(size, 2 * len(buf))))
            got = len(head) - off
            buf[:got] = head[off:]
            while got < size:
                r = readinto(buf[got:size])
                if not r:
                    raise CarError(f"truncated section at byte {start}: wanted {n} bytes, got {got + off - vlen}")
                got += r
            self.offset = start + vlen + n
            block = buf[:size]
            if self.verify:
                cid.verify(block)
            yield cid, block
