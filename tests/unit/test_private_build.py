"""The build side of private images (docs/privacy.md, "How to build a private image"): flow.yaml's
`encrypt`, the flow secret the build needs (missing, exposed, unused), `keygen --flow-secret`,
encrypted layers and the flow/operation blocks named by ciphertext CIDs, and the agent reading the
flow its encrypted image carries. The whole build (real packages) is
tests/integration/test_build_private_integration.py."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cidboot.dataflow import checks
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.ipld.unixfs.exporter import export_file
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys as signing_keys
from cidboot.trust.manifest import Layer, Manifest, Plaintext, RootOfTrust
from cidboot.trust.private import carried, keys, stream
from imagebuilder import flowfile
from imagebuilder.build import (
    FlowSecretRequired,
    FlowSecretUnused,
    _Collect,
    _flow_blocks,
    build,
    default_secret_path,
)
from imagebuilder.cli import main
from imagebuilder.flowfile import FlowFileError
from imagebuilder.layers import BuiltLayer, layer_cid
from imagebuilder.layers import encrypt as encrypt_layer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SECRET = bytes(range(32))


@pytest.fixture
def hello(tmp_path: Path) -> Path:
    d = tmp_path / "hello"
    shutil.copytree(EXAMPLES / "hello", d, ignore=shutil.ignore_patterns("keys", "flow.lock", "__pycache__"))
    signing_keys.write_keypair(signing_keys.generate(), d / "keys/signer-1")
    return d / "flow.yaml"


def _private(flow: Path) -> Path:
    flow.write_text(flow.read_text() + "encrypt: true\n")
    return flow


def _errors(flow: Path) -> list[str]:
    with pytest.raises(FlowFileError) as exc:
        flowfile.load(flow)
    return [p.replace(f"{flow}:", "F:") for p in exc.value.problems]


# -- flow.yaml: encrypt ---------------------------------------------------------------------------

def test_encrypt_is_off_unless_set(hello: Path) -> None:
    assert flowfile.load(hello).encrypt is False
    assert flowfile.load(_private(hello)).encrypt is True


@pytest.mark.parametrize("value, shown", [("1", "1"), ('"yes"', "'yes'"), ("[true]", "[True]")])
def test_encrypt_must_be_a_bool(hello: Path, value: str, shown: str) -> None:
    hello.write_text(hello.read_text() + f"encrypt: {value}\n")
    assert _errors(hello) == [f"F:42:10: encrypt: {shown} is not of type 'boolean' (schema: type)"]


def test_unknown_top_level_keys_are_still_refused(hello: Path) -> None:
    hello.write_text(hello.read_text() + "encrypted: true\n")
    assert _errors(hello) == ["F:42:1: encrypted: unknown key"]


def test_the_flow_validator_knows_encrypt() -> None:
    """`agent run flow.yaml` reads flow files through cidboot.dataflow.checks: the key is known there
    too, and its type checked (the same validator as the builder's)."""
    doc: dict[str, object] = {"dataflow": {"definitions": {}, "operations": {}}}
    base = checks.check(doc, modules=None, file_keys=True)[1]  # (no module source: one problem of its own)
    assert checks.check({**doc, "encrypt": True}, modules=None, file_keys=True)[1] == base
    problems = checks.check({**doc, "encrypt": "yes"}, modules=None, file_keys=True)[1]
    assert [(p.code, p.path, p.message) for p in problems if p not in base] == [
        ("type", ("encrypt",), "must be true or false, got str")]
    assert [p.path for p in checks.check({**doc, "encrypted": True}, modules=None, file_keys=True)[1]
            if p not in base] == [("encrypted",)]


def test_encrypt_is_for_images_only(hello: Path) -> None:
    hello.write_text(hello.read_text().replace("version: 1\n", "version: 1\ntarget: bootstrap\n") + "encrypt: true\n")
    assert _errors(hello) == ["F:43:10: encrypt: encrypt: true is for images (target: image); a bootstrap is "
                              "loaded by a stage that holds no layer keys"]


# -- the flow secret ------------------------------------------------------------------------------

def test_missing_secret_is_a_usage_error_naming_the_default(hello: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    _private(hello)
    default = hello.parent / "keys/hello.flow.secret"
    assert default_secret_path(flowfile.load(hello)) == default
    with pytest.raises(FlowSecretRequired, match="keys/hello.flow.secret .the default, beside the signing keys."):
        build(hello)
    with pytest.raises(FlowSecretRequired, match="no flow secret at .*elsewhere"):
        build(hello, flow_secret=tmp_path / "elsewhere")
    store = tmp_path / "store"
    assert main(["build", str(hello), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert "imagebuilder keygen --flow-secret" in err and "encrypt: true" in err
    assert not store.exists() or not any(store.rglob("*.cbor"))


def test_exposed_secret_is_refused(hello: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _private(hello)
    path = hello.parent / "keys/hello.flow.secret"
    keys.write_secret(path)
    path.chmod(0o644)
    with pytest.raises(keys.FlowSecretExposedError, match="0644 lets others read"):
        build(hello)
    assert main(["build", str(hello), "--store", str(tmp_path / "store")]) == 1
    assert "chmod 600" in capsys.readouterr().err


def test_a_secret_for_a_plain_flow_is_refused(hello: Path, tmp_path: Path) -> None:
    """Nobody publishes a plain image thinking it private because they passed a secret."""
    keys.write_secret(tmp_path / "s")
    with pytest.raises(FlowSecretUnused, match="does not set `encrypt: true`"):
        build(hello, flow_secret=tmp_path / "s")
    assert main(["build", str(hello), "--flow-secret", str(tmp_path / "s"), "--store", str(tmp_path / "st")]) == 2


def test_keygen_flow_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys/hello.flow.secret"
    assert main(["keygen", "--flow-secret", str(path)]) == 0
    assert capsys.readouterr().out.strip() == str(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    secret = keys.load_secret(path)
    assert len(secret) == 32
    before = path.read_bytes()
    assert main(["keygen", "--flow-secret", str(path)]) == 2  # never overwritten
    assert "refusing to overwrite" in capsys.readouterr().err
    assert path.read_bytes() == before
    # with a signing key in one go, and nothing written when the secret is refused
    assert main(["keygen", "-o", str(tmp_path / "k/signer"), "--flow-secret", str(path)]) == 2
    assert not (tmp_path / "k").exists()
    assert main(["keygen", "-o", str(tmp_path / "k/signer"), "--flow-secret", str(tmp_path / "k/f.secret"),
                 "--json"]) == 0
    assert (tmp_path / "k/signer.pem").is_file() and keys.load_secret(tmp_path / "k/f.secret") != secret
    assert main(["keygen"]) == 2


# -- layers, flow and operation blocks -------------------------------------------------------------

def test_layer_encryption_is_convergent_and_opens_with_the_derived_key() -> None:
    plain = BuiltLayer("operations", b"print('cidboot-private-marker')\n" * 5000, layer_cid(b"x"))
    a, b = encrypt_layer(plain, SECRET), encrypt_layer(plain, SECRET)
    assert a == b and a.cid == layer_cid(a.data) and a.size == stream.ciphertext_size(plain.size)
    assert a.plaintext is not None and a.plaintext.size == plain.size and b"marker" not in a.data
    key = keys.layer_key(SECRET, a.plaintext.sha256, "operations")
    assert b"".join(keys.decrypt_layer(key, [a.data], sha256=a.plaintext.sha256, size=plain.size)) == plain.data
    assert encrypt_layer(plain, bytes(32)).cid != a.cid  # another secret, another ciphertext
    with pytest.raises(ValueError, match="already encrypted"):
        encrypt_layer(a, SECRET)


def test_flow_and_operation_blocks_are_ciphertext_for_an_encrypted_flow(hello: Path) -> None:
    ops = hello.parent / "ops.py"
    ops.write_text(ops.read_text() + "# cidboot-private-marker-unit\n")
    ff = flowfile.load(hello)
    flow_block = dagcbor.encode(ff.data["dataflow"])

    plain = _Collect()
    flow_cid, operations = _flow_blocks(ff, flow_block, None, plain)
    assert flow_cid == CID.of(flow_block, DAG_CBOR) and plain.blocks[flow_cid] == flow_block
    assert any(b"cidboot-private-marker-unit" in b for b in plain.blocks.values())  # the check below can fail

    sealed = _Collect()
    flow_cid, operations = _flow_blocks(ff, flow_block, SECRET, sealed)
    assert flow_cid.codec == RAW and set(operations) == {"hello"}
    assert not any(b"cidboot-private-marker" in b or b"ops:hello" in b for b in sealed.blocks.values())
    key = keys.layer_key(SECRET, hashlib.sha256(flow_block).digest(), carried.FLOW_ROLE)
    assert b"".join(stream.decrypt_chunks(key, [sealed.blocks[flow_cid]])) == flow_block
    src = b"".join(export_file(operations["hello"], sealed.blocks.__getitem__))
    okey = keys.layer_key(SECRET, hashlib.sha256(ops.read_bytes()).digest(), carried.OPERATION_ROLE)
    assert b"".join(stream.decrypt_chunks(okey, [src])) == ops.read_bytes()
    again = _Collect()
    assert _flow_blocks(ff, flow_block, SECRET, again) == (flow_cid, operations) and again.blocks == sealed.blocks


# -- the device: the flow an encrypted image carries ---------------------------------------------------

ROOT = RootOfTrust.from_public_keys([ed25519.Ed25519PrivateKey.generate().public_key()], 1)
FLOW = {"definitions": {"name": {"primitive": "str"}, "greeting": {"primitive": "str"}},
        "operations": {"hello": {"implementation": "ops:hello", "inputs": {"name": "name"},
                                 "outputs": {"greeting": "greeting"}, "stage": "processing"}},
        "seed": [{"definition": "name", "value": "world"}]}


def _manifest(encrypted: bool, flow: CID) -> Manifest:
    lyr = Layer(CID.of(b"c", RAW), 16 + 1, "config", Plaintext(bytes(32), 1)) if encrypted else \
        Layer(CID.of(b"c", RAW), 1, "config")
    return Manifest("hello", 1, int(time.time()) + 3600, (lyr,), ROOT, flow=flow,
                    placement={"device": ["hello"]})


def test_carried_flow_block(tmp_path: Path) -> None:
    block = dagcbor.encode(FLOW)
    assert carried.flow_block(tmp_path, _manifest(False, CID.of(block, DAG_CBOR))) is None
    m = _manifest(True, CID.of(b"ciphertext", RAW))
    assert carried.private(m)
    with pytest.raises(carried.CarriedFlowMissing, match="etc/cidboot/flow.cbor"):
        carried.flow_block(tmp_path, m)
    (tmp_path / carried.FLOW_PATH).parent.mkdir(parents=True)
    (tmp_path / carried.FLOW_PATH).write_bytes(block)
    assert carried.flow_block(tmp_path, m) == block


def test_agent_reads_the_flow_from_its_encrypted_image(tmp_path: Path) -> None:
    """The agent's flow keeps the manifest's CID (provenance links it) while its content comes from
    the image; the store (served, published) holds only what the manifest's CID names."""
    from agent.device import OPS_DIR, flow_context

    ops = tmp_path / OPS_DIR
    ops.mkdir(parents=True)
    (ops / "ops.py").write_text("def hello(name):\n    return {'greeting': 'hello, ' + name}\n")
    (tmp_path / carried.FLOW_PATH).parent.mkdir(parents=True)
    (tmp_path / carried.FLOW_PATH).write_bytes(dagcbor.encode(FLOW))
    store = Blockstore(tmp_path / "store")
    sealed_cid = store.put_block(b"ciphertext of the flow", RAW)
    key = ed25519.Ed25519PrivateKey.generate()
    agent = SimpleNamespace(signed=SimpleNamespace(manifest=_manifest(True, sealed_cid)), store=store, root=tmp_path,
                            config=SimpleNamespace(role="device"),
                            attester=SimpleNamespace(leaf_key=key, measurements={}))
    ctx, flow = flow_context(agent)  # type: ignore[arg-type]
    assert ctx.flow_cid == sealed_cid and set(flow.operations) == {"hello"}
    os.remove(tmp_path / carried.FLOW_PATH)
    with pytest.raises(Exception, match="flow.cbor"):
        flow_context(agent)  # type: ignore[arg-type]


def test_host_agent_run_refuses_a_private_manifest(tmp_path: Path) -> None:
    """On a host the store holds only ciphertext for a private manifest's flow and operations."""
    from agent.commands.run import _from_manifest
    from cidboot.errors import FormatError
    from cidboot.trust.manifest import sign_manifest

    signer = signing_keys.generate()
    root = RootOfTrust.from_public_keys([signer.public_key()], 1)
    store = Blockstore(tmp_path / "store")
    m = _manifest(True, store.put_block(b"ciphertext of the flow", RAW))
    cid = store.put_block(sign_manifest(Manifest(m.name, m.version, m.expires, m.layers, root, flow=m.flow,
                                                 placement=m.placement), [signer]).encode(), DAG_CBOR)
    with pytest.raises(FormatError, match="is a private image .encrypt: true.*run the flow file instead"):
        _from_manifest(cid, store, tmp_path / "ops")


def test_inspect_checks_the_carried_flow_against_the_manifest() -> None:
    """`inspect --flow-secret` trusts the flow an image carries only if it re-encrypts to the
    manifest's CIDs (the device reads that flow under the manifest's flow CID)."""
    from cidboot.ipld.unixfs import import_bytes
    from imagebuilder.commands.inspect import CarriedMismatch, carried_flow
    from imagebuilder.cpio import archive_bytes, compress
    from imagebuilder.initramfs import OPS, Entry
    from imagebuilder.layers import UNIXFS

    block, src = dagcbor.encode(FLOW), b"def hello(name):\n    return {'greeting': name}\n"
    layers = {"config": compress(archive_bytes([Entry.file(carried.FLOW_PATH, block)], 0), "gzip"),
              "operations": compress(archive_bytes([Entry.file(f"{OPS}/ops.py", src)], 0), "gzip")}
    flow_cid = CID.of(keys.encrypt_layer(SECRET, block, carried.FLOW_ROLE).ciphertext, RAW)
    op_cid = import_bytes(keys.encrypt_layer(SECRET, src, carried.OPERATION_ROLE).ciphertext, None, UNIXFS).cid
    m = _manifest(True, flow_cid)
    good = Manifest(m.name, m.version, m.expires, m.layers, ROOT, flow=flow_cid, operations={"hello": op_cid})
    assert carried_flow(good, layers, SECRET) == (FLOW, {op_cid: src})
    with pytest.raises(CarriedMismatch, match="flow block encrypts to"):
        carried_flow(good, layers, bytes(32))
    other = Manifest(m.name, m.version, m.expires, m.layers, ROOT, flow=flow_cid, operations={"hello": flow_cid})
    with pytest.raises(CarriedMismatch, match="operation hello: the image's opt/cidboot/ops/ops.py does not encrypt"):
        carried_flow(other, layers, SECRET)
