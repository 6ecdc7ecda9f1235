"""`agent run`: a flow.yaml or a signed manifest by CID, every role in one process, each role its
own development agent; results, provenance and audit logs in the block store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cidboot.dataflow.provenance import decode_input
from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from tests.support.kubo_node import KuboNode

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.kubo
def test_results_are_published_to_a_real_kubo_node(kubo: KuboNode, tmp_path: Path) -> None:
    """`agent run --publish kubo=URL`: the result's provenance DAG (value, parents, the flow) and the
    audit log reach the Kubo node, pinned, and Kubo serves the same bytes by CID."""
    proc = subprocess.run([sys.executable, "-m", "agent", "run", str(REPO / "examples/hello/flow.yaml"), "--identity",
                           str(tmp_path / "id"), "--store", str(tmp_path / "store"), "--json",
                           "--publish", f"kubo={kubo.api_url}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["published"]["blocks"] >= 4  # result + seed + flow + audit entries
    assert out["results"] == {"greeting": "hello, world"}
    cid = out["result_cids"]["greeting"]
    got = kubo.ipfs_bytes("block", "get", cid)
    assert Blockstore(tmp_path / "store").get(CID.parse(cid)) == got
    pins = kubo.ipfs("pin", "ls", "--type=recursive")
    assert cid in pins and next(iter(out["audit_head"].values())) in pins
    node = decode_input(got)
    assert node.value == "hello, world"
    assert kubo.ipfs_bytes("block", "get", str(node.flow))  # the whole DAG went, down to the flow
