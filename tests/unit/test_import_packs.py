"""A UnixFS import into a disk store writes as a fetch does (the store's batch writer): a file of
more than FLATFS_FIRST blocks lands in one pack file, a small one in flatfs files; the same
CIDs as a hash-only import; read back verified, after reopening the store too; gc and pins
cover the pack; a damaged pack block is refused on read (and repaired by importing again);
a block the store holds, or the file repeats, is written once; durable when the import returns.
The imagebuilder paths that store imports (`build`'s blocks, `car import`) batch the same way."""

from __future__ import annotations

import argparse
import io
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from cidboot.ipld import dag
from cidboot.ipld.car import CarWriter
from cidboot.ipld.cid import CID, CIDMismatch
from cidboot.ipld.unixfs import ImportOptions, export_file, import_bytes, import_file, import_path
from cidboot.store.blockstore import BlockNotFound, Blockstore, MemoryBlockstore
from cidboot.store.packs import FLATFS_FIRST
from tests.support.sync_log import SyncLog

CHUNK = 20_000
OPTS = ImportOptions(cid_version=1, chunk_size=CHUNK)
#: 40 leaves + 1 root: past FLATFS_FIRST, into a pack
LARGE = random.Random(7).randbytes(40 * CHUNK)
#: 15 leaves + 1 root: exactly FLATFS_FIRST blocks, flatfs files
SMALL = random.Random(8).randbytes(15 * CHUNK)


def flatfs(store: Blockstore) -> list[Path]:
    return sorted((store.path / "blocks").rglob("*.data"))


def packs(store: Blockstore) -> list[Path]:
    return sorted((store.path / "packs").glob("*.pack"))


@pytest.mark.parametrize("source", ["path", "file", "bytes"])
def test_a_large_import_lands_in_one_pack(tmp_path: Path, source: str) -> None:
    f = tmp_path / "large"
    f.write_bytes(LARGE)
    store = Blockstore(tmp_path / "store")
    if source == "path":
        res = import_file(f, store, OPTS)
    elif source == "file":
        with open(f, "rb") as fh:
            res = import_file(fh, store, OPTS)
    else:
        res = import_bytes(LARGE, store, OPTS)
    assert res.cid == import_bytes(LARGE, None, OPTS).cid  # the same CIDs as a hash-only import
    assert res.blocks == 41
    assert flatfs(store) == []  # more than FLATFS_FIRST new blocks: every one in the pack
    (pack,) = packs(store)
    assert pack.with_suffix(".idx").exists()
    assert pack.stat().st_size == sum(len(b) for _, b in dag.walk(res.cid, store.get))
    assert b"".join(export_file(res.cid, store.get)) == LARGE
    # reopened (another process's view): the index is published, every block verified on read
    again = Blockstore(store.path)
    assert b"".join(export_file(res.cid, again.get)) == LARGE
    assert len(list(again.multihashes())) == 41


def test_an_import_from_a_pipe_lands_in_one_pack_too(tmp_path: Path) -> None:
    """The size is not known in advance (a pipe): the batch counts the new blocks itself."""
    store = Blockstore(tmp_path / "store")
    r, w = os.pipe()

    def feed() -> None:
        with open(w, "wb") as out:
            out.write(LARGE)

    t = threading.Thread(target=feed)
    t.start()
    with open(r, "rb", buffering=0) as src:
        res = import_file(src, store, OPTS)
    t.join()
    assert res.cid == import_bytes(LARGE, None, OPTS).cid
    assert flatfs(store) == [] and len(packs(store)) == 1
    assert b"".join(export_file(res.cid, Blockstore(store.path).get)) == LARGE


def test_a_small_import_stays_in_flatfs_and_one_block_more_makes_a_pack(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "store")
    res = import_bytes(SMALL, store, OPTS)
    assert res.blocks == FLATFS_FIRST
    assert len(flatfs(store)) == FLATFS_FIRST and packs(store) == []
    assert b"".join(export_file(res.cid, Blockstore(store.path).get)) == SMALL
    other = Blockstore(tmp_path / "other")
    one_more = SMALL + b"x"  # 16 leaves and a root
    res = import_bytes(one_more, other, OPTS)
    assert res.blocks == FLATFS_FIRST + 1 and flatfs(other) == [] and len(packs(other)) == 1
    assert b"".join(export_file(res.cid, Blockstore(other.path).get)) == one_more


