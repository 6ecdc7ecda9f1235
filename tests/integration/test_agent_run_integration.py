"""`agent run`: a flow.yaml or a signed manifest by CID, every role in one process, each role its
own development agent; results, provenance and audit logs in the block store."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.cli import main
from cidboot.dataflow.provenance import decode_input
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.ipld.unixfs.importer import import_bytes
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.cose_key import encode_public_key_bytes
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from tests.support.kubo_node import KuboNode

REPO = Path(__file__).resolve().parents[2]
READINGS = [(i * 7) % 10 for i in range(5)]


def agent_run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    rc = main(["run", *argv, "--json"])
    out = capsys.readouterr()
    return rc, json.loads(out.out), out.err


def signed_two_device(store: Blockstore, measurements: dict[str, bytes]) -> CID:
    doc = yaml.safe_load((REPO / "examples/two-device/flow.yaml").read_text())
    flow_cid = store.put_block(dagcbor.encode(doc["dataflow"]), DAG_CBOR)
    ops = import_bytes((REPO / "examples/two-device/ops.py").read_bytes(), store).cid
    signer = keys.generate()
    root = RootOfTrust((encode_public_key_bytes(signer.public_key()),), 1)
    layer = import_bytes(b"an image layer", store)
    m = Manifest("two-device", 1, int(time.time()) + 3600, (Layer(layer.cid, layer.size, "agent"),), root,
                 measurements, flow=flow_cid, operations={"sample": ops, "summarise": ops},
                 placement=doc["placement"], policies=[{"name": "measured", "veto": {"operation": "summarise"},
                                                         "unless": {"measurement": "image"}}])
    signed = sign_manifest(m, [signer])
    store.put(signed.cid, signed.encode())
    return signed.cid


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
