"""`agent run`: a flow.yaml or a signed manifest by CID, every role in one process, each role its
own development agent; results, provenance and audit logs in the block store."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import identity
from agent.audit import verify_log
from agent.cli import main
from cidboot.dataflow.provenance import decode_input, verify_signature
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.ipld.unixfs.importer import import_bytes
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.cose_key import encode_public_key_bytes
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest

REPO = Path(__file__).resolve().parents[2]
READINGS = [(i * 7) % 10 for i in range(5)]


def agent_run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    rc = main(["run", *argv, "--json"])
    out = capsys.readouterr()
    return rc, json.loads(out.out), out.err


def test_hello_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = agent_run(capsys, str(REPO / "examples/hello/flow.yaml"), "--identity", str(tmp_path / "id"),
                           "--store", str(tmp_path / "store"))
    assert rc == 0 and out["results"] == {"greeting": "hello, world"}
    store = Blockstore(tmp_path / "store")
    cid = CID.parse(out["result_cids"]["greeting"])
    node = decode_input(store.get(cid), cid)
    verify_signature(node)
    seed = decode_input(store.get(node.parents[0]))
    # the seed is signed by the flow authority (DIR/authority.pem: no trust keys beside the example)
    authority = keys.load_private_key(tmp_path / "id/authority.pem")
    assert seed.producer == encode_public_key_bytes(authority.public_key())
    assert cid in store.pins()
    head = CID.parse(out["audit_head"]["device"])
    ident = identity.development(tmp_path / "id", role="device")
    assert [b["decision"] for b in verify_log(head, store.get, ident.key.public_key())] == ["result", "run"]


def test_two_device_yaml_runs_both_roles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--identity", str(tmp_path / "id"), "--store", str(tmp_path / "store")]
    rc, out, err = agent_run(capsys, str(REPO / "examples/two-device/flow.yaml"), *args)
    assert rc == 0, err
    assert out["results"] == {"readings": READINGS, "total": sum(READINGS)}
    assert set(out["audit_head"]) == {"sensor", "aggregator"}
    store = Blockstore(tmp_path / "store")
    total = decode_input(store.get(CID.parse(out["result_cids"]["total"])))
    readings = decode_input(store.get(total.parents[0]))
    # each role is its own agent: the total and the readings are signed by different keys
    assert readings.operation == "sample" and total.producer != readings.producer
    rc, only, _ = agent_run(capsys, str(REPO / "examples/two-device/flow.yaml"), *args, "--role", "sensor")
    assert rc == 0 and only["results"] == {"readings": READINGS} and set(only["audit_head"]) == {"sensor"}
    assert only["result_cids"]["readings"] == out["result_cids"]["readings"]  # deterministic


def test_policy_veto_from_yaml_is_reported_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = yaml.safe_load((REPO / "examples/hello/flow.yaml").read_text())
    doc["policies"] = [{"name": "no-greetings-from-seeds", "veto": {"operation": "hello", "producer": "seed"}}]
    (tmp_path / "flow.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "ops.py").write_text((REPO / "examples/hello/ops.py").read_text())
    rc, out, err = agent_run(capsys, str(tmp_path / "flow.yaml"), "--identity", str(tmp_path / "id"),
                             "--store", str(tmp_path / "store"))
    assert rc == 1 and out["results"] == {}
    assert out["vetoed"][0]["operation"] == "hello" and "no-greetings-from-seeds" in out["vetoed"][0]["reason"]
    assert "veto: policy no-greetings-from-seeds vetoes hello" in err


def signed_two_device(store: Blockstore, measurements: dict[str, bytes], owner: dict[str, Any] | None = None) -> CID:
    doc = yaml.safe_load((REPO / "examples/two-device/flow.yaml").read_text())
    flow_cid = store.put_block(dagcbor.encode(doc["dataflow"]), DAG_CBOR)
    ops = import_bytes((REPO / "examples/two-device/ops.py").read_bytes(), store).cid
    signer = keys.generate()
    root = RootOfTrust((encode_public_key_bytes(signer.public_key()),), 1)
    layer = import_bytes(b"an image layer", store)
    m = Manifest("two-device", 1, int(time.time()) + 3600, (Layer(layer.cid, layer.size, "agent"),), root,
                 measurements, flow=flow_cid, operations={"sample": ops, "summarise": ops},
                 placement=doc["placement"], policies=[{"name": "measured", "veto": {"operation": "summarise"},
                                                         "unless": {"measurement": "image"}}], owner=owner)
    signed = sign_manifest(m, [signer])
    store.put(signed.cid, signed.encode())
    return signed.cid


def test_signed_manifest_by_cid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = Blockstore(tmp_path / "store")
    mcid = signed_two_device(store, {"firmware": identity.DEV_FIRMWARE, "bootstrap": identity.DEV_BOOTSTRAP})
    rc, out, err = agent_run(capsys, str(mcid), "--identity", str(tmp_path / "id"), "--store", str(tmp_path / "store"))
    assert rc == 0, err
    assert out["results"] == {"readings": READINGS, "total": sum(READINGS)}


def test_manifest_whose_references_the_sensor_does_not_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The sensor's self-attestation is contraindicated (its firmware is not the manifest's),
    so the aggregator never registers it and refuses its readings as unattested."""
    store = Blockstore(tmp_path / "store")
    mcid = signed_two_device(store, {"firmware": b"\x01" * 64, "bootstrap": identity.DEV_BOOTSTRAP})
    rc, out, err = agent_run(capsys, str(mcid), "--identity", str(tmp_path / "id"), "--store", str(tmp_path / "store"))
    assert rc == 1 and "total" not in out["results"]
    assert any(r["role"] == "aggregator" and r["reason"].startswith("UnattestedProducer") for r in out["refused"])
    assert "UnattestedProducer" in err


def test_neither_file_nor_cid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "no-such-flow.yaml", "--identity", str(tmp_path / "id"), "--store", str(tmp_path)]) == 1
    assert "neither a flow file nor a manifest CID" in capsys.readouterr().err


def test_identity_keygen_from_cdi_and_self_attestation(tmp_path: Path) -> None:
    from cidboot.errors import CidbootError, VerificationError
    from cidboot.trust.dice.derive import DiceInputs, DiceMode
    from cidboot.trust.dice.software import derive_layers

    root = identity.keygen(tmp_path / "dev")
    with pytest.raises(CidbootError, match="refusing to replace"):
        identity.keygen(tmp_path / "dev")
    dev = identity.development(tmp_path / "dev")
    assert dev.root_public_key is not None and dev.root_public_key.public_bytes_raw() == root.public_bytes_raw()  # type: ignore[union-attr]
    assert identity.development(tmp_path / "dev", role="a").key.public_key() != dev.key.public_key()
    ok = identity.self_attestation(dev, "r", identity.references(None, dev.measurements))
    assert ok.affirming and ok.role == "r" and ok.device_id == dev.root_id
    bad = identity.self_attestation(dev, "r", {**dev.measurements, "image": b"\x00" * 64})
    assert bad.status == "contraindicated"
    layers = [DiceInputs(code_hash=identity.DEV_FIRMWARE, mode=DiceMode.NORMAL)]
    d = derive_layers(b"\x05" * 32, layers)
    on_device = identity.from_cdi(d.cdi_attest, d.chain)
    assert on_device.measurements == {"firmware": identity.DEV_FIRMWARE}
    other = derive_layers(b"\x06" * 32, layers)
    with pytest.raises(VerificationError, match="not the DICE chain's leaf"):
        identity.from_cdi(other.cdi_attest, d.chain)


