"""IPFS Cluster: `imagebuilder publish` against a real 3-peer CRDT cluster on loopback (replication 2, one
peer killed, the cluster re-pins, the blocks come back verified from a survivor's gateway). The
REST client against a fake server is in tests/unit/test_cluster.py."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cidboot.ipld.cid import CID
from cidboot.ipld.dag import walk
from cidboot.ipld.unixfs import export_file
from cidboot.store.blockstore import Blockstore
from cidboot.store.cluster import (
    ClusterClient,
)
from cidboot.store.gateway.client import fetch
from imagebuilder.cli import main as imagebuilder
from tests.support.cluster_node import Cluster
from tests.support.kubo_node import KuboNode
from tests.unit.test_cluster import make_signed_manifest  # shared with the unit tier

# --- imagebuilder publish: bad input, no cluster needed --------------------------------------


def _publish(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = imagebuilder(["publish", *args])
    out, err = capsys.readouterr()
    return rc, out, err


# --- a real 3-peer cluster ---------------------------------------------------------------------


@pytest.mark.kubo
@pytest.mark.cluster
def test_publish_reaches_two_peers_and_cluster_repins_when_one_is_killed(
    cluster_factory: Callable[[int], Cluster], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = cluster_factory(3)
    entry = cluster.peers[0]
    store = Blockstore(tmp_path / "store")
    cid, layers = make_signed_manifest(store)
    n_blocks = sum(1 for c, _ in walk(cid, store.get))

    rc, out, err = _publish(capsys, str(cid), "--cluster", entry.rest_url, "--kubo", entry.kubo.api_url,
                            "--replication", "2:2", "--store", str(store.path), "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["cid"] == str(cid) and res["blocks"] == n_blocks
    assert len(res["pinned"]) == 2 and set(res["allocations"]) == set(res["pinned"])
    assert entry.peer_id in res["pinned"]  # the member that received the CAR is allocated first
    ctl = entry.ctl("status", str(cid))
    assert ctl.count("PINNED") == 2, ctl
    for seed in (4, 5, 6):  # 1 copy: always on the member that already holds the blocks (no transfer)
        small, _ = make_signed_manifest(store, seed)
        rc, out, err = _publish(capsys, str(small), "--cluster", entry.rest_url, "--kubo", entry.kubo.api_url,
                                "--replication", "1", "--store", str(store.path), "--json")
        assert rc == 0 and json.loads(out)["pinned"] == [entry.peer_id], err

    # Kill an allocated peer other than the one we talk to (SIGKILL: no goodbye to the cluster).
    victim = cluster.by_id(next(p for p in res["pinned"] if p != entry.peer_id))
    victim.kill()
    client = ClusterClient(entry.rest_url)
    deadline = time.monotonic() + 120
    while True:
        st = client.status(cid)
        live_pinned = [p.peer for p in st.pinned if p.peer != victim.peer_id]
        if len(live_pinned) >= 2 and victim.peer_id not in client.allocation(cid).allocations:
            break
        assert time.monotonic() < deadline, f"no re-pin after killing {victim.peer_id}: {st.describe()}"
        time.sleep(1)
    ctl = entry.ctl("status", str(cid))
    assert ctl.count("PINNED") == 2, ctl

    # The blocks come back, verified by CID, from a survivor's gateway (NoFetch: only what it holds).
    survivor = next(cluster.by_id(p) for p in live_pinned if p != entry.peer_id) if any(
        p != entry.peer_id for p in live_pinned) else cluster.by_id(live_pinned[0])
    dest = Blockstore(tmp_path / "fetched")
    fr = fetch(cid, [survivor.kubo.gateway_url], dest)
    assert not fr.dropped and fr.blocks_fetched == n_blocks
    for layer_cid, data in layers.items():
        assert b"".join(export_file(CID.parse(layer_cid), dest.get)) == data

    # Without --kubo the CAR goes through the REST API (/add?format=car) to the 2 live peers.
    cid2, layers2 = make_signed_manifest(store, seed=2)
    rc, out, err = _publish(capsys, str(cid2), "--cluster", entry.rest_url, "--replication", "2:2",
                            "--store", str(store.path), "--json")
    assert rc == 0, err
    res2 = json.loads(out)
    assert len(res2["pinned"]) == 2 and victim.peer_id not in res2["pinned"]
    other = next(cluster.by_id(p) for p in res2["pinned"] if p != entry.peer_id)
    dest2 = Blockstore(tmp_path / "fetched2")
    fetch(cid2, [other.kubo.gateway_url], dest2)
    for layer_cid, data in layers2.items():
        assert b"".join(export_file(CID.parse(layer_cid), dest2.get)) == data

    # More copies than live peers: the cluster's own refusal, quoted, exit 1.
    rc, out, err = _publish(capsys, str(cid2), "--cluster", entry.rest_url, "--kubo", entry.kubo.api_url,
                            "--replication", "3:3", "--store", str(store.path))
    assert rc == 1 and out == ""
    assert "HTTP 500: not enough peers to allocate" in err, err


@pytest.mark.kubo
def test_publish_to_one_kubo_node_pins_the_whole_dag_there(
    kubo: KuboNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Blockstore(tmp_path / "store")
    cid, layers = make_signed_manifest(store, seed=3)
    rc, out, err = _publish(capsys, str(cid), "--kubo", kubo.api_url, "--store", str(store.path))
    assert rc == 0, err
    assert out.strip() == str(cid)
    assert str(cid) in kubo.ipfs("pin", "ls", "--type=recursive", str(cid))
    for layer_cid, data in layers.items():
        assert kubo.ipfs_bytes("cat", layer_cid) == data
