"""Same-kernel hand-over (issue 13, ADR 0007) from power-on, on real QEMU guests (TCG).

One deployment whose firmware and bootstrap are *debug builds*: their images carry
/etc/cidboot/handover-check, so each puts probes of the secrets it held (SHA-256 + 4-byte
prefix of its CDIs) into the hand-off and the next stage prints what it can reach of them
(`cidboot: handover-check: ...`, cidboot.stage.switch_root). The flag is inside the measured
initrd: a debug firmware has its own code hash, never a production one.

- boot 1: every stage pins the same kernel, so both hand-overs are switch_root, and every stage
  ships the same runtime layer, so both keep the running runtime's files (the bootstrap does not
  even fetch the image's runtime layer); appraised affirming with the right result; the next
  stages find no dice.cbor, no qemu_fw_cfg, none of the previous stage's CDI bytes in any file
  they can reach (kept runtime files included);
- boot 2: the same images with `cidboot.handover=kexec` on the firmware's command line: both
  hand-overs kexec, appraised affirming against the same reference values.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from cidboot.trust import keys
from qemu.harness import deploy
from qemu.harness.deploy import Deployment
from qemu.harness.lab import Device, lab
from tests.e2e.test_e2e_boot import BOOT_TIMEOUT, checks, console_results

pytestmark = [pytest.mark.qemu, pytest.mark.netns]
REPO = Path(__file__).resolve().parents[2]
CHECK_RX = re.compile(r"cidboot: handover-check: stage=(?P<stage>\w+) (?P<rest>.*)$")


def _debug_build(flow: Path) -> Path:
    """Add the handover-check flag file to a copied stage flow (test builds only)."""
    doc = yaml.safe_load(flow.read_text())
    (flow.parent / "handover-check").write_text("debug build: the next stage reports what it can reach\n")
    doc["image"].setdefault("files", {})["etc/cidboot/handover-check"] = "handover-check"
    flow.write_text(yaml.safe_dump(doc, sort_keys=False))
    return flow


@pytest.fixture(scope="module")
def debug_hello(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """deploy.prepare for examples/hello, with debug builds of the firmware and bootstrap."""
    work = tmp_path_factory.mktemp("handover-deploy")
    store = work / "store"
    flow = REPO / "examples/hello/flow.yaml"
    deploy.check_flow(flow)
    wl_flow = deploy._copy_flow(flow.parent, work / "workload")
    wl_doc = yaml.safe_load(wl_flow.read_text())
    fw = deploy.build(_debug_build(deploy._copy_flow(deploy.FIRMWARE_FLOW.parent, work / "firmware")), store)
    bs_flow = deploy._copy_flow(deploy.BOOTSTRAP_FLOW.parent, work / "bootstrap")
    keys.write_root(deploy._root_of(wl_flow.parent, wl_doc), bs_flow.parent / "trust-anchor.json")
    bs = deploy.build(_debug_build(bs_flow), store)
    refs = {"firmware": fw.measurements["firmware"], "bootstrap": bs.measurements["bootstrap"]}
    wl = deploy.build(wl_flow, store, references=refs)
    return Deployment(work, store, wl_flow.parent, wl_doc, fw, bs, wl,
                      [wl_flow.parent / k for k in wl_doc["trust"]["keys"]])


def handover_checks(dev: Device) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for line in dev.guest.console.lines:
        m = CHECK_RX.search(line.text)
        if m:
            out[m["stage"]] = dict(kv.split("=", 1) for kv in m["rest"].split())
    return out


def boot(dep: Deployment, out: Path) -> tuple[Device, dict[str, Any]]:
    with lab(dep, out, ["device"]) as lb:
        dev = lb.add_device("device")
        lb.power_on()
        lb.wait_ready(BOOT_TIMEOUT)
        assert dev.outcome == "ready", f"{dev.outcome}: {dev.reason}\n{dev.guest.console.text()[-3000:]}"
        dev.guest.wait_for_console(r"cidboot: result greeting=", 300)
        report = lb.report()
    return dev, report["devices"][0]


def assert_nothing_of_the_previous_stage(dev: Device) -> None:
    found = handover_checks(dev)
    assert set(found) == {"bootstrap", "agent"}, dev.guest.console.text()[-3000:]
    for stage, facts in found.items():
        assert facts["dice.cbor"] == "gone", (stage, facts)
        assert facts["qemu_fw_cfg"] == "absent" and facts["sysfs_fw_cfg"] == "absent", (stage, facts)
        assert facts["probes"] == "2" and facts["secrets_found"] == "0", (stage, facts)
        assert int(facts["files"]) > 100, (stage, facts)  # it did search the whole root


def test_same_kernel_handover_is_affirming_and_leaves_nothing_of_the_previous_stage(
        debug_hello: Deployment, tmp_path: Path) -> None:
    dev, d = boot(debug_hello, tmp_path)
    text = dev.guest.console.text()
    assert text.count("cidboot-stage: handover switch_root") == 2, text[-3000:]
    assert "cidboot-stage: handover kexec" not in text
    # both hand-overs kept the running runtime (every stage ships the same runtime layer), and the
    # bootstrap did not fetch the image's runtime layer: it is its own (docs/boot-chain.md)
    kept = [int(k) for k in re.findall(r"cidboot-stage: handover switch_root files=\d+ kept=(\d+)", text)]
    assert len(kept) == 2 and all(k > 100 for k in kept), kept
    assert re.search(r"cidboot: bootstrap: manifest=\S+ .* kernel=running runtime=running ", text), text[-3000:]
    # nor the firmware the bootstrap's runtime layer over TFTP: boot.ipxe lists it as its own initrd
    assert re.search(r"cidboot: firmware: ip=\S+ kernel=running runtime=running ", text), text[-3000:]
    # one DHCP exchange per power-on: the bootstrap and the agent use the firmware's lease
    assert text.count("from the previous stage's lease (same kernel") == 2, text[-3000:]
    assert "bootstrap: dhcp: offer" not in text and "agent: dhcp: offer" not in text, text[-3000:]
    assert d["appraisal"]["status"] == "affirming", checks(d)
    assert console_results(dev)["greeting"] == "hello, world"
    assert d["measurements"] == {k: v for k, v in debug_hello.workload.measurements.items()
                                 if k in ("firmware", "bootstrap", "image")}
    assert_nothing_of_the_previous_stage(dev)
    print("same-kernel stage seconds:", d["boot_timeline"]["stage_seconds"])


def test_forced_kexec_handover_is_affirming_with_the_same_measurements(debug_hello: Deployment, tmp_path: Path) -> None:
    cmdline = str(debug_hello.firmware.result.get("cmdline") or "console=ttyS0 quiet panic=-1")
    forced = replace(debug_hello, firmware=replace(debug_hello.firmware, result={
        **debug_hello.firmware.result, "cmdline": f"{cmdline} cidboot.handover=kexec"}))
    dev, d = boot(forced, tmp_path)
    text = dev.guest.console.text()
    assert text.count("cidboot-stage: handover kexec") == 2, text[-3000:]
    assert "cidboot-stage: handover switch_root" not in text
    # a kexec'ed kernel has another boot id (and an unconfigured NIC): each stage asks DHCP again
    assert text.count("not reusing the previous stage's lease: obtained in another kernel boot") == 2, text[-3000:]
    assert d["appraisal"]["status"] == "affirming", checks(d)
    assert console_results(dev)["greeting"] == "hello, world"
    assert d["measurements"] == {k: v for k, v in debug_hello.workload.measurements.items()
                                 if k in ("firmware", "bootstrap", "image")}
    assert_nothing_of_the_previous_stage(dev)
    print("kexec stage seconds:", d["boot_timeline"]["stage_seconds"])
