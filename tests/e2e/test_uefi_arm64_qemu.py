"""arm64 from power-on (issue 14): AAVMF (Debian's qemu-efi-aarch64) on `qemu-system-aarch64
-machine virt` under TCG boots the hello flow built for arm64 (examples/hello/flow-arm64.yaml) by
UEFI HTTP Boot: the DHCP reply to arch 19 names the arm64 bootstrap UKI's URL (option 60
HTTPClient), the UKI (Debian's linuxaa64.efi.stub, the arm64 cloud kernel, the bootstrap
initramfs) verifies the arm64 manifest and hands over to the workload, whose agent runs the flow.
Without a TPM the boot is unmeasured: the verifier never calls it affirming, and the hello flow's
own policy vetoes the greeting, which is the correct result of an unmeasured boot. One boot checks
the firmware, the architecture of what ran, the offer, the hand-over and the appraisal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qemu.harness.deploy import Deployment, prepare
from qemu.harness.lab import lab

pytestmark = [pytest.mark.qemu, pytest.mark.netns]
REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 1200  # an upper bound for a loaded 2-core host; the test waits for console markers


@pytest.fixture(scope="module")
def hello_arm64(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return prepare(REPO / "examples/hello/flow.yaml", tmp_path_factory.mktemp("hello-arm64"), arch="arm64")


def test_aavmf_http_boots_arm64_hello_to_a_ready_agent_appraised_unmeasured(hello_arm64: Deployment,
                                                                            tmp_path: Path) -> None:
    assert hello_arm64.arch == "arm64" and "bootstrap-arm64.efi" in {p.name for p in hello_arm64.bootstrap.uki.values()}
    with lab(hello_arm64, tmp_path, ["device"]) as lb:
        dev = lb.add_device("device", firmware="uefi-http")
        assert dev.guest.spec.arch == "arm64"
        lb.power_on()
        lb.wait_ready(BOOT_TIMEOUT)
        text = dev.guest.console.text()
        assert dev.outcome == "ready", f"{dev.outcome}: {dev.reason}\n{text[-3000:]}"
        line, m = dev.guest.wait_for_console(r"cidboot: agent: flow done: (\d+) result", 300)
        text = dev.guest.console.text()
        report = lb.report()
        server_log = (tmp_path / "boot-server.log").read_text()
        argv = json.loads((dev.guest.dir / "qemu.argv.json").read_text())
    d = report["devices"][0]
    assert (d["firmware"], d["arch"], d["boot"]) == ("uefi-http", "arm64", "unmeasured")
    assert argv[0] == "qemu-system-aarch64" and "virt" in argv and any("AAVMF_CODE.fd" in a for a in argv)
    # AAVMF's HTTP Boot fetched the arm64 UKI from the URL the arch-19 reply named
    assert "URI: http://10.77.0.1:8080/boot/bootstrap-arm64.efi" in text, text[-3000:]
    assert "HTTPClient:Arch:00019" in server_log
    assert "Start PXE" not in text and "iPXE" not in text and "cidboot-stage: firmware" not in text
    # what booted is the arm64 manifest, whose kernel is an arm64 Image (magic "ARM\x64" at 0x38)
    assert f"booted manifest {hello_arm64.workload.manifest}" in " ".join(d["appraisal"]["reasons"])
    assert hello_arm64.workload.kernel.read_bytes()[0x38:0x3C] == b"ARM\x64"
    assert "cidboot-stage: bootstrap start mode=unmeasured" in text
    assert "bootconfig=tftp://10.77.0.1/bootconfig/" in text
    assert m[1] == "0" and "hello, world" not in json.dumps(d["flow_results"])
    assert "veto: policy only-measured-images-greet vetoes hello" in text
    assert d["appraisal"]["status"] != "affirming"
    assert any("unmeasured" in r for r in d["appraisal"]["reasons"]), d["appraisal"]
    ready = next(ln.t for ln in dev.guest.console.lines if "agent ready" in ln.text)
    print(f"\nuefi-http arm64: power-on to agent ready {ready:.1f} s, flow done at {line.t:.1f} s (TCG); "
          f"stages {d['boot_timeline']['stage_seconds']}")
