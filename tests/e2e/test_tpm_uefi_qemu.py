"""A measured UEFI boot with a real (software) TPM, appraised end to end.

Factory: a fresh swtpm is manufactured (EK certificate from a local CA) and, over tpm2-tools'
`tpm2_send`, asked for the primary AK of a fixed template in the endorsement hierarchy: a primary
key is derived from the TPM's seed, so its name is the device's AK name for life; it is enrolled.

Boot: OVMF + that swtpm (tpm-tis) PXE-boot a UKI that imagebuilder.uki assembled from Debian's
systemd stub and the bootstrap's Debian kernel, with a probe initramfs (busybox, no TPM tools)
that recreates the AK and quotes PCRs 0-7, 9, 11 over the verifier's fresh nonce with raw TPM
commands on /dev/tpm0, then prints the quote, the AK's public area, the firmware's event log
(/sys/kernel/security/tpm0/binary_bios_measurements) and the PCRs as the kernel reads them.

The first boot is enrolment's: verified with the AK alone (not affirming: no firmware baseline
yet), its firmware PCRs (0-3, 5-7) become the baseline. The second boot is appraised in full, on
what OVMF, the stub and the TPM really did: the quote verifies with the enrolled AK over that
boot's nonce, OVMF's log replays to the quoted PCRs (and to the kernel's reads), the firmware PCRs
equal the baseline, PCR 4 holds our Authenticode hashes of the UKI and of its .linux, PCR 11 the
stub's section events as derived from the UKI's bytes. Refused: boot 1's quote against boot 2's
nonce, another AK, a cut log, another firmware baseline, a UKI with one other byte. The probe UKI stands in for
the bootstrap UKI (same stub, same kernel, same assembly code; the bootstrap does not quote yet).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest

from cidboot.ipld.cid import CID
from cidboot.stage.cpio import Entry, archive_bytes
from cidboot.store.blockstore import Blockstore
from cidboot.trust.appraisal import DeviceRoots, TpmDevice
from cidboot.trust.cose_key import decode_public_key, raw_public_bytes
from cidboot.trust.dice.chain import verify_chain
from cidboot.trust.eat import Evidence, parse_evidence
from cidboot.trust.manifest import SignedManifest
from cidboot.trust.tpm import commands, eventlog, quote
from cidboot.trust.tpm.appraise import FIRMWARE_PCRS, TpmAppraisal, TpmEnrolment, TpmReferences, appraise_tpm
from cidboot.trust.tpm.errors import (
    AkNotEnrolledError,
    NonceMismatchError,
    PcrDigestMismatchError,
    ReferenceMismatchError,
)
from cidboot.trust.tpm.eventlog import EV_EFI_BOOT_SERVICES_APPLICATION
from cidboot.trust.tpm.evidence import qualifying_data
from cidboot.trust.tpm.pe import authenticode_digest
from cidboot.trust.tpm.reference import uki_digest
from imagebuilder import uki
from qemu.harness.deploy import Deployment, prepare
from qemu.harness.lab import Device, Lab, lab
from qemu.harness.vm import Guest
from tests.support.swtpm import Swtpm

pytestmark = [pytest.mark.qemu, pytest.mark.tpm]
DEBS = Path.home() / ".cache/cidboot/debs"
CMDLINE = "console=ttyS0 panic=-1 quiet"
REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 900

QUOTED = [0, 1, 2, 3, 4, 5, 6, 7, 9, 11]
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t securityfs securityfs /sys/kernel/security
echo "probe: tpm $(cat /sys/class/tpm/tpm0/tpm_version_major 2>&1)"
tpm() {  # one command file to /dev/tpm0, its response to a file; TPM_RC_RETRY (0x922) is retried
  for try in 1 2 3 4 5 6 7 8; do
    exec 3<>/dev/tpm0
    cat "$1" >&3
    dd bs=4096 count=1 <&3 >"$2" 2>/dev/null
    exec 3>&-
    [ "$(dd if="$2" bs=1 skip=6 count=4 2>/dev/null | od -An -tx1 | tr -d ' \\n')" = "00000922" ] || break
  done
}
dump() { echo "$1-BEGIN"; base64 "$2"; echo "$1-END"; }
tpm /ak.cmd /tmp/ak.resp
{ cat /quote.head; dd if=/tmp/ak.resp bs=1 skip=10 count=4 2>/dev/null; cat /quote.tail; } >/tmp/quote.cmd
tpm /tmp/quote.cmd /tmp/quote.resp
dump AK /tmp/ak.resp
dump QUOTE /tmp/quote.resp
dump TPMLOG /sys/kernel/security/tpm0/binary_bios_measurements
for i in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do
  echo "PCR $i $(cat /sys/class/tpm/tpm0/pcr-sha256/$i)"
done
echo "probe: done"
poweroff -f
"""


