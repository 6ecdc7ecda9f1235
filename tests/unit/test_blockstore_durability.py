"""fail-closed #13 (store): a damaged block is repaired, not served forever; two processes
pinning at once keep every pin, and gc keeps every pinned block."""

from __future__ import annotations

import multiprocessing
import random
from pathlib import Path
from typing import Any

import pytest

from cidboot.ipld import dag
from cidboot.ipld.cid import CID, CIDMismatch
from cidboot.ipld.unixfs import ImportOptions, export_file, import_bytes
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.client import fetch, fetch_block
from tests.support.gateway_fixtures import running_gateway

DATA = random.Random(13).randbytes(300_000)


def damage(store: Blockstore, cid: CID) -> None:
    path = store._file(cid)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_damaged_block_is_repaired_by_put_and_by_the_client(tmp_path: Path) -> None:
    origin = Blockstore(tmp_path / "origin")
    root = import_bytes(DATA, origin, ImportOptions(cid_version=1, chunk_size=50_000)).cid
    single = origin.put_block(b"a block the boot stage reads alone")
    local = Blockstore(tmp_path / "local")

    # put: good bytes replace a damaged copy (it used to skip an existing path)
    local.put(single, origin.get(single))
    damage(local, single)
    with pytest.raises(CIDMismatch):
        local.get(single)
    local.put(single, origin.get(single))
    assert local.get(single) == origin.get(single)

    with running_gateway(origin) as gw:
        # fetch_block: a damaged local copy is fetched again, not returned or raised
        damage(local, single)
        assert fetch_block(single, [gw.url], local, timeout=5) == origin.get(single)
        assert local.get(single) == origin.get(single)

        # fetch: a damaged leaf (raw: never read back before) and a damaged root are re-fetched
        fetch(root, [gw.url], local)
        leaf = next(c for c, _ in dag.walk(root, local.get) if c != root)
        damage(local, leaf)
        damage(local, root)
        res = fetch(root, [gw.url], local)
        assert res.blocks_fetched >= 2
    assert b"".join(export_file(root, local.get)) == DATA


def _pin_all(path: str, cids: list[str], start: Any) -> None:
    store = Blockstore(path)
    start.wait()
    for c in cids:
        store.pin(CID.parse(c))


def test_concurrent_pinning_from_two_processes_keeps_all_pins(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "s")
    cids = [store.put_block(f"block {i}".encode()) for i in range(200)]
    unpinned = [store.put_block(f"loose {i}".encode()) for i in range(5)]
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_pin_all, args=(str(store.path), [str(c) for c in half], start))
             for half in (cids[:100], cids[100:])]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(map(str, store.pins())) == sorted(map(str, cids))
    assert store.gc() == len(unpinned)
    assert all(store.get(c) == f"block {i}".encode() for i, c in enumerate(cids))
