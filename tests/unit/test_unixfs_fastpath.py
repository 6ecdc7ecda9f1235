"""The importer's fast path (one reused read buffer, leaves hashed as head + chunk + tail
without assembling the block) gives exactly the blocks the generic dag-pb/UnixFS encoders
give, whatever the stream does."""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cidboot.ipld import dagpb
from cidboot.ipld.cid import CID, DAG_PB, RAW
from cidboot.ipld.unixfs import ImportOptions, import_bytes, import_file
from cidboot.ipld.unixfs.data import FILE, UnixFSData, UnixFSError, file_leaf_frame


class DictSink:
    def __init__(self) -> None:
        self.blocks: dict[CID, bytes] = {}

    def put(self, cid: CID, data: bytes) -> None:
        assert isinstance(data, bytes)  # never a view of the reader's buffer
        self.blocks[cid] = data


def _generic_leaf(chunk: bytes) -> bytes:
    return dagpb.encode(dagpb.PBNode([], UnixFSData(FILE, chunk or None, len(chunk)).encode()))


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16_383, 16_384, 262_143, 262_144, 1 << 20])
def test_leaf_frame_wraps_a_chunk_as_the_generic_encoder_does(n: int) -> None:
    chunk = random.Random(n).randbytes(n)
    head, tail = file_leaf_frame(n)
    assert head + chunk + tail == _generic_leaf(chunk)


def _reference_cid(data: bytes, opts: ImportOptions) -> CID:
    """The root CID through the generic encoders only (the pre-fast-path importer, in short)."""
    def leaf(chunk: bytes) -> tuple[CID, int, int]:
        if opts.use_raw_leaves:
            return CID.of(chunk, RAW, 1), len(chunk), len(chunk)
        block = _generic_leaf(chunk)
        return CID.of(block, DAG_PB, opts.cid_version), len(chunk), len(block)

    def parent(kids: list[tuple[CID, int, int]]) -> tuple[CID, int, int]:
        total = sum(k[1] for k in kids)
        data = UnixFSData(FILE, None, total, [k[1] for k in kids]).encode()
        block = dagpb.encode(dagpb.PBNode([dagpb.PBLink(k[0], "", k[2]) for k in kids], data))
        return CID.of(block, DAG_PB, opts.cid_version), total, len(block) + sum(k[2] for k in kids)

    cs = opts.chunk_size
    level = [leaf(data[i : i + cs]) for i in range(0, len(data), cs)] or [leaf(b"")]
    # bottom-up groups of 4: the balanced layout fills left to right with all leaves at one depth
    while len(level) > 1:
        level = [parent(level[i : i + 4]) for i in range(0, len(level), 4)]
    return level[0][0]


class ShortReads(io.RawIOBase):
    """A stream that hands out at most `step` bytes per call, as pipes and sockets do."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.pos, self.step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.step, len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


class ReadOnly:
    """A stream with read() only (no readinto): the fallback copies into the buffer."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.pos, self.step = data, 0, step

    def read(self, n: int = -1) -> bytes:
        n = min(n, self.step)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 16 * 100 + 3), step=st.integers(1, 300), profile=st.sampled_from(["v0", "v1", "v0raw"]),
       kind=st.sampled_from(["bytes", "short", "readonly"]))
def test_fast_path_matches_generic_encoders_for_any_stream(size: int, step: int, profile: str, kind: str) -> None:
    import cidboot.ipld.unixfs.importer as imp

    opts = {"v0": ImportOptions(chunk_size=100), "v1": ImportOptions(cid_version=1, chunk_size=100),
            "v0raw": ImportOptions(chunk_size=100, raw_leaves=True)}[profile]
    data = random.Random(size * 7 + step).randbytes(size)
    src = {"bytes": io.BytesIO(data), "short": ShortReads(data, step), "readonly": ReadOnly(data, step)}[kind]
    old = imp.MAX_LINKS
    imp.MAX_LINKS = 4  # small fan-out: multi-level trees from a few hundred bytes
    try:
        sink = DictSink()
        r = import_file(src, sink, opts)  # type: ignore[arg-type]
        assert r.cid == _reference_cid(data, opts)
    finally:
        imp.MAX_LINKS = old
    assert r.size == size
    for cid, block in sink.blocks.items():
        cid.verify(block)  # what the sink got is what the CID names, not a reused buffer
    assert r.cid in sink.blocks


def test_sink_blocks_are_copies_not_views_of_the_read_buffer() -> None:
    data = bytes(range(256)) * 40
    sink = DictSink()
    r = import_bytes(data, sink, ImportOptions(cid_version=1, chunk_size=1000))
    assert r.blocks == len(sink.blocks) == 11 + 1
    for cid, block in sink.blocks.items():
        cid.verify(block)


class NonBlocking(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> None:  # type: ignore[override]
        return None


def test_non_blocking_stream_with_nothing_ready_is_refused_not_read_as_eof() -> None:
    with pytest.raises(UnixFSError, match="non-blocking"):
        import_file(NonBlocking(), None)  # type: ignore[arg-type]


def test_stream_returning_more_than_asked_is_refused() -> None:
    class Liar:
        def read(self, n: int = -1) -> bytes:
            return b"x" * (n + 1)

    with pytest.raises(UnixFSError, match="were asked for"):
        import_file(Liar(), None, ImportOptions(chunk_size=10))  # type: ignore[arg-type]
