"""`agent run --publish cluster=URL,replication=2:2` against a real 3-peer CRDT cluster on
loopback: the result's provenance DAG and the audit log are pinned on 2 peers, and a third
party fetches the result back from a member's gateway, verified by CID, down to the flow."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cidboot.dataflow.provenance import decode_input
from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from cidboot.store.cluster import ClusterClient
from cidboot.store.gateway.client import fetch
from tests.support.cluster_node import Cluster

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.kubo
@pytest.mark.cluster
def test_agent_results_are_pinned_through_the_cluster(cluster_factory: Callable[[int], Cluster], tmp_path: Path) -> None:
    cluster = cluster_factory(3)
    entry = cluster.peers[0]
    proc = subprocess.run([sys.executable, "-m", "agent", "run", str(REPO / "examples/hello/flow.yaml"), "--identity",
                           str(tmp_path / "id"), "--store", str(tmp_path / "store"), "--json",
                           "--publish", f"cluster={entry.rest_url},replication=2:2"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["results"] == {"greeting": "hello, world"} and out["published"]["blocks"] >= 4
    result = out["result_cids"]["greeting"]
    audit = next(iter(out["audit_head"].values()))
    for root in (result, audit):
        status = entry.ctl("status", root)
        assert status.count("PINNED") == 2, status
    # a third party, knowing only the result's CID, fetches it from every member holding it
    holders = [cluster.by_id(p.peer) for p in ClusterClient(entry.rest_url).status(CID.parse(result)).pinned]
    assert len(holders) == 2
    for i, peer in enumerate(holders):
        dest = Blockstore(tmp_path / f"third-party-{i}")
        res = fetch(CID.parse(result), [peer.kubo.gateway_url], dest)
        assert not res.dropped
        node = decode_input(dest.get(CID.parse(result)))
        assert node.value == "hello, world" and dest.has(node.flow)  # the whole DAG, down to the flow
    # bad input: a cluster that cannot be reached fails the run's publish precisely
    bad = subprocess.run([sys.executable, "-m", "agent", "run", str(REPO / "examples/hello/flow.yaml"), "--identity",
                          str(tmp_path / "id"), "--store", str(tmp_path / "store"),
                          "--publish", "cluster=http://127.0.0.1:9,replication=1"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert bad.returncode == 1 and "cluster at http://127.0.0.1:9" in bad.stderr, bad.stderr
