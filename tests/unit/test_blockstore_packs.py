"""The batch writer's pack files and its direct flatfs writes: what a torn write or a crash
leaves is refused on read and replaced by the next fetch; a lying gateway gets nothing written
under the CID it lied about; other processes, gc and pins see pack blocks."""

from __future__ import annotations

import fcntl
import io
import os
import random
from pathlib import Path

import pytest

from cidboot.ipld import dag
from cidboot.ipld.car import CarReader, CarWriter
from cidboot.ipld.cid import CID, RAW, CIDMismatch
from cidboot.ipld.unixfs import ImportOptions, export_file, import_bytes
from cidboot.store.blockstore import BlockNotFound, Blockstore
from cidboot.store.gateway.client import AllGatewaysFailed, fetch
from cidboot.store.packs import FLATFS_FIRST
from tests.support.gateway_fixtures import proxy_gateway, running_gateway
from tests.support.sync_log import SyncLog

# 40 leaves of 20 kB: the first FLATFS_FIRST blocks of a fetch go to flatfs files, the rest to a pack
DATA = random.Random(29).randbytes(800_000)


@pytest.fixture()
def origin(tmp_path: Path) -> tuple[Blockstore, CID]:
    store = Blockstore(tmp_path / "origin")
    return store, import_bytes(DATA, store, ImportOptions(cid_version=1, chunk_size=20_000)).cid


