"""`imagebuilder build --reference NAME=HEX`: reference measurements of the stages below land in
the signed manifest; an image build records the DICE image-layer code hash (layer CIDs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.manifest import SignedManifest
from cidboot.trust.measure import image_code_hash

pytestmark = pytest.mark.build  # downloads pinned packages / builds images

REPO = Path(__file__).resolve().parents[2]
FW, BS = "ab" * 64, "cd" * 64


def test_image_build_records_references_and_the_image_layer_hash(tmp_path: Path) -> None:
    d = tmp_path / "hello"
    shutil.copytree(REPO / "examples/hello", d, ignore=shutil.ignore_patterns("keys", "__pycache__"))
    keys.write_keypair(keys.generate(), d / "keys/signer-1")
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(d / "flow.yaml"), "--json", "--store",
                           str(store), "--reference", f"firmware={FW}", "--reference", f"bootstrap={BS}"],
                          capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    m = SignedManifest.decode(Blockstore(store).get(CID.parse(json.loads(proc.stdout)["manifest"]))).manifest
    assert m.measurements == {"firmware": bytes.fromhex(FW), "bootstrap": bytes.fromhex(BS),
                              "image": image_code_hash(m)}
    bad = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(d / "flow.yaml"), "--store",
                          str(tmp_path / "s2"), "--reference", "firmware=00"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert bad.returncode != 0 and "a code hash is 64 bytes" in bad.stderr
    assert not (tmp_path / "s2").exists()
