"""Round trips with a real Kubo node: publish through its RPC, fetch back through its gateway
with our verifying client, and move CARs both ways."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from cidboot.ipld import dag
from cidboot.ipld.car import CarReader, CarWriter
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.ipld.dagcbor import encode
from cidboot.ipld.unixfs import ImportOptions, export_file, import_bytes, import_path
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.client import fetch
from cidboot.store.kubo import KuboClient
from tests.support.kubo_node import KuboNode

pytestmark = pytest.mark.kubo


def test_publish_with_add_then_fetch_from_kubo_gateway(kubo: KuboNode, tmp_path: Path) -> None:
    data = random.Random(1).randbytes(3 * 1024 * 1024 + 5)
    (tmp_path / "img").write_bytes(data)
    client = KuboClient(kubo.api_url)
    assert client.version() == "0.41.0"
    added = client.add_file(tmp_path / "img", cid_version=1)
    assert added.cid == import_bytes(data, None, ImportOptions(cid_version=1)).cid
    local = Blockstore(tmp_path / "store")
    res = fetch(added.cid, [kubo.gateway_url], local)
    assert res.blocks_fetched == 14 and not res.dropped  # 13 leaves + root
    assert b"".join(export_file(added.cid, local.get)) == data


def test_publish_blocks_from_our_importer_then_cat(kubo: KuboNode, tmp_path: Path) -> None:
    client = KuboClient(kubo.api_url)
    data = random.Random(2).randbytes(700_000)
    res = import_bytes(data, client)  # KuboClient is a BlockSink: block/put of each block
    client.pin(res.cid)
    assert client.cat(res.cid) == data
    node = {"manifest": "demo", "link": res.cid}
    cid = client.block_put(encode(node), DAG_CBOR)
    assert cid == CID.of(encode(node), DAG_CBOR)
    assert client.get_block(cid) == encode(node)


def test_car_exported_by_us_imports_into_kubo_with_same_root(kubo: KuboNode, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.bin").write_bytes(random.Random(3).randbytes(900_000))
    (tree / "b.txt").write_text("b\n")
    store = Blockstore(tmp_path / "store")
    root = import_path(tree, store).cid
    car = tmp_path / "out.car"
    with open(car, "wb") as f:
        w = CarWriter(f, [root])
        for cid, block in dag.walk(root, store.get):
            w.write(cid, block)
    assert KuboClient(kubo.api_url).dag_import(car) == [root]
    assert kubo.ipfs_bytes("cat", f"{root}/sub/a.bin") == (tree / "sub" / "a.bin").read_bytes()


def test_car_exported_by_kubo_reads_and_verifies(kubo: KuboNode, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(random.Random(4).randbytes(600_000))
    root = CID.parse(kubo.ipfs("add", "-Q", "--pin", str(tmp_path / "f")).strip())
    out = tmp_path / "k.car"
    out.write_bytes(kubo.ipfs_bytes("dag", "export", str(root)))
    reader = CarReader(io.BytesIO(out.read_bytes()))
    assert reader.roots == [root]
    store = Blockstore(tmp_path / "s")
    for cid, block in reader:
        store.put(cid, block)
    assert b"".join(export_file(root, store.get)) == (tmp_path / "f").read_bytes()

