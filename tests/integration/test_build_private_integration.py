"""A private image from the real pinned packages (docs/privacy.md, "How to build a private image"):
a marker in an operation's source is in no file of the block store `imagebuilder build` writes, in
no block of the CAR `imagebuilder publish` sends, while the same flow built plain has it (so the
check can fail); two builds with the same secret give the same manifest CID; another secret gives
other CIDs but the same image measurement (verifiers need no secret); the image does carry the
operation and its flow, readable with the layer keys. The private build also names a flow owner
(flow.yaml `owner:`): the manifest carries it, under its signatures (another recipient swapped in
breaks them).

Builds use the default layer cache (hello's kernel, runtime and agent layers are shared with the
other hello builds of a run): a warm encrypted build costs the encryption and hashing of ~30 MB."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cidboot.errors import VerificationError
from cidboot.ipld import dagcbor
from cidboot.ipld.car import CarReader
from cidboot.ipld.cid import CID
from cidboot.ipld.unixfs.exporter import export_file
from cidboot.stage.switch_root import parse_initramfs
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys as signing_keys
from cidboot.trust.manifest import SignedManifest
from cidboot.trust.manifest.signed import KIND_MANIFEST
from cidboot.trust.manifest.verify import verify_threshold
from cidboot.trust.measure import image_code_hash
from cidboot.trust.private import carried, keys
from imagebuilder.commands.inspect import describe
from imagebuilder.commands.publish import write_car
from imagebuilder.lock import relock_if_unavailable

pytestmark = pytest.mark.build  # builds whole images from pinned packages

REPO = Path(__file__).resolve().parents[2]
MARKER = f"cidboot-private-marker-{secrets.token_hex(8)}".encode()


@pytest.fixture
def hello(tmp_path: Path) -> Path:
    """examples/hello with its committed lock (re-locked only if a pin is neither cached nor served,
    as the QEMU harness does): no apt round trip when the packages are cached."""
    d = tmp_path / "hello"
    shutil.copytree(REPO / "examples/hello", d, ignore=shutil.ignore_patterns("keys", "__pycache__", "*arm64*"))
    signing_keys.write_keypair(signing_keys.generate(), d / "keys/signer-1")
    relock_if_unavailable(d / "flow.yaml")
    return d / "flow.yaml"


def _build(flow: Path, *args: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(flow), "--json", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def _holding(root: Path, needle: bytes) -> list[Path]:
    """Every file under `root` (or `root` itself) whose bytes contain `needle`."""
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    return [p for p in files if needle in p.read_bytes()]


def _files(layer: bytes) -> dict[str, bytes]:
    return {m.path: bytes(data) for m, data in parse_initramfs(layer).members}


def test_private_build_publishes_no_plaintext(hello: Path, tmp_path: Path) -> None:
    ops = hello.parent / "ops.py"
    original = ops.read_text()
    ops.write_text(original + f"\nMARKER = {MARKER.decode()!r}\n")
    try:
        # plain: the marker is published (the operation's source block), so the grep below can fail
        _build(hello, "--store", str(tmp_path / "plain"))
        assert _holding(tmp_path / "plain", MARKER)

        owner, other_owner = (subprocess.run([sys.executable, "-m", "imagebuilder", "keygen", "--owner",
                                              str(tmp_path / f"{n}.key")], check=True, cwd=REPO, capture_output=True,
                                             text=True).stdout.strip() for n in ("owner", "other-owner"))
        hello.write_text(hello.read_text() + f"encrypt: true\nowner: {{recipients: [{owner}], seal: all}}\n")
        secret_file = hello.parent / "keys/hello.flow.secret"  # the default: beside the signing key
        subprocess.run([sys.executable, "-m", "imagebuilder", "keygen", "--flow-secret", str(secret_file)],
                       check=True, cwd=REPO, capture_output=True)
        store = tmp_path / "private"
        a = _build(hello, "--store", str(store))
        b = _build(hello, "--car", str(tmp_path / "private.car"), "--flow-secret", str(secret_file))
        assert a["manifest"] == b["manifest"] and a["encrypted"] is True  # same flow + secret, same CIDs

        assert _holding(store, MARKER) == []
        assert _holding(tmp_path / "private.car", MARKER) == []
        bs = Blockstore(store)
        mcid = CID.parse(str(a["manifest"]))
        car = write_car(mcid, bs, str(tmp_path))  # what `imagebuilder publish` sends: the whole DAG, present
        try:
            assert _holding(car.path, MARKER) == []
            with open(car.path, "rb") as f:
                sent = dict(CarReader(f))
        finally:
            car.path.unlink()
        signed = SignedManifest.decode(bs.get(mcid))
        m = signed.manifest
        assert all(lyr.encrypted for lyr in m.layers) and carried.private(m)
        # the owner, as flow.yaml names it, in the manifest and under its signatures
        assert m.owner == {"recipients": [owner], "seal": "all"}
        assert verify_threshold(signed.signatures, signed.payload(), m.root, "manifest", kind=KIND_MANIFEST)
        swapped = dataclasses.replace(m, owner={"recipients": [other_owner], "seal": "all"})
        with pytest.raises(VerificationError):
            verify_threshold(signed.signatures, swapped.encode(), m.root, "manifest", kind=KIND_MANIFEST)
        assert m.flow in sent and set(m.operations.values()) <= set(sent)  # ciphertext, linked and published
        assert b"ops:hello" not in b"".join(sent.values())  # nor the flow in clear

        # the image carries it all: the layer keys open the operations layer (with the marker) and the
        # config layer (with the flow block the agent reads); the measurement is over the plaintext
        secret = keys.load_secret(secret_file)
        plain = {}
        for lyr in m.layers:
            assert lyr.plaintext is not None
            key = keys.layer_key(secret, lyr.plaintext.sha256, lyr.role)
            plain[lyr.role] = b"".join(keys.decrypt_layer(key, export_file(lyr.cid, bs.get),
                                                          sha256=lyr.plaintext.sha256, size=lyr.plaintext.size))
        assert any(MARKER in data for data in _files(plain["operations"]).values())
        flow_block = _files(plain["config"])[carried.FLOW_PATH]
        # the image records its kernel layer's SHA-256, which is the signed plaintext hash: a bootstrap
        # running this kernel knows an encrypted kernel layer is its own (docs/boot-chain.md)
        kernel_layer = m.layers[0]
        assert kernel_layer.role == "kernel" and kernel_layer.plaintext is not None
        assert _files(plain["config"])["etc/cidboot/kernel.sha256"] == kernel_layer.plaintext.sha256.hex().encode() + b"\n"
        assert dagcbor.decode(flow_block)["operations"]["hello"]["implementation"] == "ops:hello"
        assert m.measurements["image"] == image_code_hash(m)

        # inspect: without the secret the flow is "encrypted"; with it, the files and the checked flow
        assert describe(bs, mcid)["flow"] == {"encrypted": True}
        seen = describe(bs, mcid, secret=secret)
        assert set(seen["flow"]["operations"]) == {"hello"}
        assert any(f["path"] == "opt/cidboot/ops/ops.py" for f in seen["layers"][3]["files"])
        with pytest.raises(VerificationError, match="does not decrypt under this flow secret"):
            describe(bs, mcid, secret=bytes(32))

        # another secret: other ciphertext CIDs, the same plaintext and measurement
        other = tmp_path / "other.secret"
        keys.write_secret(other)
        c = _build(hello, "--store", str(tmp_path / "other"), "--flow-secret", str(other))
        mc = SignedManifest.decode(Blockstore(tmp_path / "other").get(CID.parse(str(c["manifest"])))).manifest
        assert not {lyr.cid for lyr in mc.layers} & {lyr.cid for lyr in m.layers} and mc.flow != m.flow
        assert [lyr.plaintext for lyr in mc.layers] == [lyr.plaintext for lyr in m.layers]
        assert mc.measurements["image"] == m.measurements["image"] and mc.owner == m.owner
        assert hashlib.sha256(plain["kernel"]).digest() == m.layers[0].plaintext.sha256  # type: ignore[union-attr]
    finally:
        ops.write_text(original)
