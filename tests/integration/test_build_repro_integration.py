"""Reproducible builds from the real pinned Debian packages: same flow -> same manifest CID;
one changed operation -> only the operations layer and the manifest change; stale pins fail
clearly and write nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cidboot.ipld.car import CarReader
from cidboot.ipld.unixfs.exporter import export_file
from cidboot.stage import dccache
from cidboot.stage.switch_root import parse_initramfs
from cidboot.store.blockstore import Blockstore
from cidboot.trust.manifest import SignedManifest
from tests.support.hello_flow import build_json

pytestmark = pytest.mark.build  # downloads pinned packages / builds images

REPO = Path(__file__).resolve().parents[2]


def _roles(res: dict[str, object]) -> dict[str, str]:
    layers = res["layers"]
    assert isinstance(layers, list)
    return {lyr["role"]: lyr["cid"] for lyr in layers}


def test_same_flow_twice_same_manifest_then_one_op_changes_one_layer(hello: Path, tmp_path: Path,
                                                                    warm_cache: Path) -> None:
    store = tmp_path / "store"
    a = build_json(hello, warm_cache, "--store", str(store))
    b = build_json(hello, tmp_path / "cache-b", "--car", str(tmp_path / "out.car"))
    assert a["manifest"] == b["manifest"]
    assert _roles(a) == _roles(b)
    assert list(_roles(a)) == ["kernel", "runtime", "agent", "operations", "config"]
    assert not any(lyr["cached"] for lyr in b["layers"])  # type: ignore[attr-defined]

    # the store holds a verifiable manifest naming exactly these layers, and every layer's bytes
    bs = Blockstore(store)
    from cidboot.ipld.cid import CID

    signed = SignedManifest.decode(bs.get(CID.parse(str(a["manifest"]))))
    assert {str(lyr.cid): lyr.role for lyr in signed.manifest.layers} == {v: k for k, v in _roles(a).items()}
    ops_layer = next(lyr for lyr in signed.manifest.layers if lyr.role == "operations")
    # the agent layer carries its start path's dataclass code (cidboot.stage.dccache), the same bytes in both builds
    agent_layer = next(lyr for lyr in signed.manifest.layers if lyr.role == "agent")
    members = parse_initramfs(b"".join(export_file(agent_layer.cid, bs.get))).members
    table = dccache.decode(next(bytes(c) for m, c in members if m.path == dccache.TABLE_PATH.lstrip("/")))
    assert len(table) > 100  # the hello image's agent, cidboot and their stdlib: ~400 texts
    assert len(b"".join(export_file(ops_layer.cid, bs.get))) == ops_layer.size
    assert signed.manifest.placement == {"device": ["hello"]}

    # the CAR holds the same blocks, rooted at the manifest
    with open(tmp_path / "out.car", "rb") as f:
        r = CarReader(f)
        blocks = dict(r)
        assert [str(c) for c in r.roots] == [a["manifest"]]
    assert len(blocks) == a["blocks"]

    # a warm rebuild reuses every layer
    warm = build_json(hello, warm_cache, "--store", str(store))
    assert warm["manifest"] == a["manifest"]
    assert all(lyr["cached"] for lyr in warm["layers"])  # type: ignore[attr-defined]

    # change one operation's code: only the operations layer (and the manifest) change
    ops = hello.parent / "ops.py"
    original = ops.read_text()
    try:
        ops.write_text(original.replace('f"hello, {name}"', 'f"hi, {name}"'))
        c = build_json(hello, warm_cache, "--store", str(store))
    finally:
        ops.write_text(original)
    changed = {k for k in _roles(a) if _roles(a)[k] != _roles(c)[k]}
    assert changed == {"operations"}
    assert c["manifest"] != a["manifest"]
    assert c["operations"] != a["operations"]


def test_stale_pin_fails_with_refresh_hint_and_writes_nothing(hello: Path, tmp_path: Path) -> None:
    d = tmp_path / "stale"
    shutil.copytree(hello.parent, d)
    lock = json.loads((d / "flow.lock").read_text())
    abi = lock["meta"]["linux-image-cloud-amd64"]["resolves_to"]  # the flow names the metapackage
    lock["debs"][abi]["version"] = "6.1.0-gone"
    lock["debs"][abi]["filename"] = "gone.deb"
    (d / "flow.lock").write_text(json.dumps(lock))
    store = tmp_path / "store"
    env = {**os.environ, "CIDBOOT_BUILD_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(d / "flow.yaml"), "--store", str(store)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 1
    assert f"pinned {abi} 6.1.0-gone is not served by the configured apt mirrors" in proc.stderr
    assert (f"the lock {d / 'flow.lock'} is stale: run `imagebuilder lock --update {d / 'flow.yaml'}` "
            "to re-resolve its pins to what the mirror serves now") in proc.stderr
    assert not store.exists()




_CRYPTO_PROBE = """
import sys
sys.path[:0] = sys.argv[1:]
import cryptography, hashlib, ssl
from cidboot.trust.cose_key import raw_public_bytes
from cidboot.trust.dice import derive
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
cdi = bytes(range(64))
out = [raw_public_bytes(derive.key_from_cdi(cdi, alg).public_key()).hex() for alg in ("ed25519", "p256", "p384")]
out.append(derive.key_from_cdi(cdi).sign(b"manifest").hex())  # Ed25519: deterministic (RFC 8032)
out.append(derive.kdf(64, b"ikm", b"salt", b"info").hex())
out.append(ChaCha20Poly1305(bytes(32)).encrypt(bytes(12), b"layer", b"aad").hex())
out.append(hashlib.sha256(b"block").hexdigest())
print(cryptography.__version__, *out)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot into the built image needs root")
def test_the_images_crypto_stack_makes_the_hosts_bytes(hello: Path, tmp_path: Path, warm_cache: Path) -> None:
    """The small-L1 hello variant (examples/hello/flow-small.yaml) runs Debian's
    python3-cryptography 38 over the runtime's libssl3, the host the pinned wheel 48
    (docs/images.md, "One OpenSSL"): in a chroot of the built image (its own interpreter,
    libraries and OpenSSL modules, nothing of the host), DICE key derivation (Ed25519, P-256,
    P-384), an Ed25519 signature, HKDF, ChaCha20-Poly1305 and SHA-256 give the host's bytes."""
    from imagebuilder import flowfile
    from imagebuilder.cpio import decompress, iter_newc
    from imagebuilder.lock import lock_path, make_lock

    small = hello.with_name("flow-small.yaml")  # locked afresh like hello (tests/support/hello_flow.py)
    lock_path(small).write_text(make_lock(flowfile.load(small)).to_json())
    store = tmp_path / "store"
    res = build_json(small, warm_cache, "--store", str(store))
    bs = Blockstore(store)
    from cidboot.ipld.cid import CID

    root = tmp_path / "root"
    for lyr in res["layers"]:  # type: ignore[attr-defined]
        if lyr["role"] == "kernel":
            continue
        for m, data in iter_newc(decompress(b"".join(export_file(CID.parse(lyr["cid"]), bs.get)))):
            dest = root / m.path
            if m.mode & 0o170000 == 0o040000:
                dest.mkdir(parents=True, exist_ok=True)
            elif m.mode & 0o170000 == 0o120000:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.unlink(missing_ok=True)
                dest.symlink_to(data.decode())
            elif m.mode & 0o170000 == 0o100000:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                dest.chmod(m.mode & 0o777)
    (root / "probe.py").write_text(_CRYPTO_PROBE)
    guest = subprocess.run(["chroot", str(root), "/usr/bin/python3.11", "-IS", "/probe.py", "/opt/cidboot",
                            "/opt/cidboot/lib"], capture_output=True, text=True, timeout=120)
    assert guest.returncode == 0, guest.stderr[-2000:]
    host = subprocess.run([sys.executable, "-c", _CRYPTO_PROBE, str(REPO)], capture_output=True, text=True, timeout=120)
    assert host.returncode == 0, host.stderr[-2000:]
    (g_version, *g_bytes), (h_version, *h_bytes) = guest.stdout.split(), host.stdout.split()
    assert g_version.startswith("38.") and g_version != h_version
    assert g_bytes == h_bytes and len(g_bytes) == 7