def _kernel(tmp: Path) -> bytes:
    debs = sorted(DEBS.glob("linux-image-*-amd64_*.deb"))
    if not debs:
        pytest.skip(f"no Debian kernel package in {DEBS} (an image build downloads it)")
    out = tmp / "kernel"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(out)], check=True)
    return next((out / "boot").glob("vmlinuz-*")).read_bytes()


def _factory_ak(base: Path) -> bytes:
    """Manufacture the device's swtpm and learn its AK name (what enrolment records)."""
    with Swtpm(base) as tpm:
        for _ in range(8):
            resp = tpm.send(commands.create_primary_ak())
            if resp[6:10] != bytes.fromhex("00000922"):  # TPM_RC_RETRY
                break
        return quote.parse_public(commands.parse_create_primary(resp)[1]).name


def _section(text: list[str], name: str) -> bytes:
    b, e = text.index(f"{name}-BEGIN"), text.index(f"{name}-END")
    return base64.b64decode("".join(text[b + 1:e]))


@dataclass
class Boot:
    """One power-on of the device: the UKI it booted, what its probe printed, the nonce it quoted."""

    image: bytes
    initrd: bytes
    nonce: bytes
    log: bytes
    ak_public: bytes
    attest: bytes
    signature: bytes
    kernel_pcrs: dict[int, bytes]
    t_done: float


def _boot(tmp: Path, name: str, kernel: bytes, tpm_base: Path) -> Boot:
    """Power the device on with a probe UKI quoting over a fresh nonce; collect what it prints."""
    nonce = os.urandom(32)  # the verifier's challenge (a real device gets it over the network)
    whole = commands.quote(0, nonce, QUOTED)  # the guest splices in the handle CreatePrimary returns
    head, tail = whole[:10], whole[14:]
    busybox = shutil.which("busybox") or "/bin/busybox"
    initrd = archive_bytes([Entry.directory("bin"), Entry.file("bin/busybox", Path(busybox).read_bytes(), 0o755),
                            Entry.file("init", INIT.encode(), 0o755), Entry.file("ak.cmd", commands.create_primary_ak()),
                            Entry.file("quote.head", head), Entry.file("quote.tail", tail)])
    image = uki.build_uki(uki.stub_path("amd64").read_bytes(), kernel, initrd, CMDLINE, uki.os_release("tpm-probe", 1))
    tftp = tmp / f"tftp-{name}"
    tftp.mkdir()
    (tftp / "probe.efi").write_bytes(image)
    with Swtpm(tpm_base, qemu=True) as tpm, \
            Guest.create(name, tmp / name, firmware="uefi", user_tftp=tftp, bootfile="probe.efi",
                         boot_from_network=True, tpm=tpm.ctrl_socket) as g:
        g.wait_for_console(r"probe: tpm 2", 600)
        done, _ = g.wait_for_console(r"probe: done", 120)
        g.wait_for_exit(60)
        text = [ln.text.strip() for ln in g.console.lines]
    raw = _section(text, "TPMLOG")
    (tmp / f"{name}-eventlog.bin").write_bytes(raw)  # for inspection: tpm2_eventlog NAME-eventlog.bin
    attest, signature = commands.parse_quote(_section(text, "QUOTE"))
    return Boot(image, initrd, nonce, raw, commands.parse_create_primary(_section(text, "AK"))[1], attest, signature,
                {int(t.split()[1]): bytes.fromhex(t.split()[2]) for t in text if t.startswith("PCR ")}, done.t)


def _appraise(b: Boot, enrolment: TpmEnrolment, **kw: object) -> TpmAppraisal:
    args: dict[str, object] = dict(attest=b.attest, signature=b.signature, ak_public=b.ak_public, event_log=b.log,
                                   nonce=b.nonce, enrolment=enrolment, required_pcrs=QUOTED)
    args.update(kw)
    if "references" not in args:
        args["references"] = TpmReferences.for_uki(b.image)
    return appraise_tpm(**args)  # type: ignore[arg-type]


