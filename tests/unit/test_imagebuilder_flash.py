"""`imagebuilder flash`: a firmware build's files as a board's flash holds them, refused unless
they give the manifest's own L0 reference value (imagebuilder.flash)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.ipld.unixfs import import_bytes
from cidboot.stage.cpio import Entry, archive_bytes
from cidboot.store.blockstore import Blockstore
from cidboot.trust.manifest import Layer, Manifest, Plaintext, RootOfTrust, sign_manifest
from cidboot.trust.measure import boot_code_hash
from cidboot.trust.private.stream import ciphertext_size
from imagebuilder.flash import FlashError, flash_image
from imagebuilder.layers import UNIXFS

REPO = Path(__file__).resolve().parents[2]
SIGNER = ed25519.Ed25519PrivateKey.generate()
ROOT = RootOfTrust.from_public_keys([SIGNER.public_key()], 1)
KERNEL = b"MZ not really a kernel" * 100
RUNTIME = archive_bytes([Entry.file("usr/bin/python3.11", b"\x7fELF" * 50)], mtime=0)
CONFIG = archive_bytes([Entry.file("etc/cidboot/runtime.json", b"{}")], mtime=0)


def _store_manifest(store: Blockstore, measurements: dict[str, bytes], *, encrypted: bool = False) -> CID:
    layers = []
    for role, data in (("kernel", KERNEL), ("runtime", gzip.compress(RUNTIME, mtime=0)), ("config", CONFIG)):
        cid = import_bytes(data, store, UNIXFS).cid
        if encrypted and role == "config":  # refused before any byte is read: only the sizes must agree
            layers.append(Layer(cid, ciphertext_size(len(data)), role, Plaintext(b"\0" * 32, len(data))))
        else:
            layers.append(Layer(cid, len(data), role))
    m = Manifest("firmware", 1, int(time.time()) + 3600, tuple(layers), ROOT, measurements)
    block = sign_manifest(m, [SIGNER]).encode()
    mcid = CID.of(block, DAG_CBOR)
    store.put(mcid, block)
    return mcid


def test_flash_files_are_the_layers_uncompressed_and_give_the_l0_reference(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "store")
    want = boot_code_hash(KERNEL, [RUNTIME + CONFIG])  # what the DICE engine measures: the gzip layer inflated
    mcid = _store_manifest(store, {"firmware": want})
    img = flash_image(store, mcid)
    assert (img.kernel, img.initrd, img.code_hash) == (KERNEL, RUNTIME + CONFIG, want)
    kernel, initrd = img.write(tmp_path / "out")
    assert kernel.read_bytes() == KERNEL and initrd.read_bytes() == RUNTIME + CONFIG
    # the CLI writes the same files and says what L0 will measure
    out = subprocess.run([sys.executable, "-m", "imagebuilder", "flash", str(mcid), "--store", str(store.path),
                          "--out", str(tmp_path / "cli"), "--json"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["code_hash"] == want.hex() and doc["initrd_bytes"] == len(RUNTIME + CONFIG)
    assert (tmp_path / "cli" / "initrd.img").read_bytes() == RUNTIME + CONFIG


def test_refuses_a_manifest_whose_files_do_not_give_its_reference(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "store")
    gzip_hash = boot_code_hash(KERNEL, [gzip.compress(RUNTIME, mtime=0) + CONFIG])  # over the served (gzip) bytes
    with pytest.raises(FlashError, match="not the manifest's L0 reference"):
        flash_image(store, _store_manifest(store, {"firmware": gzip_hash}))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("measurements", "encrypted", "message"), [
    ({}, False, "no `firmware` measurement"),
    ({"bootstrap": b"\1" * 64}, False, "no `firmware` measurement"),
    ({"firmware": b"\1" * 64}, True, "encrypted layers"),
])
def test_refuses_what_has_nothing_to_check_against(tmp_path: Path, measurements: dict[str, bytes], encrypted: bool,
                                                   message: str) -> None:
    store = Blockstore(tmp_path / "store")
    with pytest.raises(FlashError, match=message):
        flash_image(store, _store_manifest(store, measurements, encrypted=encrypted))


def test_cli_refusal_is_one_line_on_stderr_and_exit_1(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "store")
    mcid = _store_manifest(store, {})
    out = subprocess.run([sys.executable, "-m", "imagebuilder", "flash", str(mcid), "--store", str(store.path),
                          "--out", str(tmp_path / "cli")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1 and "no `firmware` measurement" in out.stderr and not out.stdout
    assert not (tmp_path / "cli").exists()
