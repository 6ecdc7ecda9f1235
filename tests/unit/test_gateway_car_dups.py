"""fail-closed #11: a `dups=y` CAR of a diamond-shaped DAG (each node linking twice to the next)
is 2^depth sections; the gateway bounds it per request instead of streaming without end."""

from __future__ import annotations

import http.client
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cidboot.ipld import dag, dagpb
from cidboot.ipld.car import CarReader
from cidboot.ipld.cid import CID, DAG_CBOR, DAG_PB, RAW
from cidboot.ipld.dagcbor import encode
from cidboot.ipld.unixfs.data import FILE, UnixFSData
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.server import GatewayServer
from tests.support.gateway_fixtures import running_gateway

LEAF = b"x" * 1000


def cbor_diamond(store: Blockstore, depth: int) -> CID:
    """depth+1 blocks; a walk with duplicates visits 2^(depth+1) - 1."""
    c = store.put_block(LEAF, RAW)
    for _ in range(depth):
        c = store.put_block(encode({"l": [c, c]}), DAG_CBOR)
    return c


def file_diamond(store: Blockstore, depth: int) -> CID:
    """A UnixFS file whose every node links twice to the same child: 2^depth leaves, depth+1 blocks."""
    c, size = store.put_block(LEAF, RAW), len(LEAF)
    for _ in range(depth):
        data = UnixFSData(FILE, filesize=2 * size, blocksizes=[size, size]).encode()
        c = store.put_block(dagpb.encode(dagpb.PBNode([dagpb.PBLink(c, "", size), dagpb.PBLink(c, "", size)], data)),
                            DAG_PB)
        size *= 2
    return c


@pytest.fixture
def diamonds(tmp_path: Path) -> Iterator[tuple[GatewayServer, dict[str, CID]]]:
    store = Blockstore(tmp_path / "s")
    cids = {"deep": cbor_diamond(store, 40), "small": cbor_diamond(store, 3), "file": file_diamond(store, 40)}
    with running_gateway(store) as gw:
        yield gw, cids


def get_bounded(gw: GatewayServer, path: str, seconds: float = 10.0, cap: int = 64 << 20) -> tuple[str, bytes, bool]:
    """GET with a wall-clock bound and a size cap; returns (content type, body, completed)."""
    out: dict[str, object] = {}

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", gw.server_address[1], timeout=seconds)
        conn.request("GET", path)
        r = conn.getresponse()
        out["ctype"] = r.getheader("Content-Type", "")
        body = bytearray()
        try:
            while len(body) < cap and (chunk := r.read1(1 << 16)):
                body += chunk
            out["done"] = len(body) < cap and r.isclosed()
        except http.client.IncompleteRead:
            out["done"] = False
        out["body"] = bytes(body)
        conn.close()

    t = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive() and time.monotonic() - t0 < seconds, f"{path} still streaming after {seconds} s"
    return str(out["ctype"]), out["body"], bool(out["done"])  # type: ignore[return-value]


def test_diamond_dag_car_with_dups_is_bounded(diamonds: tuple[GatewayServer, dict[str, CID]]) -> None:
    gw, c = diamonds
    ctype, body, done = get_bounded(gw, f"/ipfs/{c['deep']}?format=car&dag-scope=all&car-dups=y")
    assert done and ctype.endswith("dups=n")  # served without repeats, and says so
    assert len([cid for cid, _ in CarReader(io.BytesIO(body))]) == 41


def test_diamond_file_entity_car_is_bounded(diamonds: tuple[GatewayServer, dict[str, CID]]) -> None:
    gw, c = diamonds
    for dups in "yn":
        ctype, body, done = get_bounded(gw, f"/ipfs/{c['file']}?format=car&dag-scope=entity&car-dups={dups}")
        assert done and ctype.endswith("dups=n")
        assert len(list(CarReader(io.BytesIO(body)))) == 41
    # a byte range walks the file's leaves: its repeats are counted and the stream is cut
    _, body, done = get_bounded(gw, f"/ipfs/{c['file']}?format=car&dag-scope=entity&entity-bytes=0:*&car-dups=y")
    assert not done and len(body) < 128 << 20


def test_small_diamond_still_gets_its_duplicates(diamonds: tuple[GatewayServer, dict[str, CID]]) -> None:
    gw, c = diamonds
    ctype, body, done = get_bounded(gw, f"/ipfs/{c['small']}?format=car&dag-scope=all&car-dups=y")
    assert done and ctype.endswith("dups=y")
    assert len(list(CarReader(io.BytesIO(body)))) == 15


def test_walk_cost_counts_without_walking(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "s")
    cost = dag.walk_cost(cbor_diamond(store, 40), store.get)
    assert (cost.unique_blocks, cost.visits) == (41, 2**41 - 1)
    assert cost.duplicate_bytes > 2**40
