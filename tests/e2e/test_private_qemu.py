"""A private image end to end (issue 18, docs/privacy.md): the hello flow with `encrypt: true`,
built by the real image builder and published to a real 2-peer IPFS Cluster (Kubo nodes), served
by `bootstrap serve --key-policy` (the key broker on the boot server's port; its store starts
empty and fetches through `--upstream` from the cluster) to two QEMU devices in one lab run:

- a DICE device boots measured, its bootstrap gets the layer keys with the agent's evidence,
  decrypts in RAM (all but the kernel layer, which is its own running kernel by the signed
  plaintext SHA-256: docs/boot-chain.md), and the agent is affirming with the right result;
- an unmeasured device (SeaBIOS + iPXE straight into the bootstrap) asks too and gets no key: its
  console and the broker's log name the failing check, and nothing of the image runs.

The flow also has an owner (`imagebuilder keygen --owner`, `seal: all`: an encrypted image hides
its flow, seed values included, so its provenance must not publish the seed in clear either): the
device's console and /results show the greeting only as a sealed CID, the agent publishes the
result's provenance to the cluster, a third party (empty store, no owner key, the flow and the
device's appraisal) fetches it from a peer's gateway and validates the chain blind (only the
sealed seed's value check is left unchecked), and `imagebuilder show CID --key` opens it for the
owner and refuses another key.

A marker in the operations layer and one in the result (the seed, so the greeting too) are in no
file of the build's block store, of the boot server's store (what it cached while serving the
boot), or of the cluster peers' Kubo and cluster repos (a control marker added in clear to a peer
is found by the same grep, so the grep would see a leak).

The unmeasured device is refused for the root cause, `measured-boot` (docs/trust.md, "Which
failing check a refusal names"), not for its effect `device`: in the broker's log and on its
console."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.attested import AttestedAgents
from agent.commands.attest import get_evidence
from agent.validate import Validator
from cidboot.dataflow.model import DataFlow
from cidboot.dataflow.provenance import decode
from cidboot.dataflow.sealing import decode_sealed
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID
from cidboot.ipld.unixfs.exporter import export_file
from cidboot.stage.switch_root import parse_initramfs
from cidboot.store.blockstore import Blockstore
from cidboot.store.cluster import ClusterClient
from cidboot.store.gateway.client import fetch
from cidboot.trust.appraisal import DeviceRoots, appraise
from cidboot.trust.cose_key import decode_public_key, raw_public_bytes
from cidboot.trust.manifest import Manifest, SignedManifest
from cidboot.trust.private import carried, keys
from qemu.harness.deploy import prepare
from qemu.harness.lab import key_decisions, lab

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.kubo, pytest.mark.cluster]
REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 900


def _grep(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=REPO, timeout=300)


def _flow_of(store: Path, m: Manifest, secret_file: Path) -> DataFlow:
    """The flow as a third party the owner gave it to reads it: the plain flow block the image
    carries (its config layer, opened with the flow secret: the manifest names only ciphertext)."""
    bs = Blockstore(store)
    cfg = next(lyr for lyr in m.layers if lyr.role == "config")
    assert cfg.plaintext is not None
    key = keys.layer_key(keys.load_secret(secret_file), cfg.plaintext.sha256, cfg.role)
    plain = b"".join(keys.decrypt_layer(key, export_file(cfg.cid, bs.get), sha256=cfg.plaintext.sha256,
                                        size=cfg.plaintext.size))
    block = {mb.path: bytes(data) for mb, data in parse_initramfs(plain).members}[carried.FLOW_PATH]
    return DataFlow.from_obj(dagcbor.decode(block))


def test_private_hello_boots_affirming_and_the_unmeasured_device_gets_no_key(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    marker = b"cidboot-private-marker-" + os.urandom(6).hex().encode()
    result_marker = "cidboot-result-marker-" + os.urandom(6).hex()  # the seed, hence the greeting
    owner_dir = tmp_path_factory.mktemp("owner")
    owner_key, other_key = owner_dir / "owner.key", owner_dir / "other.key"
    keygen = _cli("imagebuilder", "keygen", "--owner", str(owner_key))
    assert keygen.returncode == 0 and _cli("imagebuilder", "keygen", "--owner", str(other_key)).returncode == 0
    flow_dir = tmp_path_factory.mktemp("private-flow") / "hello"
    shutil.copytree(REPO / "examples/hello", flow_dir, ignore=shutil.ignore_patterns("keys", "__pycache__"))
    doc = yaml.safe_load((flow_dir / "flow.yaml").read_text())
    doc["encrypt"] = True
    doc["owner"] = {"recipients": [keygen.stdout.strip()], "seal": "all"}
    doc["dataflow"]["seed"] = [{"definition": "name", "value": result_marker}]
    (flow_dir / "flow.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    with (flow_dir / "ops.py").open("a") as f:
        f.write(f"\nPRIVATE_MARKER = {marker.decode()!r}\n")
    dep = prepare(flow_dir / "flow.yaml", tmp_path_factory.mktemp("private-deploy"))
    assert dep.flow_secret is not None

    control = b"cidboot-control-marker-" + os.urandom(6).hex().encode()
    signed = SignedManifest.decode(Blockstore(dep.store).get(dep.workload.manifest))
    m = signed.manifest
    assert m.owner is not None and m.owner["seal"] == "all"  # in the signed manifest (imagebuilder build)
    third = Blockstore(tmp_path / "third-party")
    with lab(dep, tmp_path, ["device", "device"], cluster=2, replication="2:2", publish_results=True) as lb:
        assert lb.cluster is not None
        good, unmeasured = lb.add_device("device"), lb.add_device("device", firmware="bios-ipxe")
        lb.power_on()
        lb.wait_ready(BOOT_TIMEOUT)
        assert good.outcome == "ready", f"{good.outcome}: {good.reason}\n{good.guest.console.text()[-3000:]}"
        good.guest.wait_for_console(r"cidboot: agent: flow done", 300)  # the result was published before
        report = lb.report()
        greeting = next(r for r in lb.results(good)["results"] if r["definition"] == "greeting")
        sealed, prov = CID.parse(greeting["value"]["sealed"]), CID.parse(greeting["provenance"])
        client = ClusterClient(lb.cluster.peers[0].rest_url)
        roots = DeviceRoots.load(lb.roots_file)
        attested = AttestedAgents()
        with lb.inside():  # the peers' APIs listen on the lab namespace's loopback
            client.wait_pinned(prov, 2, timeout=180)  # the device published it; both peers hold it (2:2)
            fetch(prov, [f"http://127.0.0.1:{lb.cluster.peers[1].kubo.gateway_port}"], third)
            nonce = os.urandom(32)
            assert good.url
            res = appraise(get_evidence(good.url, nonce, 30), expected_nonce=nonce, roots=roots, manifest=m,
                           manifest_cid=signed.cid)
            assert res.affirming, [c.to_obj() for c in res.checks]
            attested.add(res)
            (tmp_path / "control").write_bytes(control)
            lb.cluster.peers[0].kubo.ipfs("add", "-Q", str(tmp_path / "control"))
        # ciphertext only: the cluster's repos (Kubo blocks, cluster state), the boot server's cache
        assert _grep(tmp_path / "cluster", control), "the grep finds content stored in clear (control)"
        for needle in (marker, result_marker.encode()):
            assert _grep(tmp_path / "cluster", needle) == []
            assert _grep(lb.servers[0].store, needle) == [] and any(lb.servers[0].store.rglob("*.data"))
            assert _grep(dep.store, needle) == []
            assert _grep(third.path, needle) == []
    d_good, d_bad = report["devices"]
    assert d_good["appraisal"]["status"] == "affirming", "\n".join(d_good["appraisal"]["reasons"])
    console = good.guest.console.text()
    # the kernel layer is the bootstrap's own kernel (its signed plaintext SHA-256 is kernel.sha256),
    # and the runtime layer its own runtime (its signed plaintext SHA-256 is runtime.json's): both left
    # unfetched and undecrypted, the hand-over in the running kernel keeping the running runtime;
    # every other layer decrypted
    assert f"cidboot-stage: bootstrap keys layers={len(m.layers) - 2} " in console
    assert re.search(r"cidboot: bootstrap: manifest=\S+ .* kernel=running runtime=running ", console), console[-3000:]
    assert re.search(r"cidboot-stage: handover switch_root files=\d+ kept=[1-9]", console), console[-3000:]

    # the owner's result: on the device only as a sealed CID, nowhere in clear
    assert f'cidboot: result greeting={{"sealed": "{sealed}"}}' in console
    assert result_marker not in console and result_marker not in json.dumps(report)
    # published, fetched by a third party without any key, validated blind: every check but the sealed
    # seed's value (the only one that reads a value), which is listed, not passed
    decode_sealed(third.get(sealed), sealed)
    node = decode(third.get(prov), prov)
    assert node.sealed == sealed and node.value is None
    authority = frozenset(raw_public_bytes(decode_public_key(k)) for k in m.root.keys)
    assert m.flow is not None and dep.flow_secret is not None
    v = Validator(_flow_of(dep.store, m, dep.flow_secret), m.flow, m.placement, attested, third.get, authority,
                  blind=True)
    assert v.validate(prov).origin == "hello:greeting"
    assert len(v.unchecked) == 1 and "(name, sealed): seed value" in v.unchecked[0], v.unchecked
    # the owner opens it (from the third party's copy); another key is refused
    shown = _cli("imagebuilder", "show", str(prov), "--store", str(third.path), "--key", str(owner_key))
    assert shown.returncode == 0, shown.stderr
    assert f"value: hello, {result_marker}" in shown.stdout
    wrong = _cli("imagebuilder", "show", str(prov), "--store", str(third.path), "--key", str(other_key))
    assert wrong.returncode == 1 and "not the flow owner's key" in wrong.stderr and result_marker not in wrong.stdout

    # the unmeasured device: refused at the key step, the check named on its console, no image ran
    assert unmeasured.outcome == "refused", f"{unmeasured.outcome}: {unmeasured.reason}"
    assert unmeasured.reason.startswith("keys: key broker") and "measured-boot: unmeasured boot" in unmeasured.reason
    # named for the root cause (its unknown root key, `device`, is the effect, listed after it)
    named = f"refused the keys of manifest {dep.workload.manifest}: measured-boot: appraisal contraindicated"
    assert named in unmeasured.reason and named in unmeasured.guest.console.text()
    assert "cidboot-stage: agent" not in unmeasured.guest.console.text()
    decisions = key_decisions(tmp_path)  # one each, in whichever order the two devices asked
    assert sorted(e["decision"] for e in decisions) == ["refuse", "release"], decisions
    release = next(e for e in decisions if e["decision"] == "release")
    refusal = next(e for e in decisions if e["decision"] == "refuse")
    assert release["status"] == "affirming" and len(release["layers"]) == len(dep.workload.result["layers"])
    assert refusal["status"] == "contraindicated" and refusal["check"] == "measured-boot", refusal
    assert refusal["reason"].index("measured-boot: unmeasured boot") < refusal["reason"].index("device: unknown device")
    assert any(c["check"] == "measured-boot" and c["status"] == "contraindicated" for c in refusal["checks"])
    assert release["device_id"] != refusal["device_id"]
    assert sorted(k["decision"] for k in report["key_broker"]) == ["refuse", "release"]