def test_ovmf_swtpm_boots_of_a_uki_are_enrolled_then_appraised_from_real_quotes_and_event_logs(tmp_path: Path) -> None:
    enrolled_ak = _factory_ak(tmp_path / "swtpm")
    kernel = _kernel(tmp_path)

    # boot 1, at the factory: verified with the AK alone; its firmware PCRs become the baseline
    first = _boot(tmp_path, "enrol", kernel, tmp_path / "swtpm")
    seen = _appraise(first, TpmEnrolment(frozenset({enrolled_ak})))
    assert not seen.affirming and "firmware" in seen.warnings[0]
    assert quote.parse_public(first.ak_public).name == enrolled_ak  # the same primary AK the factory saw
    enrolment = TpmEnrolment(frozenset({enrolled_ak}), {i: seen.pcrs[i] for i in FIRMWARE_PCRS})

    # boot 2, in the field: the whole appraisal against the enrolment and the UKI's own references
    b = _boot(tmp_path, "field", kernel, tmp_path / "swtpm")
    t = time.perf_counter()
    refs = TpmReferences.for_uki(b.image)  # hashing the 16 MB UKI: done once per UKI, not per appraisal
    t_refs = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    result = _appraise(b, enrolment, references=refs)
    dt = (time.perf_counter() - t) * 1000
    assert result.affirming
    assert result.checks == ("ak enrolled", "quote signature", "nonce fresh", "event log replays to quoted PCRs",
                             "firmware PCRs match enrolment", "UKI and kernel digests (PCR 4)", "UKI sections (PCR 11)")
    for i in QUOTED:  # the kernel's own PCR reads agree with the replay
        assert result.pcrs[i] == b.kernel_pcrs[i], f"PCR {i}"
    apps = [ev for ev in result.log.events if ev.pcr == 4 and ev.event_type == EV_EFI_BOOT_SERVICES_APPLICATION]
    assert [ev.sha256 for ev in apps] == [uki_digest(b.image), authenticode_digest(kernel)]
    initrd_tag = [ev for ev in result.log.events if ev.pcr == 9 and b"Linux initrd" in ev.data]
    assert [ev.sha256 for ev in initrd_tag] == [hashlib.sha256(b.initrd).digest()]  # the kernel's EFI stub, PCR 9

    with pytest.raises(NonceMismatchError):  # boot 1's quote replayed to boot 2's challenge
        _appraise(first, enrolment, nonce=b.nonce, references=TpmReferences.for_uki(b.image))
    with pytest.raises(AkNotEnrolledError):  # a device whose AK is not this one
        _appraise(b, TpmEnrolment(frozenset({b"\x00\x0b" + bytes(32)}), enrolment.firmware_pcrs))
    with pytest.raises(PcrDigestMismatchError):  # OVMF's log without its last event
        _appraise(b, enrolment, event_log=b.log[:eventlog.parse(b.log).events[-1].offset])
    with pytest.raises(ReferenceMismatchError, match="PCR 0"):  # other firmware than at enrolment
        _appraise(b, TpmEnrolment(enrolment.ak_names, {**enrolment.firmware_pcrs, 0: bytes(32)}))
    # a UKI changed by one byte (another cmdline) is named, at the UKI's PCR 4 event
    other = uki.build_uki(uki.stub_path("amd64").read_bytes(), kernel, b.initrd, CMDLINE + " ",
                          uki.os_release("tpm-probe", 1))
    with pytest.raises(ReferenceMismatchError, match="PCR 4 application 0"):
        _appraise(b, enrolment, references=TpmReferences.for_uki(other))
    print(f"\nOVMF + swtpm, 2 boots: quote over PCRs {QUOTED} by the enrolled primary AK {enrolled_ak.hex()[:20]}.. "
          f"verified; firmware PCRs of boot 2 = boot 1's baseline; {len(b.log)}-byte log, {len(result.log.events)} "
          f"events, replays to the quoted PCRs; PCR 4 = UKI {apps[0].sha256.hex()[:16]}.. then kernel "
          f"{apps[1].sha256.hex()[:16]}..; appraisal {dt:.2f} ms (references from the {len(b.image) >> 20} MiB UKI: "
          f"{t_refs:.0f} ms, once per UKI); power-on to probe output {first.t_done:.1f} s, "
          f"{b.t_done:.1f} s")


