"""The verifying client: it trusts no gateway, falls back past bad ones, and resumes."""

from __future__ import annotations

import io
import random
import time
from pathlib import Path

import pytest

from cidboot.ipld.car import CarReader, CarWriter
from cidboot.ipld.cid import CID, RAW
from cidboot.ipld.unixfs import ImportOptions, export_file, import_bytes
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.client import AllGatewaysFailed, GatewayError, fetch, fetch_bytes
from tests.support.gateway_fixtures import proxy_gateway, raw_only_gateway, running_gateway

DATA = random.Random(11).randbytes(700_000)


@pytest.fixture()
def origin(tmp_path: Path) -> tuple[Blockstore, CID]:
    store = Blockstore(tmp_path / "origin")
    return store, import_bytes(DATA, store, ImportOptions(cid_version=1, chunk_size=50_000)).cid


def flip_last_block(path: str, body: bytes) -> bytes:
    """Re-encode the CAR with the last block's bytes altered (CID kept): a lying gateway."""
    r = CarReader(io.BytesIO(body), verify=False)
    blocks = list(r)
    cid, data = blocks[-1]
    blocks[-1] = (cid, data[:-1] + bytes([data[-1] ^ 1]))
    out = io.BytesIO()
    w = CarWriter(out, r.roots)
    for c, d in blocks:
        w.write(c, d)
    return out.getvalue()


def _section(cid: CID, data: bytes) -> bytes:
    from cidboot.ipld.car import encode_section

    return encode_section(cid, data)


def test_fetch_whole_dag(origin: tuple[Blockstore, CID], tmp_path: Path) -> None:
    store, root = origin
    with running_gateway(store) as gw:
        local = Blockstore(tmp_path / "local")
        res = fetch(root, [gw.url], local)
    assert res.blocks_fetched == 15 and b"".join(export_file(root, local.get)) == DATA


def test_wrong_block_gateway_is_dropped_and_next_one_used(origin: tuple[Blockstore, CID], tmp_path: Path) -> None:
    store, root = origin
    with running_gateway(store) as gw, proxy_gateway(gw.url, flip_last_block) as liar:
        local = Blockstore(tmp_path / "local")
        res = fetch(root, [liar, gw.url], local, backoff=0)
    assert liar in res.dropped and "does not match" in res.dropped[liar]
    assert b"".join(export_file(root, local.get)) == DATA


def test_unrequested_block_gateway_is_dropped(origin: tuple[Blockstore, CID], tmp_path: Path) -> None:
    store, root = origin
    with running_gateway(store) as gw, proxy_gateway(gw.url, lambda p, b: b + _section(CID.of(b"x", RAW), b"x")) as liar:
        local = Blockstore(tmp_path / "local")
        res = fetch(root, [liar, gw.url], local, backoff=0)
    assert "not linked" in res.dropped[liar]
    assert not local.has(CID.of(b"x", RAW))
    assert b"".join(export_file(root, local.get)) == DATA


def test_stalling_gateway_times_out_and_falls_back(origin: tuple[Blockstore, CID], tmp_path: Path) -> None:
    store, root = origin
    with running_gateway(store) as gw, proxy_gateway(gw.url, lambda p, b: None) as staller:
        local = Blockstore(tmp_path / "local")
        res = fetch(root, [staller, gw.url], local, timeout=1.0, backoff=0)
    assert any("stalled" in e or "timed out" in e for e in res.errors), res.errors
    assert b"".join(export_file(root, local.get)) == DATA


def test_interrupted_fetch_resumes_without_refetching(origin: tuple[Blockstore, CID], tmp_path: Path) -> None:
    store, root = origin
    local = Blockstore(tmp_path / "local")
    # an earlier, interrupted fetch left the root and the first 5 leaves
    from cidboot.ipld import dag

    local.put(root, store.get(root))
    for leaf in dag.links(root, store.get(root))[:5]:
        local.put(leaf, store.get(leaf))
    with running_gateway(store) as gw:
        res = fetch(root, [gw.url], local)
        deadline = time.monotonic() + 5  # the server counts just after it writes: let it catch up
        while gw.metrics.requests < 9 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert gw.metrics.requests == 9  # one subtree request per missing leaf, none for what is local
    assert res.blocks_present == 6 and res.blocks_fetched == 9
    assert b"".join(export_file(root, local.get)) == DATA


def test_all_gateways_failing_names_each(origin: tuple[Blockstore, CID], tmp_path: Path) -> None:
    store, root = origin
    with running_gateway(store) as gw, proxy_gateway(gw.url, flip_last_block) as liar:
        with pytest.raises(AllGatewaysFailed) as e:
            fetch(root, [liar, "http://127.0.0.1:9"], Blockstore(tmp_path / "l"), timeout=1, rounds=2, backoff=0)
    assert liar in str(e.value) and "127.0.0.1:9" in str(e.value)


