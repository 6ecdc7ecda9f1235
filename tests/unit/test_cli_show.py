"""`imagebuilder show`: every kind of block cidboot writes decodes by CID, as text and JSON;
`cat` and `inspect` point to `show` for blocks that are not theirs; `cat` paths go through
DAG-CBOR (CID/manifest/layers/0/cid)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.cli import main as agent_main
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.ipld.unixfs.importer import import_bytes
from cidboot.store.blockstore import Blockstore
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.cose_key import key_id, raw_public_bytes
from cidboot.trust.dice.derive import DiceInputs
from cidboot.trust.dice.software import derive_layers
from cidboot.trust.eat import build_evidence, ueid_for
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from cidboot.trust.measure import code_hash_of_blobs
from cidboot.trust.registry import sign_registry
from imagebuilder.cli import main

REPO = Path(__file__).resolve().parents[2]
KERNEL = b"not really a kernel\n" * 20_000  # several chunks: a dag-pb file root over raw leaves
EXPIRES = 1_900_000_000  # 2030-03-17T17:46:40Z


@dataclass
class Fixture:
    store: Path
    cids: dict[str, CID]


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    tmp = tmp_path_factory.mktemp("show")
    store = Blockstore(tmp / "store")
    cids: dict[str, CID] = {}
    # provenance nodes, audit entries and the flow block, as `agent run` writes them
    rc = agent_main(["run", str(REPO / "examples/hello/flow.yaml"), "--identity", str(tmp / "id"),
                     "--store", str(tmp / "store"), "--json", "-q"])
    assert rc == 0
    signer = ed25519.Ed25519PrivateKey.generate()
    kernel = import_bytes(KERNEL, store)
    cids["file"] = kernel.cid
    cids["raw"] = store.put_block(b"hello, raw block\n", RAW)
    flow = next(c for c in _dag_cbor_blocks(store) if "operations" in dagcbor.decode(store.get(c)))
    cids["flow"] = flow
    m = Manifest("hello", 3, EXPIRES, (Layer(kernel.cid, len(KERNEL), "kernel"),),
                 RootOfTrust.from_public_keys([signer.public_key()], 1),
                 {"firmware": code_hash_of_blobs([b"fw"])}, flow=flow)
    signed = sign_manifest(m, [signer])
    store.put(signed.cid, signed.encode())
    cids["signed"] = signed.cid
    cids["manifest"] = store.put_block(m.encode(), DAG_CBOR)
    for c in _dag_cbor_blocks(store):
        doc = dagcbor.decode(store.get(c))
        if isinstance(doc, dict) and "input" in doc:
            cids["provenance"] = c if doc["input"]["operation"] else cids.get("provenance", c)
        if isinstance(doc, dict) and "entry" in doc and doc["entry"]["prev"] is not None:
            cids["audit"] = c
    dev = derive_layers(os.urandom(32), [DiceInputs(code_hash=code_hash_of_blobs([b"fw"])),
                                         DiceInputs(code_hash=code_hash_of_blobs([b"bs"]))])
    ev = build_evidence(nonce=b"\x07" * 16, leaf_key=dev.leaf_key, chain=dev.chain,
                        ueid=ueid_for(raw_public_bytes(dev.root_public_key)), measurements={"firmware": b"\x01" * 64},
                        manifest_cid=signed.cid, role="device", iat=EXPIRES)
    cids["eat"] = store.put_block(ev, RAW)
    chain = cbor2.loads(dev.chain)
    cids["cert"] = store.put_block(cbor2.dumps(chain[1]), RAW)
    cids["chain"] = store.put_block(dev.chain, RAW)
    roots = DeviceRoots()
    cids["device_id"] = roots.add(dev.root_public_key, "board-1")  # type: ignore[assignment]
    cids["registry"] = store.put_block(sign_registry(roots, [signer]), DAG_CBOR)
    cids["signer"] = key_id(signer.public_key()).hex()  # type: ignore[assignment]
    return Fixture(tmp / "store", cids)


def _dag_cbor_blocks(store: Blockstore) -> list[CID]:
    return [CID(1, DAG_CBOR, mh) for mh in store.multihashes()
            if _is_cbor(store, CID(1, DAG_CBOR, mh))]


def _is_cbor(store: Blockstore, cid: CID) -> bool:
    try:
        dagcbor.decode(store.get(cid))
        return True
    except Exception:
        return False


def show(capsys: pytest.CaptureFixture[str], fx: Fixture, *argv: str) -> tuple[int, str, str]:
    rc = main(["show", *argv, "--store", str(fx.store)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def show_json(capsys: pytest.CaptureFixture[str], fx: Fixture, *argv: str) -> dict[str, Any]:
    rc, out, err = show(capsys, fx, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


@pytest.mark.parametrize("name,kind", [
    ("signed", "signed-manifest"), ("manifest", "manifest"), ("flow", "flow"), ("provenance", "provenance-node"),
    ("audit", "audit-entry"), ("eat", "eat"), ("cert", "dice-cert"), ("chain", "dice-chain"),
    ("registry", "device-registry"), ("file", "unixfs-file"), ("raw", "raw"),
])
def test_every_block_kind_we_write_is_recognised(capsys: pytest.CaptureFixture[str], fx: Fixture, name: str,
                                                 kind: str) -> None:
    doc = show_json(capsys, fx, str(fx.cids[name]))
    assert doc["kind"] == kind and "note" not in doc, doc
    rc, text, _ = show(capsys, fx, str(fx.cids[name]))
    assert rc == 0 and text.splitlines()[0] == f"{fx.cids[name]}  {kind}, {doc['size']} bytes"


def test_signed_manifest_readable_iso_dates_hex_and_signers(capsys: pytest.CaptureFixture[str], fx: Fixture) -> None:
    doc = show_json(capsys, fx, str(fx.cids["signed"]))
    m = doc["value"]["manifest"]
    assert m["expires"] == "2030-03-17T17:46:40Z" and m["flow"] == str(fx.cids["flow"])
    assert m["layers"] == [{"role": "kernel", "cid": str(fx.cids["file"]), "size": len(KERNEL)}]
    assert len(m["measurements"]["firmware"]) == 128  # hex of 64 bytes
    assert doc["value"]["signatures"][0] == {"kid": fx.cids["signer"], "alg": "EdDSA"}
    assert m["root"]["keys"][0]["key_id"] == fx.cids["signer"]  # keys by key id, not COSE_Key hex
    _, text, _ = show(capsys, fx, str(fx.cids["signed"]))
    assert "expires: 2030-03-17T17:46:40Z" in text and "{'" not in text and "b'" not in text


def test_provenance_node_shows_value_origin_and_checks_its_signature(capsys: pytest.CaptureFixture[str],
                                                                    fx: Fixture) -> None:
    v = show_json(capsys, fx, str(fx.cids["provenance"]))["value"]
    assert v["definition"] == "greeting" and v["value"] == "hello, world" and v["origin"] == "hello:greeting"
    assert v["signature"].startswith("valid") and len(v["producer"]["key_id"]) > 0


def test_eat_and_dice_chain_decoded(capsys: pytest.CaptureFixture[str], fx: Fixture) -> None:
    v = show_json(capsys, fx, str(fx.cids["eat"]))["value"]
    assert v["nonce"] == "07" * 16 and v["iat"] == "2030-03-17T17:46:40Z" and v["manifest"] == str(fx.cids["signed"])
    assert len(v["dice_chain"]) == 3 and "root_key" in v["dice_chain"][0]
    assert all(len(c["code_hash"]) == 128 for c in v["dice_chain"][1:]) and v["signature"]["alg"] == "EdDSA"
    cert = show_json(capsys, fx, str(fx.cids["cert"]))["value"]
    assert len(cert["code_hash"]) == 128 and cert["issuer"] and cert["subject"]


def test_registry_lists_devices(capsys: pytest.CaptureFixture[str], fx: Fixture) -> None:
    v = show_json(capsys, fx, str(fx.cids["registry"]))["value"]
    assert v["devices"][0]["name"] == "board-1" and v["devices"][0]["id"] == fx.cids["device_id"]


def test_depth_follows_links_each_block_once(capsys: pytest.CaptureFixture[str], fx: Fixture) -> None:
    doc = show_json(capsys, fx, str(fx.cids["signed"]), "--depth", "1")
    kinds = {c["name"]: c.get("kind") for c in doc["linked"]}
    assert kinds["manifest/layers/0/cid"] == "unixfs-file" and kinds["manifest/flow"] == "flow"
    assert all("linked" not in c for c in doc["linked"])  # depth 1 stops there
    audit = show_json(capsys, fx, str(fx.cids["audit"]), "--depth", "5")
    prev = next(c for c in audit["linked"] if c["name"] == "entry/prev")
    assert prev["kind"] == "audit-entry" and prev["value"]["seq"] == audit["value"]["seq"] - 1


def test_path_through_dag_cbor(capsys: pytest.CaptureFixture[str], fx: Fixture) -> None:
    doc = show_json(capsys, fx, f"{fx.cids['signed']}/manifest/flow")
    assert doc["cid"] == str(fx.cids["flow"]) and doc["kind"] == "flow"


def test_cat_follows_dag_cbor_paths_to_file_bytes(capsysbinary: pytest.CaptureFixture[bytes], fx: Fixture) -> None:
    rc = main(["cat", f"{fx.cids['signed']}/manifest/layers/0/cid", "--store", str(fx.store)])
    assert rc == 0 and capsysbinary.readouterr().out == KERNEL


def test_cat_of_a_dag_cbor_block_points_to_show(capsys: pytest.CaptureFixture[str], fx: Fixture) -> None:
    """Was: "is dag-cbor, not a UnixFS file"."""
    for target in (str(fx.cids["provenance"]), f"{fx.cids['signed']}/manifest/flow"):
        rc = main(["cat", target, "--store", str(fx.store)])
        out = capsys.readouterr()
        assert rc == 1 and out.out == ""
        assert "imagebuilder show" in out.err and out.err.startswith("imagebuilder: error: ")


def test_inspect_of_a_raw_block_points_to_show(capsys: pytest.CaptureFixture[str], fx: Fixture) -> None:
    """Was: "271 trailing bytes after the value"."""
    for name in ("eat", "provenance"):
        rc = main(["inspect", str(fx.cids[name]), "--store", str(fx.store)])
        err = capsys.readouterr().err
        assert rc == 1 and "trailing bytes" not in err and f"imagebuilder show {fx.cids[name]}" in err


def test_missing_block_and_bad_depth(capsys: pytest.CaptureFixture[str], fx: Fixture, tmp_path: Path) -> None:
    absent = CID.of(b"absent", RAW)
    rc, out, err = show(capsys, fx, str(absent))
    assert rc == 1 and out == "" and "not in the store" in err
    rc, _, err = show(capsys, fx, str(fx.cids["raw"]), "--depth", "-1")
    assert rc == 2 and "--depth" in err
    store = Blockstore(tmp_path / "s")
    dangling = store.put_block(dagcbor.encode({"x": absent}), DAG_CBOR)
    rc = main(["show", str(dangling), "--store", str(tmp_path / "s"), "--depth", "1", "--json"])
    linked = json.loads(capsys.readouterr().out)["linked"][0]
    assert rc == 0 and linked == {"name": "x", "cid": str(absent), "missing": "not in the store"}