def _evidence(lb: Lab, dev: Device) -> tuple[bytes, Evidence]:
    """The device's evidence for a fresh nonce, fetched from its agent inside the lab's namespace."""
    nonce = os.urandom(32)
    proc = lb.net.run(["curl", "-sf", "--max-time", "60", f"{dev.url}/attestation?nonce={nonce.hex()}"],
                      capture_output=True, timeout=90)
    assert proc.returncode == 0, f"GET /attestation: {proc.returncode}"
    return nonce, parse_evidence(proc.stdout)


def _appraise_evidence(nonce: bytes, ev: Evidence, device: TpmDevice, uki_bytes: bytes, dep: Deployment) -> TpmAppraisal:
    """appraise_tpm on the EAT's TPM claim: quote over SHA-256(nonce || L1 key), the UEFI log plus
    L1's PCR 15 events, references from the served UKI and the signed manifest."""
    assert ev.tpm is not None
    manifest = SignedManifest.decode(Blockstore(dep.store).get(dep.workload.manifest)).manifest
    l1 = decode_public_key(cbor2.loads(ev.chain)[0])
    return appraise_tpm(attest=ev.tpm.quote, signature=ev.tpm.signature, ak_public=ev.tpm.ak_public,
                        event_log=_with_bootstrap_events(ev), nonce=qualifying_data(nonce, l1),
                        enrolment=device.enrolment(),
                        references=TpmReferences.for_uki(uki_bytes, dep.workload.manifest, manifest))


def _with_bootstrap_events(ev: Evidence) -> bytes:
    """The firmware log with L1's PCR 15 events appended as TCG_PCR_EVENT2 records (a SHA-256-only log: swtpm's)."""
    import struct

    assert ev.tpm is not None
    assert eventlog.parse(ev.tpm.uefi_log).spec_id.algorithms == ((eventlog.ALG_SHA256, 32),)
    recs = [struct.pack("<III", e.pcr, e.event_type, 1) + struct.pack("<H", eventlog.ALG_SHA256) + e.sha256
            + struct.pack("<I", len(e.data)) + e.data for e in ev.tpm.log_events()]
    return ev.tpm.uefi_log + b"".join(recs)