@pytest.fixture()
def flatfs_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fetch's first FLATFS_FIRST blocks go to flatfs files even when the DAG is larger (as a
    batch writer nobody tells the size of does): the tests that need both kinds of blocks."""
    from cidboot.store.blockstore import BatchWriter

    monkeypatch.setattr(BatchWriter, "expect_many", lambda self: None)


def packed(store: Blockstore) -> list[Path]:
    return sorted((store.path / "packs").glob("*.pack"))


def in_pack(store: Blockstore, root: CID) -> list[CID]:
    return [c for c, _ in dag.walk(root, store.get) if not store._file(c).exists()]


def test_a_fetch_puts_its_first_blocks_in_flatfs_and_the_rest_in_one_pack(origin: tuple[Blockstore, CID],
                                                                         tmp_path: Path, flatfs_first: None) -> None:
    src, root = origin
    local = Blockstore(tmp_path / "local")
    with running_gateway(src) as gw:
        res = fetch(root, [gw.url], local)
    assert res.blocks_fetched == 41
    assert len(list((local.path / "blocks").rglob("*.data"))) == FLATFS_FIRST
    (pack,) = packed(local)
    # the blocks one after the other, no padding
    assert pack.with_suffix(".idx").exists() and pack.stat().st_size == (41 - FLATFS_FIRST) * 20_000
    assert not list((local.path / "packs").glob(".tmp-*"))
    # another process (a fresh store object) reads them, verified
    other = Blockstore(local.path)
    assert b"".join(export_file(root, other.get)) == DATA
    assert len(list(other.multihashes())) == 41
    assert all(other.size(c) == len(d) for c, d in dag.walk(root, src.get))


def test_pack_blocks_are_invisible_to_other_processes_until_the_batch_ends(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "s")
    blocks = [random.Random(i).randbytes(1000) for i in range(FLATFS_FIRST + 5)]
    cids = [CID.of(b, RAW) for b in blocks]
    other = Blockstore(store.path)
    with store.writer() as w:
        for c, b in zip(cids, blocks, strict=True):
            w.put(c, b)
        # this process reads every put at once (read your writes); another sees no pack block yet
        assert all(store.get(c) == b for c, b in zip(cids, blocks, strict=True))
        assert not any(other.has(c) for c in cids[FLATFS_FIRST:])
    assert all(other.get(c) == b for c, b in zip(cids, blocks, strict=True))


@pytest.mark.parametrize("where", ["flatfs", "pack"])
@pytest.mark.parametrize("how", ["short", "flipped", "empty"])
def test_a_torn_block_is_refused_on_read_and_replaced_by_the_next_fetch(origin: tuple[Blockstore, CID],
                                                                        tmp_path: Path, where: str, how: str,
                                                                        flatfs_first: None) -> None:
    """A crash before the batch's sync can leave a block file or a pack region short, empty or
    wrong: a read refuses it (CIDMismatch, never the bytes), and the next fetch replaces it."""
    src, root = origin
    local = Blockstore(tmp_path / "local")
    with running_gateway(src) as gw:
        fetch(root, [gw.url], local)
        leaves = [c for c, _ in dag.walk(root, local.get) if c != root]
        packed_leaves = set(in_pack(local, root))
        victim = next(c for c in leaves if (c in packed_leaves) == (where == "pack"))
        good = src.get(victim)
        if where == "flatfs":
            path = local._file(victim)
            path.write_bytes({"short": good[: len(good) // 2], "flipped": good[:-1] + bytes([good[-1] ^ 1]),
                              "empty": b""}[how])
        else:
            entry = local.packs.lookup(victim.multihash.encode())
            assert entry is not None
            (pack,) = packed(local)
            if how == "short":  # the pack cut inside the victim (and everything after it lost)
                os.truncate(pack, entry.offset + entry.length // 2)
            else:
                with open(pack, "r+b") as f:
                    f.seek(entry.offset)
                    f.write(bytes([good[0] ^ 1]) if how == "flipped" else b"\0" * entry.length)
        fresh = Blockstore(local.path)  # as after a restart
        with pytest.raises(CIDMismatch):
            fresh.get(victim)
        res = fetch(root, [gw.url], fresh)
    assert res.blocks_fetched >= 1
    assert fresh.get(victim) == good and Blockstore(local.path).get(victim) == good
    assert b"".join(export_file(root, Blockstore(local.path).get)) == DATA


def _lie_about(victim: CID) -> object:
    def mangle(path: str, body: bytes) -> bytes:
        r = CarReader(io.BytesIO(body), verify=False)
        out = io.BytesIO()
        w = CarWriter(out, r.roots)
        for c, d in r:
            w.write(c, d[:-1] + bytes([d[-1] ^ 1]) if c == victim else d)
        return out.getvalue()
    return mangle


@pytest.mark.parametrize("which", ["early", "late"])  # a flatfs-bound block, a pack-bound block
def test_a_block_that_does_not_match_its_cid_is_refused_and_nothing_is_written_under_it(
        origin: tuple[Blockstore, CID], tmp_path: Path, which: str) -> None:
    src, root = origin
    order = [c for c, _ in dag.walk(root, src.get)]
    victim = order[3] if which == "early" else order[-2]
    local = Blockstore(tmp_path / "local")
    with running_gateway(src) as gw, proxy_gateway(gw.url, _lie_about(victim)) as liar:  # type: ignore[arg-type]
        with pytest.raises(AllGatewaysFailed) as e:
            fetch(root, [liar], local, backoff=0)
        assert e.value.lied
        fresh = Blockstore(local.path)
        assert not fresh.has(victim) and not local._file(victim).exists()
        assert fresh.packs.lookup(victim.multihash.encode()) is None
        with pytest.raises(BlockNotFound):
            fresh.get(victim)
        # what arrived before the lie is kept (verified) and the next, honest, gateway completes it
        res = fetch(root, [liar, gw.url], fresh, backoff=0)
    assert liar in res.dropped and fresh.get(victim) == src.get(victim)
    assert b"".join(export_file(root, Blockstore(local.path).get)) == DATA


def test_gc_collects_pack_blocks_and_moves_the_few_survivors_out(origin: tuple[Blockstore, CID], tmp_path: Path) -> None:
    src, root = origin
    local = Blockstore(tmp_path / "local")
    with running_gateway(src) as gw:
        fetch(root, [gw.url], local)
    keep = import_bytes(b"a small pinned file", local).cid  # flatfs
    survivor = in_pack(local, root)[-1]
    local.pin(keep)
    local.pin(survivor)  # one raw leaf of the pack stays pinned
    assert local.gc() == 41 - 1
    assert not packed(local) and local.get(survivor) == src.get(survivor)  # moved to flatfs
    assert local._file(survivor).exists() and not local.has(root)
    local.unpin(survivor)
    assert local.gc() == 1 and list(local.multihashes()) == [keep.multihash]


def test_gc_keeps_a_mostly_live_pack_and_drops_a_damaged_index_and_orphans(origin: tuple[Blockstore, CID],
                                                                          tmp_path: Path) -> None:
    src, root = origin
    local = Blockstore(tmp_path / "local")
    with running_gateway(src) as gw:
        fetch(root, [gw.url], local)
    local.pin(root)
    (pack,) = packed(local)
    assert local.gc() == 0 and packed(local) == [pack]
    # a pack whose writer died before its index (a crash mid-fetch): invisible, removed by gc ...
    orphan = pack.with_name("00000000000000000001-1-0.pack")
    orphan.write_bytes(b"x" * 1000)
    held = pack.with_name("00000000000000000002-1-0.pack")  # ... unless a writer still holds it
    held.write_bytes(b"y" * 1000)
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        local.gc()
        assert not orphan.exists() and held.exists()
    finally:
        os.close(fd)
    # a torn index: the pack's blocks count as absent (the next fetch brings them), nothing raises
    pack.with_suffix(".idx").write_text('{"version": 1, "blocks": [["12', encoding="ascii")
    fresh = Blockstore(local.path)
    late = [c for c, _ in dag.walk(root, src.get)][-1]
    assert not fresh.has(late)
    with running_gateway(src) as gw:
        fetch(root, [gw.url], fresh)
    assert b"".join(export_file(root, Blockstore(local.path).get)) == DATA


@pytest.mark.parametrize("where", ["flatfs", "pack"])
def test_get_into_reads_a_verified_block_into_the_callers_buffer(origin: tuple[Blockstore, CID], tmp_path: Path,
                                                                 where: str, flatfs_first: None) -> None:
    """The gateway's CAR walk reads each block into a reused buffer (Blockstore.get_into): the
    view holds the block's bytes, verified in that buffer; a buffer too small is replaced by a
    larger one (the view's obj); a damaged copy is refused as by get, an absent one too."""
    src, root = origin
    local = Blockstore(tmp_path / "local")
    with running_gateway(src) as gw:
        fetch(root, [gw.url], local)
    packed_leaves = set(in_pack(local, root))
    victim = next(c for c, _ in dag.walk(root, local.get) if c != root and (c in packed_leaves) == (where == "pack"))
    good = src.get(victim)
    buf = bytearray(64 * 1024)
    view = local.get_into(victim, buf)
    assert bytes(view) == good and view.obj is buf
    small = local.get_into(victim, bytearray(10))
    assert bytes(small) == good and len(small.obj) >= len(good)  # type: ignore[arg-type]
    if where == "flatfs":
        local._file(victim).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    else:
        entry = local.packs.lookup(victim.multihash.encode())
        assert entry is not None
        with open(packed(local)[0], "r+b") as f:
            f.seek(entry.offset)
            f.write(bytes([good[0] ^ 1]))
    with pytest.raises(CIDMismatch):
        Blockstore(local.path).get_into(victim, buf)
    with pytest.raises(BlockNotFound):
        local.get_into(CID.of(b"absent", RAW), buf)


def test_packs_go_through_the_page_cache_their_blocks_one_after_the_other(origin: tuple[Blockstore, CID],
                                                                          tmp_path: Path) -> None:
    """A pack is written through the page cache (what is fetched is often served or exported
    next: its blocks are then read from memory, not from the disk), its blocks one after the
    other, no padding."""
    src, root = origin
    local = Blockstore(tmp_path / "local")
    with running_gateway(src) as gw:
        fetch(root, [gw.url], local)
    (pack,) = packed(local)
    assert pack.stat().st_size == sum(len(d) for _, d in dag.walk(root, src.get))
    assert b"".join(export_file(root, Blockstore(local.path).get)) == DATA


def test_a_batch_fsyncs_its_own_files_not_the_whole_file_system(origin: tuple[Blockstore, CID], tmp_path: Path,
                                                                  sync_log: SyncLog,
                                                                  flatfs_first: None) -> None:
    """A fetch makes durable exactly what it wrote (the pack, its index, each flatfs file and
    the directories their names are in) with fsyncs of its own, not with a syncfs of the file
    system, which would also wait for whatever other programs left dirty on it."""
    synced, fs_syncs = sync_log.files, sync_log.whole
    src, root = origin
    local = Blockstore(tmp_path / "local")
    with running_gateway(src) as gw:
        fetch(root, [gw.url], local)
    assert not fs_syncs
    files = {str(p) for p in (local.path / "blocks").rglob("*.data")}
    (pack,) = packed(local)
    assert len(files) == FLATFS_FIRST
    assert files | {str(pack), str(pack.with_suffix(".idx")).replace(".idx", ".idx")} <= {
        s.replace(f".tmp-{pack.stem}.idx", f"{pack.stem}.idx") for s in synced}
    assert {os.path.dirname(f) for f in files} | {str(pack.parent)} <= set(synced)


def test_a_fetch_that_will_pass_flatfs_first_blocks_puts_them_all_in_the_pack(origin: tuple[Blockstore, CID],
                                                                              tmp_path: Path) -> None:
    """Once the blocks of a CAR link to more than FLATFS_FIRST blocks, the client tells the
    batch writer, and the rest go straight to the pack: no flatfs file (each would cost an
    fsync and its directory's when the batch ends). A fetch of a few blocks still makes no pack."""
    src, root = origin
    local = Blockstore(tmp_path / "local")
    small = import_bytes(b"a small file", src).cid
    with running_gateway(src) as gw:
        fetch(root, [gw.url], local)
        assert not list((local.path / "blocks").rglob("*.data"))
        (pack,) = packed(local)
        fetch(small, [gw.url], local)
    assert packed(local) == [pack] and len(list((local.path / "blocks").rglob("*.data"))) == 1
    fresh = Blockstore(local.path)
    assert len(in_pack(fresh, root)) == 41
    assert b"".join(export_file(root, fresh.get)) == DATA


def _put_lent(store: Blockstore, blocks: list[bytes]) -> list[CID]:
    """Put `blocks` in one batch the way the fetch client does: each read into a buffer the
    writer lends."""
    cids = []
    with store.writer() as w:
        w.expect_many()
        for b in blocks:
            buf = w.buffer(len(b))
            buf[:len(b)] = b
            cid = CID.of(b, RAW)
            w.put(cid, memoryview(buf)[:len(b)])
            assert store.get(cid) == b  # read your writes, wherever the block is meanwhile
            cids.append(cid)
    return cids


def test_a_dag_of_small_blocks_packs_at_its_size(tmp_path: Path) -> None:
    """A DAG of small blocks (a rootfs of small files, directory nodes, dag-cbor) is packed one
    block after the other: the pack is their total size, and each reads back."""
    rng = random.Random(5)
    blocks = [rng.randbytes(rng.randint(50, 3000)) for _ in range(2500)]  # ~3.8 MB: many groups
    store = Blockstore(tmp_path / "s")
    cids = _put_lent(store, blocks)
    (pack,) = packed(store)
    assert pack.stat().st_size == sum(map(len, blocks))
    fresh = Blockstore(store.path)
    assert all(fresh.get(c) == b for c, b in zip(cids, blocks, strict=True))
