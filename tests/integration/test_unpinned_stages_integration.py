"""Issue 11 #2: appraisal must not affirm stages the signed manifest never pinned.

A workload built without `--reference` has no reference value for firmware and bootstrap; on
main `_check_measurements` skipped those layers and still reported "firmware, bootstrap, image
match the signed manifest", so any firmware and bootstrap were affirmed. Now an unpinned
measured layer makes the result at best `warning`, naming the layers; `imagebuilder build`
warns on stderr and `inspect`/`verify` say which layers are pinned.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cidboot.ipld.cid import CID
from cidboot.trust import keys
from cidboot.trust.manifest import RootOfTrust, SignedManifest

pytestmark = pytest.mark.build  # downloads pinned packages / builds images

REPO = Path(__file__).resolve().parents[2]
ATTACKER_FW, ATTACKER_BS = os.urandom(64), os.urandom(64)  # whatever the attacker flashed


def test_imagebuilder_build_without_reference_warns_and_inspect_verify_show_pinning(tmp_path: Path) -> None:
    d = tmp_path / "hello"
    shutil.copytree(REPO / "examples/hello", d, ignore=shutil.ignore_patterns("keys", "__pycache__"))
    signer = keys.generate()
    keys.write_keypair(signer, d / "keys/signer-1")
    store = tmp_path / "store"
    env = {**os.environ, "CIDBOOT_STORE": str(store)}

    def ib(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "imagebuilder", *args], capture_output=True, text=True, cwd=REPO,
                              timeout=600, env=env)

    built = ib("build", str(d / "flow.yaml"), "--json", "--reference", f"firmware={'ab' * 64}")
    assert built.returncode == 0, built.stderr
    assert "WARNING: no reference value for bootstrap" in built.stderr and "--reference bootstrap=HEX" in built.stderr
    mcid = json.loads(built.stdout)["manifest"]
    info = ib("inspect", mcid, "--no-files", "--json")
    assert json.loads(info.stdout)["pinned"] == {"firmware": True, "bootstrap": False, "image": True}
    text = ib("inspect", mcid, "--no-files").stdout
    assert "pinned   bootstrap: NO" in text and "pinned   firmware: yes" in text
    keys.write_root(_root_of(store, mcid), tmp_path / "root.json")
    v = ib("verify", mcid, "--root", str(tmp_path / "root.json"), "--no-layers")
    assert v.returncode == 0, v.stdout + v.stderr
    assert "! pinned bootstrap: NO reference value" in v.stdout and "✓ pinned firmware" in v.stdout


def _root_of(store: Path, mcid: str) -> RootOfTrust:
    from cidboot.store.blockstore import Blockstore

    return SignedManifest.decode(Blockstore(store).get(CID.parse(mcid))).manifest.root
