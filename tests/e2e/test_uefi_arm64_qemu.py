"""arm64 from power-on (issues 14 and 15): AAVMF (Debian's qemu-efi-aarch64) on `qemu-system-aarch64
-machine virt` under TCG, with the device's swtpm as a `tpm-tis-device`, boots the hello flow built
for arm64 (examples/hello/flow-arm64.yaml) by UEFI HTTP Boot: the DHCP reply to arch 19 names the
arm64 bootstrap UKI's URL (option 60 HTTPClient), AAVMF measures the UKI into the TPM (PCR 4) and
its stub the sections (PCR 11), the UKI (Debian's linuxaa64.efi.stub, the arm64 cloud kernel with
its tpm_tis module, the bootstrap initramfs) derives CDI_1 from the TPM, verifies the arm64
manifest, extends PCR 15 and hands over to the workload, whose agent quotes and runs the flow.
The factory's known-good boot records the firmware baseline (`Lab.enrol`), then the device is
appraised **affirming** with a fresh nonce (`boot: tpm-measured`), against the arm64 UKI's
references the signed registry carries beside the x86_64 ones' (one set per arch), and the hello
flow's policy lets the measured image greet. One boot checks the firmware, the architecture of
what ran, the offer, the hand-over, the TPM measurements and the appraisal. (The unmeasured UEFI
path, no TPM, is the x86_64 tests/e2e/test_uefi_boot_qemu.py's: the stage code is the same.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cidboot.store.blockstore import Blockstore
from cidboot.trust.appraisal import DeviceRoots, appraise
from cidboot.trust.manifest import SignedManifest
from cidboot.trust.registry import verify_signed_registry
from cidboot.trust.tpm import eventlog
from cidboot.trust.tpm.appraise import TpmReferences
from cidboot.trust.tpm.eventlog import EV_EFI_BOOT_SERVICES_APPLICATION
from cidboot.trust.tpm.reference import uki_digest
from qemu.harness import tpm as harness_tpm
from qemu.harness.deploy import Deployment, prepare
from qemu.harness.lab import lab

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.tpm]
REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 1200  # an upper bound for a loaded 2-core host; the test waits for console markers


@pytest.fixture(scope="module")
def hello_arm64(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return prepare(REPO / "examples/hello/flow.yaml", tmp_path_factory.mktemp("hello-arm64"), arch="arm64")


def test_aavmf_swtpm_http_boots_arm64_hello_to_a_ready_agent_appraised_affirming(hello_arm64: Deployment,
                                                                                 tmp_path: Path) -> None:
    if harness_tpm.missing():
        pytest.skip(str(harness_tpm.missing()))
    dep = hello_arm64
    assert dep.arch == "arm64" and "bootstrap-arm64.efi" in {p.name for p in dep.bootstrap.uki.values()}
    with lab(dep, tmp_path, ["device"], tpm=True) as lb:
        dev = lb.add_device("device", firmware="uefi-http")
        assert dev.guest.spec.arch == "arm64"
        lb.power_on()
        lb.wait_ready(BOOT_TIMEOUT)
        text = dev.guest.console.text()
        assert dev.outcome == "ready", f"{dev.outcome}: {dev.reason}\n{text[-3000:]}"
        line, m = dev.guest.wait_for_console(r"cidboot: agent: flow done: (\d+) result", 300)
        baseline = lb.enrol(dev)  # the factory's known-good boot: its firmware PCRs
        nonce = os.urandom(32)
        proc = lb.net.run(["curl", "-sf", "--max-time", "60", f"{dev.url}/attestation?nonce={nonce.hex()}"],
                          capture_output=True, timeout=90)
        assert proc.returncode == 0, f"GET /attestation: {proc.returncode}"
        evidence = proc.stdout
        text = dev.guest.console.text()
        report = lb.report()  # `agent attest` with its own fresh nonce, --uki the arm64 UKI as built
        server_log = (tmp_path / "boot-server.log").read_text()
        argv = json.loads((dev.guest.dir / "qemu.argv.json").read_text())
        uki = lb.built_uki().read_bytes()
        assert lb.registry is not None
        registry = verify_signed_registry(Blockstore(dep.store).get(lb.registry),
                                          SignedManifest.decode(Blockstore(dep.store).get(dep.workload.manifest))
                                          .manifest.root)
    d = report["devices"][0]
    assert (d["firmware"], d["arch"], d["boot"]) == ("uefi-http", "arm64", "tpm-measured")
    assert argv[0] == "qemu-system-aarch64" and "virt" in argv and any("AAVMF_CODE.fd" in a for a in argv)
    assert "tpm-tis-device,tpmdev=tpm0" in argv
    # AAVMF's HTTP Boot fetched the arm64 UKI from the URL the arch-19 reply named
    assert "URI: http://10.77.0.1:8080/boot/bootstrap-arm64.efi" in text, text[-3000:]
    assert "HTTPClient:Arch:00019" in server_log
    assert "Start PXE" not in text and "iPXE" not in text and "cidboot-stage: firmware" not in text
    # what booted is the arm64 manifest, whose kernel is an arm64 Image (magic "ARM\x64" at 0x38)
    assert f"booted manifest {dep.workload.manifest}" in " ".join(d["appraisal"]["reasons"])
    assert dep.workload.kernel.read_bytes()[0x38:0x3C] == b"ARM\x64"
    assert "bootconfig=tftp://10.77.0.1/bootconfig/" in text
    # TPM-measured: the bootstrap found the TIS TPM (tpm_tis module) and AAVMF's event log
    assert "cidboot-stage: bootstrap start mode=measured root=tpm" in text, text[-3000:]
    assert d["appraisal"]["status"] == "affirming", d["appraisal"]
    for check in ("tpm.firmware", "tpm.pcr4-uki", "tpm.pcr11-sections", "tpm.pcr15-manifest"):
        assert any(r.startswith(f"affirming: {check}:") for r in d["appraisal"]["reasons"]), (check, d["appraisal"])
    # the measured image greets (the flow's policy vetoes only unmeasured images)
    assert m[1] != "0" and "hello, world" in json.dumps(d["flow_results"]), d["flow_results"]
    assert "veto: policy only-measured-images-greet" not in text
    # the signed registry carries the arm64 UKI's references (one set per arch): an agent or the
    # fleet appraises this device affirming with them alone, no UKI at hand
    assert registry.tpm_references is not None and set(registry.tpm_references) == {"arm64"}
    assert list(registry.tpm_references["arm64"].applications) == list(TpmReferences.for_uki(uki).applications)
    roots = DeviceRoots.load(tmp_path / "device-roots.json")
    manifest = SignedManifest.decode(Blockstore(dep.store).get(dep.workload.manifest)).manifest
    res = appraise(evidence, expected_nonce=nonce, roots=roots, manifest=manifest, manifest_cid=dep.workload.manifest,
                   tpm_references=registry.tpm_references)
    assert res.status == "affirming", res.to_obj()
    replayed = appraise(evidence, expected_nonce=os.urandom(32), roots=roots, manifest=manifest,
                        manifest_cid=dep.workload.manifest, tpm_references=registry.tpm_references)
    assert replayed.status == "contraindicated"  # the same evidence for another challenge
    # what AAVMF measured into PCR 4: the arm64 UKI as built, then its kernel (LoadImage by the stub)
    from cidboot.trust.eat import parse_evidence

    ev = parse_evidence(evidence)
    assert ev.boot_mode == "tpm-measured" and ev.tpm is not None
    (tmp_path / "aavmf-eventlog.bin").write_bytes(ev.tpm.uefi_log)  # for inspection: tpm2_eventlog FILE
    (tmp_path / "aavmf-evidence.cbor").write_bytes(evidence)  # tests/vectors/tpm/aavmf-evidence.cbor comes from here
    log = eventlog.parse(ev.tpm.uefi_log)
    apps = [e.sha256 for e in log.events if e.pcr == 4 and e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION]
    assert apps[0] == uki_digest(uki)
    per_pcr = {i: sum(1 for e in log.events if e.pcr == i and e.event_type != eventlog.EV_NO_ACTION) for i in range(16)}
    ready = next(ln.t for ln in dev.guest.console.lines if "agent ready" in ln.text)
    print(f"\nuefi-http arm64 --tpm: power-on to agent ready {ready:.1f} s, flow done at {line.t:.1f} s (TCG); "
          f"stages {d['boot_timeline']['stage_seconds']}; AAVMF log {len(ev.tpm.uefi_log)} bytes, "
          f"{len(log.events)} events, banks {log.spec_id.algorithms}; firmware baseline PCRs {sorted(baseline)}; "
          f"PCR 15 events {len(ev.tpm.bootstrap_events)}; AAVMF events per PCR {per_pcr}")
    print(f"appraisal: {json.dumps(d['appraisal'])[:2500]}")