def test_a_small_change_to_a_stored_file_goes_to_flatfs_files(tmp_path: Path) -> None:
    """Only the new blocks count: a file the store holds, two chunks changed, adds three flatfs
    files (the two leaves and the root) and no pack, as a fetch of three missing blocks would."""
    store = Blockstore(tmp_path / "store")
    import_bytes(LARGE, store, OPTS)
    (pack,) = packs(store)
    changed = bytearray(LARGE)
    changed[3 * CHUNK] ^= 1
    changed[30 * CHUNK + 5] ^= 1
    root = import_bytes(bytes(changed), Blockstore(store.path), OPTS).cid
    assert packs(store) == [pack] and len(flatfs(store)) == 3
    assert b"".join(export_file(root, Blockstore(store.path).get)) == changed


def test_a_directory_import_batches_the_whole_tree(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a").write_bytes(LARGE[: 10 * CHUNK])
    (tree / "sub" / "b").write_bytes(LARGE[10 * CHUNK:])
    store = Blockstore(tmp_path / "store")
    res = import_path(tree, store, OPTS)
    assert res.cid == import_path(tree, None, OPTS).cid
    assert flatfs(store) == [] and len(packs(store)) == 1  # 41 new blocks in all: one pack
    other = Blockstore(store.path)
    assert {c for c, _ in dag.walk(res.cid, other.get)} == {c for c, _ in dag.walk(res.cid, store.get)}


def test_pins_and_gc_cover_an_imported_pack(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "store")
    kept = import_bytes(SMALL, store, OPTS).cid
    store.pin(kept)
    root = import_bytes(LARGE, store, OPTS).cid
    store.pin(root)
    assert store.gc() == 0
    assert b"".join(export_file(root, store.get)) == LARGE
    store.unpin(root)
    assert store.gc() == 41  # an unpinned packed import: freed, pack and index gone
    assert packs(store) == [] and not list((store.path / "packs").glob("*.idx"))
    with pytest.raises(BlockNotFound):
        store.get(root)
    assert b"".join(export_file(kept, Blockstore(store.path).get)) == SMALL  # the pinned flatfs one stays


def test_a_damaged_pack_block_is_refused_after_an_import_and_an_import_repairs_it(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "store")
    root = import_bytes(LARGE, store, OPTS).cid
    (pack,) = packs(store)
    with open(pack, "r+b") as f:  # one bit of the first leaf
        f.seek(5)
        b = f.read(1)
        f.seek(5)
        f.write(bytes([b[0] ^ 1]))
    leaf = next(c for c, _ in dag.walk(root, import_store(LARGE)) if c != root)
    for reader in (store, Blockstore(store.path)):
        with pytest.raises(CIDMismatch):
            reader.get(leaf)
        with pytest.raises(CIDMismatch):
            reader.get_into(leaf, bytearray(CHUNK))
        with pytest.raises(CIDMismatch):
            b"".join(export_file(root, reader.get))
    # importing the file again writes the damaged block (and only it) again, as a flatfs file,
    # which reads look at first
    again = Blockstore(store.path)
    assert import_bytes(LARGE, again, OPTS).cid == root
    assert packs(again) == [pack]
    (repaired,) = flatfs(again)
    assert repaired.read_bytes() == import_store(LARGE)(leaf)
    assert b"".join(export_file(root, Blockstore(store.path).get)) == LARGE


def import_store(data: bytes) -> Callable[[CID], bytes]:
    """The block getter of a memory store holding `data`'s import (the reference DAG)."""
    mem = MemoryBlockstore()
    import_bytes(data, mem, OPTS)
    return mem.get


def test_an_import_writes_each_block_once(tmp_path: Path) -> None:
    """A block the store holds intact (a file imported again) or the file repeats (zeros) is
    not written again: a second import makes no second pack."""
    store = Blockstore(tmp_path / "store")
    root = import_bytes(LARGE, store, OPTS).cid
    (pack,) = packs(store)
    size = pack.stat().st_size
    assert import_bytes(LARGE, Blockstore(store.path), OPTS).cid == root
    assert packs(store) == [pack] and pack.stat().st_size == size and flatfs(store) == []
    zeros = bytes(30 * CHUNK)  # 30 identical leaves and a root: two blocks, two flatfs files
    zroot = import_bytes(zeros, store, OPTS).cid
    assert packs(store) == [pack]
    assert sorted(p.stat().st_size for p in flatfs(store)) == sorted([CHUNK, len(store.get(zroot))])
    assert b"".join(export_file(zroot, Blockstore(store.path).get)) == zeros


def test_an_import_is_durable_when_it_returns(tmp_path: Path, sync_log: SyncLog) -> None:
    """As a fetch: the pack (fdatasync), its index and their directory are fsynced before the
    import returns (no syncfs of the whole file system), as a lone put fsyncs its file."""
    synced, fs_syncs = sync_log.files, sync_log.whole
    store = Blockstore(tmp_path / "store")
    synced.clear()
    import_bytes(LARGE, store, OPTS)
    (pack,) = packs(store)
    assert str(pack) in synced and str(pack.parent) in synced and not fs_syncs
    assert any(s.endswith(f"{pack.stem}.idx") for s in synced)  # the index, fsynced before its rename
    synced.clear()
    root = import_bytes(SMALL, store, OPTS).cid
    files = {str(p) for p in flatfs(store)}
    assert len(files) == FLATFS_FIRST and files <= set(synced)
    assert {os.path.dirname(f) for f in files} <= set(synced)
    assert store.has(root)


def test_a_memory_store_and_an_import_error_behave(tmp_path: Path) -> None:
    mem = MemoryBlockstore()
    root = import_bytes(LARGE, mem, OPTS).cid
    assert b"".join(export_file(root, mem.get)) == LARGE

    class Broken(io.RawIOBase):
        """A source that fails after 20 chunks."""

        def __init__(self) -> None:
            self.left = 20 * CHUNK

        def readable(self) -> bool:
            return True

        def readinto(self, b: memoryview) -> int:  # type: ignore[override]
            if not self.left:
                raise OSError("read error")
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n

    store = Blockstore(tmp_path / "store")
    with pytest.raises(OSError, match="read error"):
        import_file(Broken(), store, OPTS)  # type: ignore[arg-type]
    assert store._batch is None  # the batch was closed: the store takes lone puts again
    store.put_block(b"after")


def test_an_import_inside_an_open_batch_shares_it(tmp_path: Path) -> None:
    """An import while a batch is open (a fetch's, say) writes through that batch, skipping what
    is present only while it runs; the outer batch keeps its own choice of flatfs or pack."""
    store = Blockstore(tmp_path / "store")
    kept = import_bytes(SMALL, store, OPTS).cid
    with store.writer() as outer:
        assert not outer.skip_present
        root = import_bytes(LARGE, store, OPTS).cid
        assert import_bytes(SMALL, store, OPTS).cid == kept
        assert not outer.skip_present and outer.skipped == FLATFS_FIRST and outer.blocks == 41
    assert len(flatfs(store)) == 2 * FLATFS_FIRST and len(packs(store)) == 1  # the outer batch's way
    assert b"".join(export_file(root, Blockstore(store.path).get)) == LARGE


def test_imagebuilder_build_writes_its_blocks_in_one_pack(tmp_path: Path) -> None:
    """`imagebuilder build --store`: the build's blocks in one batch, in the order they were made;
    a second write of the same build adds nothing."""
    from imagebuilder.commands.build import _write

    mem = MemoryBlockstore()
    blocks: dict[CID, bytes] = {}

    class Collect:
        def put(self, cid: CID, data: bytes) -> None:
            blocks[cid] = data

    root = import_bytes(LARGE, Collect(), OPTS).cid
    import_bytes(LARGE, mem, OPTS)
    res = SimpleNamespace(blocks=blocks, manifest_cid=root, uki=None)
    args = argparse.Namespace(car=None, kubo=None, store=tmp_path / "store")
    _write(res, args)  # type: ignore[arg-type]
    store = Blockstore(tmp_path / "store")
    (pack,) = packs(store)
    assert flatfs(store) == [] and store.pins() == [root]
    assert b"".join(export_file(root, store.get)) == LARGE
    # in the order the import made them: the leaves one after the other from offset 0
    assert pack.read_bytes()[: 3 * CHUNK] == b"".join(mem.get(c) for c in list(blocks)[:3])
    size = pack.stat().st_size
    _write(res, args)  # type: ignore[arg-type]
    assert packs(store) == [pack] and pack.stat().st_size == size and flatfs(store) == []


@pytest.mark.parametrize("data, packed", [(LARGE, True), (SMALL, False)])
def test_imagebuilder_car_import_batches_like_a_fetch(tmp_path: Path, data: bytes, packed: bool) -> None:
    from imagebuilder.commands.car import run_import

    mem = MemoryBlockstore()
    root = import_bytes(data, mem, OPTS).cid
    car = tmp_path / "x.car"
    with open(car, "wb") as f:
        w = CarWriter(f, [root])
        for cid, block in dag.walk(root, mem.get):
            w.write(cid, block)
    args = argparse.Namespace(file=str(car), store=tmp_path / "store", pin=True, json=True)
    assert run_import(args) == 0
    store = Blockstore(tmp_path / "store")
    n = sum(1 for _ in dag.walk(root, mem.get))
    if packed:
        assert flatfs(store) == [] and len(packs(store)) == 1
    else:
        assert len(flatfs(store)) == n and packs(store) == []
    assert store.pins() == [root]
    assert b"".join(export_file(root, Blockstore(store.path).get)) == data
