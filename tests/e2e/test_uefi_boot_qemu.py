"""Real UEFI firmware from power-on (issue 14): OVMF (Debian's ovmf, TCG) boots the hello flow by
its own PXE and by UEFI HTTP Boot, loading the bootstrap UKI from `bootstrap serve` with no iPXE
anywhere; the UKI's bootstrap finds its boot config from the DHCP reply (its command line is fixed
at build time), verifies and kexecs the workload, whose agent runs the flow. Without a TPM these
boots are unmeasured, and both sides say so: the verifier never calls them affirming, and the
hello flow's own policy (`only-measured-images-greet`: veto `hello` unless the image is measured)
vetoes the greeting, which is the correct result of an unmeasured boot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qemu.harness.deploy import Deployment, prepare
from qemu.harness.lab import lab

pytestmark = [pytest.mark.qemu, pytest.mark.netns]
REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 900


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return prepare(REPO / "examples/hello/flow.yaml", tmp_path_factory.mktemp("hello-uefi"))


@pytest.mark.parametrize("firmware", ["uefi-pxe", "uefi-http"])
def test_ovmf_boots_hello_to_a_ready_agent_appraised_unmeasured(hello: Deployment, tmp_path: Path, firmware: str) -> None:
    with lab(hello, tmp_path, ["device"]) as lb:
        dev = lb.add_device("device", firmware=firmware)
        lb.power_on()
        lb.wait_ready(BOOT_TIMEOUT)
        text = dev.guest.console.text()
        assert dev.outcome == "ready", f"{dev.outcome}: {dev.reason}\n{text[-3000:]}"
        line, m = dev.guest.wait_for_console(r"cidboot: agent: flow done: (\d+) result", 300)
        text = dev.guest.console.text()
        report = lb.report()
        server_log = (tmp_path / "boot-server.log").read_text()
    d = report["devices"][0]
    assert (d["firmware"], d["arch"], d["boot"]) == (firmware, "x86_64", "unmeasured")
    assert "cidboot-stage: firmware" not in text  # no L0, no iPXE: OVMF loaded the UKI
    assert "iPXE" not in text
    assert "cidboot-stage: bootstrap start mode=unmeasured" in text
    assert "bootconfig=tftp://10.77.0.1/bootconfig/" in text  # found through the DHCP reply
    assert m[1] == "0" and "hello, world" not in json.dumps(d["flow_results"])
    assert "veto: policy only-measured-images-greet vetoes hello" in text
    assert d["appraisal"]["status"] != "affirming"
    assert any("unmeasured" in r for r in d["appraisal"]["reasons"]), d["appraisal"]
    if firmware == "uefi-pxe":  # OVMF's PXE loaded it over TFTP (not a fall-through to HTTP Boot)
        assert "NBP file downloaded successfully" in text, text[-3000:]
        assert "TFTP sent bootstrap-x86_64.efi" in server_log
        assert "Start HTTP Boot" not in text
    else:  # HTTP Boot, PXE off: the DHCP reply named the URL (option 60 HTTPClient)
        assert "Start PXE" not in text
        assert "URI: http://10.77.0.1:8080/boot/bootstrap-x86_64.efi" in text
        assert "HTTPClient:Arch:00016" in server_log
    ready = next(ln.t for ln in dev.guest.console.lines if "agent ready" in ln.text)
    print(f"\n{firmware}: power-on to agent ready {ready:.1f} s, flow done at {line.t:.1f} s (TCG); "
          f"stages {d['boot_timeline']['stage_seconds']}")
