"""A private image end to end (issue 18, docs/privacy.md): the hello flow with `encrypt: true`,
built by the real image builder and published to a real 2-peer IPFS Cluster (Kubo nodes), served
by `bootstrap serve --key-policy` (the key broker on the boot server's port; its store starts
empty and fetches through `--upstream` from the cluster) to two QEMU devices in one lab run:

- a DICE device boots measured, its bootstrap gets the layer keys with the agent's evidence,
  decrypts in RAM, and the agent is affirming with the right result;
- an unmeasured device (SeaBIOS + iPXE straight into the bootstrap) asks too and gets no key: its
  console and the broker's log name the failing check, and nothing of the image runs.

A marker in the operations layer is in no file of the build's block store, of the boot server's
store (what it cached while serving the boot), or of the cluster peers' Kubo and cluster repos (a
control marker added in clear to a peer is found by the same grep, so the grep would see a leak)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from qemu.harness.deploy import prepare
from qemu.harness.lab import key_decisions, lab

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.kubo, pytest.mark.cluster]
REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 900


def _grep(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def test_private_hello_boots_affirming_and_the_unmeasured_device_gets_no_key(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    marker = b"cidboot-private-marker-" + os.urandom(6).hex().encode()
    flow_dir = tmp_path_factory.mktemp("private-flow") / "hello"
    shutil.copytree(REPO / "examples/hello", flow_dir, ignore=shutil.ignore_patterns("keys", "__pycache__"))
    doc = yaml.safe_load((flow_dir / "flow.yaml").read_text())
    doc["encrypt"] = True
    (flow_dir / "flow.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    with (flow_dir / "ops.py").open("a") as f:
        f.write(f"\nPRIVATE_MARKER = {marker.decode()!r}\n")
    dep = prepare(flow_dir / "flow.yaml", tmp_path_factory.mktemp("private-deploy"))
    assert dep.flow_secret is not None

    control = b"cidboot-control-marker-" + os.urandom(6).hex().encode()
    with lab(dep, tmp_path, ["device", "device"], cluster=2, replication="2:2") as lb:
        assert lb.cluster is not None
        good, unmeasured = lb.add_device("device"), lb.add_device("device", firmware="bios-ipxe")
        lb.power_on()
        lb.wait_ready(BOOT_TIMEOUT)
        assert good.outcome == "ready", f"{good.outcome}: {good.reason}\n{good.guest.console.text()[-3000:]}"
        good.guest.wait_for_console(r"cidboot: result greeting=", 300)
        report = lb.report()
        (tmp_path / "control").write_bytes(control)
        with lb.inside():  # the peers' APIs listen on the lab namespace's loopback
            lb.cluster.peers[0].kubo.ipfs("add", "-Q", str(tmp_path / "control"))
        # ciphertext only: the cluster's repos (Kubo blocks, cluster state), the boot server's cache
        assert _grep(tmp_path / "cluster", control), "the grep finds content stored in clear (control)"
        assert _grep(tmp_path / "cluster", marker) == []
        assert _grep(lb.servers[0].store, marker) == [] and any(lb.servers[0].store.rglob("*.data"))
        assert _grep(dep.store, marker) == []
    d_good, d_bad = report["devices"]
    assert d_good["appraisal"]["status"] == "affirming", "\n".join(d_good["appraisal"]["reasons"])
    assert "hello, world" in json.dumps(d_good["flow_results"])
    assert "cidboot-stage: bootstrap keys layers=" in good.guest.console.text()

    # the unmeasured device: refused at the key step, the check named on its console, no image ran
    assert unmeasured.outcome == "refused", f"{unmeasured.outcome}: {unmeasured.reason}"
    assert unmeasured.reason.startswith("keys: key broker") and "measured-boot: unmeasured boot" in unmeasured.reason
    assert "cidboot-stage: agent" not in unmeasured.guest.console.text()
    decisions = key_decisions(tmp_path)  # one each, in whichever order the two devices asked
    assert sorted(e["decision"] for e in decisions) == ["refuse", "release"], decisions
    release = next(e for e in decisions if e["decision"] == "release")
    refusal = next(e for e in decisions if e["decision"] == "refuse")
    assert release["status"] == "affirming" and len(release["layers"]) == len(dep.workload.result["layers"])
    assert refusal["status"] == "contraindicated" and "measured-boot: unmeasured boot" in refusal["reason"]
    assert any(c["check"] == "measured-boot" and c["status"] == "contraindicated" for c in refusal["checks"])
    assert release["device_id"] != refusal["device_id"]
    assert sorted(k["decision"] for k in report["key_broker"]) == ["refuse", "release"]