def test_hello_on_a_tpm_device_is_affirming_and_a_one_byte_changed_bootstrap_is_contraindicated(tmp_path: Path) -> None:
    """The hello flow over `--firmware uefi-http --tpm`: OVMF measures the bootstrap UKI into the
    device's swtpm, the bootstrap derives CDI_1 from the TPM and extends PCR 15 with the manifest
    and layers, the agent quotes. Boot 1 is the factory's known-good boot (enrolment records the
    firmware baseline), then appraised affirming with a fresh nonce, the flow's result right
    (measured image: hello greets). Boot 2, same device and TPM, a bootstrap UKI with one byte
    changed: it boots, but is contraindicated at PCR 4, and its CDI_1/CDI_2 (L1 and L2 keys) differ."""
    dep = prepare(REPO / "examples/hello/flow.yaml", tmp_path / "work")
    out = tmp_path / "lab"
    with lab(dep, out, ["device"], tpm=True) as lb:
        dev = lb.add_device("device", firmware="uefi-http")
        lb.power_on()
        lb.wait_ready(BOOT_TIMEOUT)
        assert dev.outcome == "ready", f"{dev.outcome}: {dev.reason}\n{dev.guest.console.text()[-3000:]}"
        line, m = dev.guest.wait_for_console(r"cidboot: agent: flow done: (\d+) result", 300)
        text = dev.guest.console.text()
        good_uki = lb.built_uki().read_bytes()
        assert lb.served_uki().read_bytes() == good_uki
        baseline = lb.enrol(dev)  # the factory's known-good boot
        roots = DeviceRoots.load(lb.roots_file)
        (device,) = roots.tpm.values()
        assert dict(device.firmware_pcrs) == baseline
        nonce, ev = _evidence(lb, dev)
        report = lb.report()
    assert "cidboot-stage: bootstrap start mode=measured root=tpm" in text
    assert ev.boot_mode == "tpm-measured" and ev.tpm is not None
    result = _appraise_evidence(nonce, ev, device, good_uki, dep)
    assert result.affirming, result.warnings
    assert result.checks[-1] == "manifest and layer events", result.checks  # PCR 15: what L1 verified
    with pytest.raises(NonceMismatchError):  # the same quote for another challenge: replayed
        _appraise_evidence(os.urandom(32), ev, device, good_uki, dep)
    d = good_report = report["devices"][0]
    assert (d["firmware"], d["boot"]) == ("uefi-http", "tpm-measured")
    assert d["appraisal"]["status"] == "affirming", d["appraisal"]
    assert m[1] != "0" and "hello, world" in json.dumps(d["flow_results"]), d["flow_results"]
    good_l1, good_l2 = _keys(ev)
    t_ready = next(ln.t for ln in dev.guest.console.lines if "agent ready" in ln.text)

    # boot 2: the bootstrap UKI with one byte of its .osrel changed; same device, same TPM
    i = good_uki.index(b"\nNAME=cidboot\n") + 6
    bad_uki = good_uki[:i] + b"C" + good_uki[i + 1:]
    with lab(dep, out, ["device"], tpm=True) as lb:
        lb.served_uki().write_bytes(bad_uki)
        dev = lb.add_device("device", firmware="uefi-http")
        lb.power_on()
        lb.wait_ready(BOOT_TIMEOUT)
        assert dev.outcome == "ready", f"{dev.outcome}: {dev.reason}\n{dev.guest.console.text()[-3000:]}"
        nonce, bad = _evidence(lb, dev)
        report = lb.report()
    with pytest.raises(ReferenceMismatchError, match="PCR 4 application 0"):  # the served, signed UKI is the good one
        _appraise_evidence(nonce, bad, device, good_uki, dep)
    d = report["devices"][0]
    assert d["appraisal"]["status"] == "contraindicated", d["appraisal"]
    assert any("PCR 4" in r for r in d["appraisal"]["reasons"]), d["appraisal"]
    bad_l1, bad_l2 = _keys(bad)
    assert bad_l1 != good_l1 and bad_l2 != good_l2  # another CDI_1, so another CDI_2
    t_ready_bad = next(ln.t for ln in dev.guest.console.lines if "agent ready" in ln.text)
    print(f"\nappraisal of the good boot: {json.dumps(good_report['appraisal'])[:1500]}")
    print(f"appraisal of the changed boot: {json.dumps(d['appraisal'])[:1500]}")
    print(f"\nuefi-http --tpm: power-on to agent ready {t_ready:.1f} s (TCG); firmware baseline PCRs "
          f"{sorted(baseline)}; PCR 15 events {len(ev.tpm.bootstrap_events) if ev.tpm else 0}; appraisal affirming; "
          f"one-byte-changed UKI: contraindicated at PCR 4, L1 key {good_l1.hex()[:16]}.. -> {bad_l1.hex()[:16]}.., "
          f"L2 key {good_l2.hex()[:16]}.. -> {bad_l2.hex()[:16]}..; power-on to agent ready {t_ready_bad:.1f} s")


