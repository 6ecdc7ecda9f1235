"""The embedded block store: flatfs layout, atomic writes, verify on read, pins and gc."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cidboot.ipld.cid import CID, DAG_CBOR, RAW, CIDMismatch
from cidboot.ipld.dagcbor import encode
from cidboot.ipld.unixfs import import_bytes
from cidboot.store.blockstore import SHARDING, BlockNotFound, Blockstore, BlockstoreError, default_store_path


def test_layout_matches_kubo_flatfs(tmp_path: Path) -> None:
    s = Blockstore(tmp_path)
    cid = s.put_block(b"hello", RAW)
    # Kubo's key for a sha2-256 block is base32 of the multihash ("CIQ..."), sharded by the
    # next-to-last two characters.
    files = list((tmp_path / "blocks").rglob("*.data"))
    assert len(files) == 1
    key = files[0].stem
    assert key.startswith("CIQ") and files[0].parent.name == key[-3:-1]
    assert (tmp_path / "blocks" / "SHARDING").read_text().strip() == SHARDING
    assert s.get(cid) == b"hello"


def test_v0_and_v1_share_a_block(tmp_path: Path) -> None:
    s = Blockstore(tmp_path)
    r = import_bytes(b"x" * 10, s)
    assert r.cid.version == 0
    assert s.get(r.cid.to_v1()) == s.get(r.cid)


def test_put_refuses_wrong_bytes(tmp_path: Path) -> None:
    s = Blockstore(tmp_path)
    with pytest.raises(CIDMismatch):
        s.put(CID.of(b"a", RAW), b"b")
    assert not s.has(CID.of(b"a", RAW))


def test_corruption_detected_on_read(tmp_path: Path) -> None:
    s = Blockstore(tmp_path)
    cid = s.put_block(b"precious", RAW)
    (f,) = (tmp_path / "blocks").rglob("*.data")
    f.write_bytes(b"tampered")
    with pytest.raises(CIDMismatch, match=str(cid)):
        s.get(cid)


def test_missing_block(tmp_path: Path) -> None:
    with pytest.raises(BlockNotFound, match="not in the store"):
        Blockstore(tmp_path).get(CID.of(b"nope", RAW))


def test_no_temp_files_left(tmp_path: Path) -> None:
    s = Blockstore(tmp_path)
    for i in range(20):
        s.put_block(bytes([i]) * 100, RAW)
    assert not list(tmp_path.rglob(".tmp-*"))


def test_pins_and_gc(tmp_path: Path) -> None:
    s = Blockstore(tmp_path)
    kept = import_bytes(random.Random(5).randbytes(1_000_000), s)  # multi-block file, no repeated chunks
    node = s.put_block(encode({"file": kept.cid}), DAG_CBOR)
    junk = s.put_block(b"junk", RAW)
    s.pin(node)
    assert s.pins() == [node]
    assert s.gc() == 1
    assert not s.has(junk) and s.has(kept.cid) and s.has(node)
    s.unpin(node)
    assert s.gc() == kept.blocks + 1
    assert list(s.multihashes()) == []


def test_pin_requires_whole_dag(tmp_path: Path) -> None:
    s = Blockstore(tmp_path)
    node = s.put_block(encode({"missing": CID.of(b"elsewhere", RAW)}), DAG_CBOR)
    with pytest.raises(BlockNotFound):
        s.pin(node)
    assert s.pins() == []


def test_foreign_sharding_refused(tmp_path: Path) -> None:
    (tmp_path / "blocks").mkdir()
    (tmp_path / "blocks" / "SHARDING").write_text("/repo/flatfs/shard/v1/prefix/2\n")
    with pytest.raises(BlockstoreError, match="unsupported sharding"):
        Blockstore(tmp_path)


def test_default_store_path_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CIDBOOT_STORE", str(tmp_path / "s"))
    assert default_store_path() == tmp_path / "s"
    monkeypatch.delenv("CIDBOOT_STORE")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_store_path() == tmp_path / "xdg" / "cidboot" / "store"


def test_batch_writer_verifies_before_queueing_and_writes_atomically(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "s")
    good = [bytes([i]) * 1000 for i in range(40)]
    cids = [CID.of(d, RAW) for d in good]
    with store.writer(depth=2) as w:
        for c, d in zip(cids, good, strict=True):
            w.put(c, d)
        with pytest.raises(CIDMismatch):
            w.put(cids[0], b"not it")
    assert [store.get(c) for c in cids] == good
    assert not list((tmp_path / "s" / "blocks").rglob(".tmp-*"))


def test_batch_writer_keeps_no_reference_to_a_reused_buffer(tmp_path: Path) -> None:
    """The fetch client reads every block into one buffer and puts a view of it: once put
    returns, the block is stored (flatfs file or pack) and the buffer may be overwritten."""
    store = Blockstore(tmp_path / "s")
    blocks = [bytes([i]) * 5000 for i in range(40)]  # past FLATFS_FIRST: into a pack too
    cids = [CID.of(d, RAW) for d in blocks]
    buf = bytearray(5000)
    with store.writer() as w:
        for c, d in zip(cids, blocks, strict=True):
            buf[:] = d
            w.put(c, memoryview(buf))
            buf[:] = b"\xff" * 5000  # the next block's bytes arrive in the same buffer
        assert [store.get(c) for c in cids] == blocks  # read your writes
    assert [Blockstore(store.path).get(c) for c in cids] == blocks


def test_batch_writer_lends_buffers_and_reuses_them_only_once_written(tmp_path: Path) -> None:
    """The fetch client reads each block into a buffer the writer lends (`buffer`): put queues
    a view of it without a copy, and the writer hands it out again only after writing it, so
    every block lands intact while at most `depth` + a few buffers ever exist."""
    store = Blockstore(tmp_path / "s")
    blocks = [random.Random(i).randbytes(5000) for i in range(200)]
    cids = [CID.of(d, RAW) for d in blocks]
    seen: set[int] = set()
    with store.writer(depth=4) as w:
        for c, d in zip(cids, blocks, strict=True):
            buf = w.buffer(len(d))
            seen.add(id(buf))
            buf[: len(d)] = d
            w.put(c, memoryview(buf)[: len(d)])
            assert store.get(c) == d  # queued or written: readable at once
    assert [Blockstore(store.path).get(c) for c in cids] == blocks
    assert len(seen) <= 4 + 4


def test_batch_writer_raises_a_write_error(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "s")
    data = b"x" * 100
    cid = CID.of(data, RAW)
    store._file(cid).parent.mkdir(parents=True)
    store._file(cid).mkdir()  # a directory where the block file should go: the rename fails
    with pytest.raises(OSError), store.writer() as w:
        w.put(cid, data)


def test_memory_store_verifies_on_put() -> None:
    from cidboot.store.blockstore import MemoryBlockstore

    mem = MemoryBlockstore()
    cid = mem.put_block(b"hello")
    assert mem.get(cid) == b"hello" and mem.has(cid) and mem.size(cid) == 5
    with pytest.raises(CIDMismatch):
        mem.put(CID.of(b"other", RAW), b"hello")
    mem.clear()
    with pytest.raises(BlockNotFound):
        mem.get(cid)


@pytest.mark.parametrize("kind", ["files", "files, batched", "memory"])
def test_put_block_is_the_same_on_every_store(tmp_path: Path, kind: str) -> None:
    """One put_block for both stores (and a batch writer's): the CID asked for (codec, version),
    the bytes back, the size bound before anything is stored."""
    from contextlib import nullcontext

    from cidboot.store.blockstore import MAX_BLOCK, MemoryBlockstore

    store: Blockstore | MemoryBlockstore = MemoryBlockstore() if kind == "memory" else Blockstore(tmp_path / "s")
    with store.writer() if "batched" in kind else nullcontext():
        raw = store.put_block(b"raw bytes")
        node = store.put_block(encode({"a": 1}), DAG_CBOR)
        assert raw == CID.of(b"raw bytes", RAW) and raw.version == 1
        assert node == CID.of(encode({"a": 1}), DAG_CBOR) and node.codec == DAG_CBOR
        assert store.get(raw) == b"raw bytes" and store.get(node) == encode({"a": 1})
        with pytest.raises(BlockstoreError, match="limit"):
            store.put_block(b"\0" * (MAX_BLOCK + 1))
    assert store.get(raw) == b"raw bytes"  # after the batch: on disk
