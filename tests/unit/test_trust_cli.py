"""The trust CLIs end to end: keygen, root, sign, verify (with rollback state), verify-evidence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.cose_key import key_id
from cidboot.trust.dice.derive import DiceInputs
from cidboot.trust.dice.software import derive_layers
from cidboot.trust.eat import build_evidence
from cidboot.trust.keys import load_private_key
from cidboot.trust.manifest import SignedManifest
from cidboot.trust.measure import image_inputs


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=60)


def test_keygen_sign_verify_and_evidence(tmp_path: Path) -> None:
    env = {"CIDBOOT_STORE": str(tmp_path / "store")}
    for name in ("a", "b", "c"):
        r = cli("imagebuilder", "keygen", "-o", str(tmp_path / name), env=env)
        assert r.returncode == 0 and len(r.stdout.strip()) == 64
    assert oct((tmp_path / "a.pem").stat().st_mode)[-3:] == "600"
    assert cli("imagebuilder", "keygen", "-o", str(tmp_path / "a"), env=env).returncode == 1  # never overwrite
    cli("imagebuilder", "root", *(str(tmp_path / f"{n}.pub") for n in "abc"), "--threshold", "2",
        "-o", str(tmp_path / "root.json"), env=env)
    (tmp_path / "kernel").write_bytes(b"k" * 1000)
    layer = cli("imagebuilder", "add", "-q", str(tmp_path / "kernel"), env=env).stdout.split()[-1]

    def sign(version: int, *keys: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / "m.yaml").write_text(
            f"name: hello\nversion: {version}\nexpires: +1d\nroot: root.json\n"
            f"layers:\n  - {{cid: {layer}, size: 1000, role: kernel}}\n"
            f"measurements: {{firmware: '{'00' * 64}', bootstrap: '{'01' * 64}'}}\n")  # pinned: else at best a warning
        return cli("imagebuilder", "sign", str(tmp_path / "m.yaml"), *(f"--key={tmp_path}/{k}.pem" for k in keys), env=env)

    v2 = sign(2, "a", "b").stdout.strip()
    state = str(tmp_path / "state.json")
    ok = cli("imagebuilder", "verify", v2, "--root", str(tmp_path / "root.json"), "--state", state, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "✓ signatures: 2 of threshold 2" in ok.stdout and "✓ layer kernel" in ok.stdout
    one_key = sign(3, "a").stdout.strip()
    bad = cli("imagebuilder", "verify", one_key, "--root", str(tmp_path / "root.json"), "--json", env=env)
    assert bad.returncode == 1 and json.loads(bad.stdout)["checks"][-1]["check"] == "ThresholdError"
    v1 = sign(1, "b", "c").stdout.strip()
    rb = cli("imagebuilder", "verify", v1, "--root", str(tmp_path / "root.json"), "--state", state, env=env)
    assert rb.returncode == 1 and "✗ RollbackError" in rb.stdout

    # a device booted manifest v2; a verifier appraises its evidence
    signed = SignedManifest.decode(Blockstore(tmp_path / "store").get(CID.parse(v2)))
    signer_ids = [key_id(load_private_key(tmp_path / f"{k}.pem").public_key()) for k in "ab"]
    dev = derive_layers(os.urandom(32), [DiceInputs(code_hash=bytes(64)), DiceInputs(code_hash=bytes([1]) * 64),
                                         image_inputs(CID.parse(v2), signed.manifest, signer_ids)])
    roots = DeviceRoots()
    roots.add(dev.root_public_key, "board-1")
    roots.save(tmp_path / "roots.json")
    nonce = os.urandom(16)
    (tmp_path / "ev").write_bytes(build_evidence(nonce=nonce, leaf_key=dev.leaf_key, chain=dev.chain, ueid=b"\x01" * 17,
                                                 measurements={}, manifest_cid=CID.parse(v2)))
    ev = cli("agent", "verify-evidence", str(tmp_path / "ev"), "--nonce", nonce.hex(), "--roots", str(tmp_path / "roots.json"),
             "--manifest", v2, "--json", env=env)
    assert ev.returncode == 0, ev.stdout + ev.stderr
    assert json.loads(ev.stdout)["status"] == "affirming"
    replay = cli("agent", "verify-evidence", str(tmp_path / "ev"), "--nonce", os.urandom(16).hex(), "--roots",
                 str(tmp_path / "roots.json"), "--manifest", v2, env=env)
    assert replay.returncode == 1 and "✗ nonce" in replay.stdout and "status: contraindicated" in replay.stdout