def _fleet_device(lb: Lab, dev: Device, since: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The boot server's fleet row of a device (once an appraisal made after `since` is in) and its
    event timeline since then."""
    def api(path: str) -> Any:
        proc = lb.net.run(["curl", "-sf", "--max-time", "30", f"http://10.77.0.1:8080{path}"], capture_output=True,
                          text=True, timeout=60)
        assert proc.returncode == 0, f"{path}: curl {proc.returncode}"
        return json.loads(proc.stdout)

    mac = dev.guest.spec.mac
    row: dict[str, Any] = {}
    events: list[dict[str, Any]] = []
    for _ in range(60):  # the server appraises each agent when it reports ready (this boot's ready event)
        events = [e for e in api(f"/api/devices/{mac}")["events"] if e["received"] >= since]
        ready = max((e["received"] for e in events if (e["stage"], e["kind"]) == ("agent", "ready")), default=None)
        row = next((d for d in api("/api/devices")["devices"] if d["mac"] == mac), {})
        if ready is not None and (row.get("appraisal") or {}).get("time", 0) >= ready:
            break
        time.sleep(2)
    return row, events


def _keys(ev: Evidence) -> tuple[bytes, bytes]:
    """(L1 public key, L2 alias public key) of a TPM device's evidence: functions of CDI_1, CDI_2."""
    vc = verify_chain(ev.chain, allow_debug=True)
    return raw_public_bytes(vc.root_public_key), raw_public_bytes(vc.leaf_public_key)


def _private_copy(flow_dir: Path, dest: Path) -> Path:
    """A copy of an example flow with `encrypt: true` (the harness makes its flow secret and the
    boot servers' key policy): its devices' bootstraps must get the layer keys from the broker."""
    import yaml

    shutil.copytree(flow_dir, dest, ignore=shutil.ignore_patterns("keys", "__pycache__"))
    doc = yaml.safe_load((dest / "flow.yaml").read_text())
    doc["encrypt"] = True
    (dest / "flow.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest / "flow.yaml"


def test_two_tpm_devices_attest_each_other_and_run_the_two_device_flow(tmp_path: Path) -> None:
    """Two TPM devices (OVMF + swtpm, uefi-http) run examples/two-device as a private image
    (`encrypt: true`), each appraising the other with what its signed device registry carries: the
    peer's AK and firmware baseline, and the bootstrap UKI's PCR 4/11 references (docs/tpm.md,
    "Peers"). Each bootstrap extends PCR 15, asks the boot server's key broker with its agent's TPM
    evidence (a fresh quote) and decrypts the layers in RAM (docs/privacy.md, "The device side").
    Boot 1 is the factory's: the key policy allows "warning" (no firmware baseline is enrolled
    yet, so the broker's TPM appraisal can be no better), both devices get keys and boot, and
    `Lab.enrol` records their firmware baselines; peers then have no baseline for each other, so
    nothing is exchanged (not affirming). Boot 2: the lab signs the registry again (now with the
    baselines), the policy needs affirming, both devices get their keys on an affirming TPM
    appraisal, attest each other affirming, and the aggregator's total is right (sum of the
    sensor's readings). The PCR values the broker appraised (PCR 15: this manifest's events,
    extended before the request) are the ones the agents' later quotes show."""
    from cidboot.trust.tpm.evidence import device_id as tpm_device_id
    from qemu.harness.lab import key_decisions

    dep = prepare(_private_copy(REPO / "examples/two-device", tmp_path / "flow" / "two-device"), tmp_path / "work")
    assert dep.flow_secret is not None
    n_layers = len(dep.workload.result["layers"])
    out = tmp_path / "lab"
    roles = ["sensor", "aggregator"]
    t0 = time.monotonic()
    with lab(dep, out, roles, tpm=True, key_min_status="warning") as lb:  # the factory boot
        devs = [lb.add_device(r, firmware="uefi-http") for r in roles]
        lb.power_on()
        lb.wait_ready(BOOT_TIMEOUT)
        for dev in devs:
            assert dev.outcome == "ready", f"{dev.name}: {dev.outcome}: {dev.reason}\n{dev.guest.console.text()[-3000:]}"
        baselines = [lb.enrol(dev) for dev in devs]
        factory_text = devs[1].guest.console.text()
    t_factory = time.monotonic() - t0
    assert "cidboot: result total=" not in factory_text  # no baseline in the registry yet: no peer affirmed
    factory_keys = key_decisions(out)
    assert [(e["decision"], e["status"]) for e in factory_keys] == [("release", "warning")] * 2, factory_keys
    assert all(any(c["check"] == "tpm.firmware" and c["status"] == "warning" for c in e["checks"]) for e in factory_keys)
    t_field = time.time()  # the boot server's fleet state survives the lab: its appraisals after this
    with lab(dep, out, roles, tpm=True) as lb:  # in the field: the registry re-signed with the baselines
        sensor, aggregator = (lb.add_device(r, firmware="uefi-http") for r in roles)
        lb.power_on()
        lb.wait_ready(BOOT_TIMEOUT)
        for dev in (sensor, aggregator):
            assert dev.outcome == "ready", f"{dev.name}: {dev.outcome}: {dev.reason}\n{dev.guest.console.text()[-3000:]}"
        aggregator.guest.wait_for_console(r"cidboot: result total=", 600)
        report = lb.report()
        fleet = {dev.name: _fleet_device(lb, dev, t_field) for dev in (sensor, aggregator)}
        agent_evidence = {dev.name: _evidence(lb, dev) for dev in (sensor, aggregator)}  # the agents' own quotes
        built_uki = lb.built_uki().read_bytes()  # the signed UKI references'
    t_total = time.monotonic() - t0
    assert [(d["boot"], d["appraisal"]["status"]) for d in report["devices"]] == [("tpm-measured", "affirming")] * 2
    total = next(ln.text for ln in aggregator.guest.console.lines if "cidboot: result total=" in ln.text)
    assert total.split("cidboot: result total=", 1)[1].strip() == str(sum((i * 7) % 10 for i in range(5))), total
    for dev in (sensor, aggregator):  # each appraised the other affirming: nothing refused either way
        assert "not affirming" not in dev.guest.console.text(), dev.guest.console.text()[-3000:]
    roots = DeviceRoots.load(out / "device-roots.json")
    assert [dict(d.firmware_pcrs) for d in roots.tpm.values()] != [{}, {}] and all(baselines)
    for name, (row, timeline) in fleet.items():  # the boot server's fleet: TPM devices' signed events verify
        stages = {(e["stage"], e["kind"]) for e in timeline}
        # the UEFI-started bootstrap's own events too (queued until its boot config named the
        # server: events.learn_bootconfig), signed by its AK-bound L1 key
        assert {("bootstrap", "start"), ("bootstrap", "handover"), ("agent", "ready")} <= stages, (name, stages)
        assert all(e["trust"] == "verified" for e in timeline), [e for e in timeline if e["trust"] != "verified"]
        assert row["device_id"] in roots.tpm, row  # identified by its AK, as appraisal identifies it
        assert row["appraisal"]["status"] == "affirming", row["appraisal"]  # with the registry's UKI references

    # the private image: each bootstrap got its keys from the broker on an affirming TPM appraisal
    field_keys = [e for e in key_decisions(out) if e["time"] >= t_field]
    assert [(e["decision"], e["status"]) for e in field_keys] == [("release", "affirming")] * 2, field_keys
    assert sorted(e["device_id"] for e in field_keys) == sorted(roots.tpm)
    keys_lines = {}
    for e in field_keys:
        got = {c["check"]: c["status"] for c in e["checks"]}
        for check in ("tpm.ak-enrolled", "tpm.quote-signature", "tpm.nonce-binding", "tpm.replay", "tpm.firmware",
                      "tpm.pcr4-uki", "tpm.pcr11-sections", "tpm.pcr15-manifest", "measurements"):
            assert got.get(check) == "affirming", (check, e)
        assert len(e["layers"]) == n_layers and e["manifest"] == str(dep.workload.manifest), e
    for dev in (sensor, aggregator):  # the decrypt step ran in the guest before the hand-over
        text = dev.guest.console.text()
        assert "cidboot-stage: bootstrap start mode=measured root=tpm" in text
        keys_lines[dev.name] = next(ln.text.strip() for ln in dev.guest.console.lines
                                    if "cidboot-stage: bootstrap keys layers=" in ln.text)
        assert text.index("cidboot-stage: bootstrap keys layers=") < text.index("cidboot-stage: bootstrap handover")
    # the bootstrap's key request and the agent's later evidence: the same quoted PCRs, PCR 15 included
    for name, (nonce, ev) in agent_evidence.items():
        assert ev.tpm is not None
        did = tpm_device_id(quote.parse_public(ev.tpm.ak_public).name)
        agent = _appraise_evidence(nonce, ev, roots.tpm[did], built_uki, dep)
        assert agent.affirming, (name, agent.warnings)
        broker_pcrs = next(e["pcrs"] for e in field_keys if e["device_id"] == did)
        assert broker_pcrs["15"] == agent.pcrs[15].hex(), (name, broker_pcrs, agent.pcrs[15].hex())
        assert broker_pcrs == {str(i): agent.pcrs[i].hex() for i in map(int, broker_pcrs)}, name
        assert [str(CID.decode(e.cid)) for e in ev.tpm.bootstrap_events] == [str(dep.workload.manifest)] + [
            str(lyr["cid"]) for lyr in dep.workload.result["layers"]]  # ciphertext CIDs, after the manifest's
    print(f"\ntwo TPM devices, private two-device flow with mutual attestation: factory boot {t_factory:.0f} s, "
          f"factory + field boot to total {t_total:.0f} s; {total.strip()}; broker: 2 + 2 releases (warning, "
          f"then affirming), PCRs {sorted(map(int, field_keys[0]['pcrs']))} as the agents quote them later; "
          + "; ".join(f"{n}: {t}" for n, t in keys_lines.items()))
