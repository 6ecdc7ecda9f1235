"""Private results for real (issue 18 #4): `agent run` of the hello flow with an owner, published
to a real Kubo node. The result's marker is in no file of the agent's block store nor of Kubo's
repo; a control marker (the seed, which `seal: results` leaves clear) is found by the same grep,
so the grep would see a leak. A third party fetches the result's DAG from Kubo into an empty
store and validates the chain without the owner's key; `imagebuilder show --key` prints the
plaintext for the owner and refuses another key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import identity
from agent.attested import AttestedAgents
from agent.validate import Validator
from cidboot.dataflow.model import DataFlow
from cidboot.dataflow.provenance import decode
from cidboot.dataflow.sealing import decode_sealed
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.client import fetch
from cidboot.trust.appraisal import AFFIRMING, AppraisalResult
from cidboot.trust.cose_key import raw_public_bytes
from tests.support.kubo_node import KuboNode

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.kubo


def _grep(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_sealed_hello_result_never_stored_in_clear(kubo: KuboNode, tmp_path: Path) -> None:
    marker = "cidboot-result-marker-" + os.urandom(8).hex()
    control = "cidboot-control-marker-" + os.urandom(8).hex()
    flow_dir = tmp_path / "hello"
    flow_dir.mkdir()
    owner_key = tmp_path / "owner.key"
    keygen = _cli("imagebuilder", "keygen", "--owner", str(owner_key))
    assert keygen.returncode == 0, keygen.stderr
    recipient = keygen.stdout.strip()
    src = (REPO / "examples/hello/flow.yaml").read_text()
    src = src.replace("version: 1\n", f"version: 1\nowner: {{recipients: [{recipient}], seal: results}}\n", 1)
    src = src.replace("value: world}", f"value: {control}}}")
    assert control in src and recipient in src
    (flow_dir / "flow.yaml").write_text(src)
    (flow_dir / "ops.py").write_text((REPO / "examples/hello/ops.py").read_text()
                                     .replace('f"hello, {name}"', f'f"hello, {{name}} {marker}"'))
    (flow_dir / "greeting.txt").write_text("hi\n")
    store_dir, id_dir = tmp_path / "store", tmp_path / "id"
    run = _cli("agent", "run", str(flow_dir / "flow.yaml"), "--identity", str(id_dir), "--store", str(store_dir),
               "--json", "--publish", f"kubo={kubo.api_url}")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    result = CID.parse(out["result_cids"]["greeting"])
    sealed = CID.parse(out["results"]["greeting"]["sealed"])
    assert marker not in run.stdout + run.stderr

    # the value is nowhere in clear: the agent's store, Kubo's repo; the control (the clear seed) is
    assert _grep(store_dir, control.encode()) and _grep(kubo.repo, control.encode()), "the grep sees clear values"
    assert _grep(store_dir, marker.encode()) == []
    assert _grep(kubo.repo, marker.encode()) == []

    # a third party: the result's DAG from Kubo's gateway into an empty store, validated without a key
    third = Blockstore(tmp_path / "third")
    fetch(result, [f"http://127.0.0.1:{kubo.gateway_port}"], third)
    assert _grep(third.path, marker.encode()) == []
    decode_sealed(third.get(sealed), sealed)  # the sealed block came with the DAG (ciphertext only)
    node = decode(third.get(result), result)
    assert node.sealed == sealed and node.value is None
    flow = DataFlow.from_obj(dagcbor.decode(third.get(node.flow)))
    dev = identity.development(id_dir, role="device")  # the producer, as an appraisal would vouch for it
    appraisal = AppraisalResult(role="device", leaf_public_key=dev.key.public_key())
    appraisal.add("test", AFFIRMING, "the development agent of this run")
    attested = AttestedAgents()
    attested.add(appraisal)
    seed_key = raw_public_bytes(decode(third.get(node.parents[0]), node.parents[0]).producer_key())
    v = Validator(flow, node.flow, {"device": ["hello"]}, attested, third.get, frozenset({seed_key}), blind=True)
    assert v.validate(result).origin == "hello:greeting" and v.unchecked == []

    # the owner reads it; another key is refused
    shown = _cli("imagebuilder", "show", str(result), "--store", str(store_dir), "--key", str(owner_key))
    assert shown.returncode == 0, shown.stderr
    assert f"value: hello, {control} {marker}" in shown.stdout
    plain = _cli("imagebuilder", "show", str(result), "--store", str(store_dir))
    assert plain.returncode == 0 and "sealed (age, 1 recipient)" in plain.stdout and marker not in plain.stdout
    other = tmp_path / "other.key"
    assert _cli("imagebuilder", "keygen", "--owner", str(other)).returncode == 0
    wrong = _cli("imagebuilder", "show", str(result), "--store", str(store_dir), "--key", str(other))
    assert wrong.returncode == 1 and "not the flow owner's key" in wrong.stderr and marker not in wrong.stdout