def test_missing_root_everywhere(tmp_path: Path) -> None:
    with running_gateway(Blockstore(tmp_path / "empty")) as gw:
        with pytest.raises(AllGatewaysFailed, match="404"):
            fetch(CID.of(b"absent", RAW), [gw.url], Blockstore(tmp_path / "l"), rounds=1)


def test_bad_gateway_url(tmp_path: Path) -> None:
    with pytest.raises(AllGatewaysFailed, match="must be http"):
        fetch(CID.of(b"a", RAW), ["ftp://x"], Blockstore(tmp_path / "l"), rounds=1)


def test_block_only_gateway_is_fetched_per_block(origin: tuple[Blockstore, CID], tmp_path: Path) -> None:
    store, root = origin
    with running_gateway(store) as gw, raw_only_gateway(gw.url) as raw_gw:
        res = fetch(root, [raw_gw], tmp_path / "local")  # a directory: a store is opened in it
    assert res.blocks_fetched == 15 and not res.dropped
    assert b"".join(export_file(root, Blockstore(tmp_path / "local").get)) == DATA


def test_fetch_bytes_and_retries(origin: tuple[Blockstore, CID], tmp_path: Path) -> None:
    store, root = origin
    with running_gateway(store) as gw:
        assert b"".join(fetch_bytes(root, [gw.url], Blockstore(tmp_path / "l"))) == DATA
        with pytest.raises(GatewayError, match="at least 1"):
            fetch(root, [gw.url], tmp_path / "m", retries=0)
    with pytest.raises(AllGatewaysFailed, match="127.0.0.1:9"):
        fetch(root, ["http://127.0.0.1:9"], tmp_path / "n", retries=1)


def test_each_block_is_hashed_once_per_fetch(origin: tuple[Blockstore, CID], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The client verifies a block as it arrives and remembers its links: walking the DAG again
    after the CAR (to find what is still missing) must not read and hash every block again."""
    import threading

    from cidboot.ipld import multihash

    store, root = origin
    hashed: list[int] = []
    real = multihash.Multihash.matches

    def counting(self: multihash.Multihash, data: bytes) -> bool:
        if threading.current_thread() is threading.main_thread():  # the client's, not the gateway's
            hashed.append(len(data))
        return real(self, data)

    with running_gateway(store) as gw:
        monkeypatch.setattr(multihash.Multihash, "matches", counting)
        res = fetch(root, [gw.url], Blockstore(tmp_path / "local"))
        monkeypatch.undo()
    assert res.blocks_fetched == 15
    assert len(hashed) == 15, f"{len(hashed)} hashes for 15 blocks"


def test_fetch_into_memory(origin: tuple[Blockstore, CID]) -> None:
    """A boot stage fetches into RAM (MemoryBlockstore): same verification, no files."""
    from cidboot.store.blockstore import MemoryBlockstore

    store, root = origin
    with running_gateway(store) as gw, proxy_gateway(gw.url, flip_last_block) as liar:
        mem = MemoryBlockstore()
        res = fetch(root, [liar, gw.url], mem, backoff=0)
    assert liar in res.dropped and b"".join(export_file(root, mem.get)) == DATA


def test_root_fetched_first_then_the_dag_in_one_request(origin: tuple[Blockstore, CID], tmp_path: Path) -> None:
    """The bootstrap fetches a layer's root alone (to check its declared size), then the DAG:
    that must be one CAR request for the whole DAG, not one per child of the root."""
    from cidboot.store.blockstore import MemoryBlockstore
    from cidboot.store.gateway.client import fetch_block

    store, root = origin
    paths: list[str] = []

    def record(path: str, body: bytes) -> bytes:
        paths.append(path)
        return body

    with running_gateway(store) as gw, proxy_gateway(gw.url, record) as counted:
        mem = MemoryBlockstore()
        fetch_block(root, [counted], mem)
        res = fetch(root, [counted], mem)
    assert len(paths) == 2 and "format=car" in paths[1], paths
    assert res.blocks_fetched == 14 and b"".join(export_file(root, mem.get)) == DATA


def test_whole_dag_car_from_a_liar_falls_back(origin: tuple[Blockstore, CID], tmp_path: Path) -> None:
    store, root = origin
    from cidboot.store.gateway.client import fetch_block

    with running_gateway(store) as gw, proxy_gateway(gw.url, flip_last_block) as liar:
        local = Blockstore(tmp_path / "local")
        fetch_block(root, [gw.url], local)
        res = fetch(root, [liar, gw.url], local, backoff=0)
    assert liar in res.dropped and b"".join(export_file(root, local.get)) == DATA
