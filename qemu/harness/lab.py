"""A boot lab: the real boot server in a throwaway network namespace and N QEMU devices on it.

Each device is a QEMU guest on a tap of the namespace's bridge, booted by one of FIRMWARES:
"dice" boots the firmware image from "flash" (-kernel/-initrd) with CDI_0 from the harness's DICE
engine on fw_cfg (measured); "bios-ipxe" boots SeaBIOS and the NIC's iPXE ROM straight into the
bootstrap; "uefi-pxe" and "uefi-http" boot OVMF, whose own PXE or HTTP Boot loads the bootstrap
UKI from the boot server (no iPXE). Without a TPM the last three are unmeasured boots, and the
verifier appraises them so (never affirming). With `tpm=True` every device has its own swtpm
(qemu.harness.tpm: state under the device dir, kept across boots, enrolled by the factory) and the
UEFI boots are TPM-measured (docs/tpm.md); `Lab.enrol` records a known-good boot's firmware PCRs.
Devices get fixed addresses by MAC (devices.yaml `ip:`) so peers can be told where the others
are. The verifier side (`agent attest`) runs inside the namespace too: nothing leaves it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.manifest import SignedManifest
from cidboot.trust.registry import sign_registry
from qemu.harness import dice_engine, problems, timeline
from qemu.harness.deploy import Deployment
from qemu.harness.netns import BootNetwork, boot_network
from qemu.harness.ra import router_advertiser
from qemu.harness.vm import Guest, GuestError, GuestSpec

AGENT_PORT = 8000
FIRMWARES = ("dice", "bios-ipxe", "uefi-pxe", "uefi-http")
READY_RX = r"cidboot-stage: agent ready url=(?P<url>\S+)|cidboot: (?P<kind>refused|fatal): (?P<reason>.*)"


def device_mac(i: int) -> str:
    return f"52:54:00:c1:d0:{i + 1:02x}"


def device_ip(i: int) -> str:
    return f"10.77.0.{10 + i}"


@dataclass
class Device:
    index: int
    name: str
    role: str
    state: dice_engine.DeviceState
    guest: Guest
    firmware: str = "dice"  # one of FIRMWARES
    url: str | None = None
    swtpm: Any = None  # qemu.harness.tpm.Swtpm of a TPM device
    outcome: str = "pending"  # ready | refused | fatal | timeout
    reason: str = ""

    def timeline(self) -> timeline.Timeline:
        return timeline.parse(self.guest.console.lines)


@dataclass
class Lab:
    dep: Deployment
    net: BootNetwork
    out: Path
    server: subprocess.Popen[str]
    states: list[dice_engine.DeviceState]
    devices: list[Device] = field(default_factory=list)
    tpm: bool = False  # devices have a TPM (qemu.harness.tpm), not a DICE engine

    @property
    def roots_file(self) -> Path:
        return self.out / "device-roots.json"

    def add_device(self, role: str, *, legacy: bool = False, accel: str = "tcg", firmware: str | None = None) -> Device:
        """The next of the devices the lab was made for (its state, UDS and registry entry exist);
        `firmware` one of FIRMWARES (`legacy=True` is "bios-ipxe")."""
        kind = firmware or ("bios-ipxe" if legacy else "dice")
        if kind not in FIRMWARES:
            raise GuestError(f"firmware {kind!r} is not one of {', '.join(FIRMWARES)}")
        i = len(self.devices)
        state = self.states[i]
        name = state.name
        fw_cfg: dict[str, Path] = {}
        dice = kind == "dice"
        if dice:
            fw = self.dep.firmware
            fw_cfg[dice_engine.FW_CFG_NAME] = dice_engine.provision(state, fw.kernel.read_bytes(), fw.initrd.read_bytes())
        spec = GuestSpec(name, kernel=self.dep.firmware.kernel if dice else None,
                         initrd=self.dep.firmware.initrd if dice else None,
                         append=str(self.dep.firmware.result.get("cmdline") or "console=ttyS0 quiet panic=-1 no_timer_check"),
                         fw_cfg=fw_cfg, tap=self.net.taps[i], mac=device_mac(i), network_boot=not dice,
                         disk=state.nvram, accel=accel, firmware="uefi" if kind.startswith("uefi") else "bios",
                         uefi_http=kind == "uefi-http")
        dev = Device(i, name, role, state, Guest(spec, state.dir / "run", self.net), kind)
        if self.tpm:
            from qemu.harness import tpm

            if dice:
                raise GuestError("a TPM device boots UEFI firmware (uefi-pxe or uefi-http), not the DICE engine")
            dev.swtpm = tpm.Swtpm(tpm.base(state.dir), qemu=True).start()
            spec.tpm = dev.swtpm.ctrl_socket
        self.devices.append(dev)
        return dev

    def enrol(self, dev: Device) -> dict[int, bytes]:
        """The factory's known-good boot of a TPM device: its evidence for a fresh nonce, verified
        with its enrolled AK, gives the firmware PCR baseline recorded in the roots file."""
        import os

        from cidboot.trust.appraisal import DeviceRoots
        from cidboot.trust.tpm.enrol import firmware_baseline, record_baseline

        roots = DeviceRoots.load(self.roots_file)
        did = next(d for d in roots.tpm if roots.names.get(d) == dev.name)
        nonce = os.urandom(32)
        proc = self.net.run(["curl", "-sf", "--max-time", "60", f"{dev.url}/attestation?nonce={nonce.hex()}"],
                            capture_output=True, timeout=90)
        if proc.returncode != 0:
            raise GuestError(f"{dev.name}: GET /attestation failed ({proc.returncode})")
        baseline = firmware_baseline(proc.stdout, nonce, roots.tpm[did])
        record_baseline(self.roots_file, did, baseline)
        return baseline

    def power_on(self) -> None:
        for dev in self.devices:
            if dev.guest.proc is None:
                dev.guest.start()

    def wait_ready(self, timeout: float) -> None:
        """Wait until every device's agent is ready, or it refused/died, or time runs out."""
        deadline = time.monotonic() + timeout
        for dev in self.devices:
            try:
                _line, m = dev.guest.wait_for_console(READY_RX, max(1.0, deadline - time.monotonic()))
            except GuestError as e:
                dev.outcome, dev.reason = "timeout", str(e).split("; console tail", 1)[0]
                continue
            if m["url"]:
                dev.outcome, dev.url = "ready", m["url"]
            else:
                dev.outcome, dev.reason = m["kind"], m["reason"].strip()

    def attest(self, dev: Device, *, allow_unmeasured: bool = False) -> dict[str, Any]:
        """`agent attest` from inside the namespace: a fresh nonce, appraisal against the factory's
        roots and the signed manifest."""
        if not dev.url:
            return {"status": "none", "checks": [], "reason": f"device not ready: {dev.outcome} {dev.reason}"}
        argv = [sys.executable, "-m", "agent", "attest", dev.url, "--roots", str(self.roots_file),
                "--manifest", str(self.dep.workload.manifest), "--store", str(self.dep.store), "--json"]
        if allow_unmeasured:
            argv.append("--allow-unmeasured")
        if dev.swtpm is not None:  # PCR 4/11 references: the bootstrap UKI as built (not what a device was served)
            argv += ["--uki", str(self.built_uki())]
        proc = self.net.run(argv, capture_output=True, text=True, timeout=120)
        try:
            return dict(json.loads(proc.stdout))
        except ValueError:
            return {"status": "none", "checks": [], "reason": f"agent attest failed: {proc.stderr.strip()[-500:]}"}

    def built_uki(self, arch: str = "x86_64") -> Path:
        """The bootstrap UKI as the deployment built it: what a UEFI device's PCR 4 must hold."""
        return next(p for p in self.dep.bootstrap.uki.values() if arch in p.name)

    def served_uki(self, arch: str = "x86_64") -> Path:
        """The copy the boot server hands UEFI devices (a test may change it: the verifier does not use it)."""
        return self.out / "tftp" / self.built_uki(arch).name

    def results(self, dev: Device) -> Any:
        if not dev.url:
            return None
        proc = self.net.run(["curl", "-sf", "--max-time", "30", f"{dev.url}/results"], capture_output=True, text=True,
                            timeout=60)
        try:
            return json.loads(proc.stdout)
        except ValueError:
            return {"error": f"GET /results failed ({proc.returncode})"}

    def block(self, dev: Device, cid: CID) -> bytes:
        """One block from the device's agent (`/ipfs/{cid}?format=raw`), checked against its CID."""
        proc = self.net.run(["curl", "-sf", "--max-time", "10", f"{dev.url}/ipfs/{cid}?format=raw"],
                            capture_output=True, timeout=30)
        if proc.returncode != 0:
            raise KeyError(f"{cid}: GET /ipfs/ failed ({proc.returncode})")
        cid.verify(proc.stdout)
        return bytes(proc.stdout)

    def problems(self, dev: Device, results: Any) -> list[dict[str, Any]]:
        """Vetoes, refusals and errors from the device's audit log, with the inputs concerned."""
        head = results.get("audit") if isinstance(results, dict) else None
        if not dev.url or not isinstance(head, str):
            return []
        try:
            return problems.audit_problems(CID.parse(head), lambda c: self.block(dev, c))
        except Exception as e:  # a report is still written without them
            return [{"decision": "unreadable", "reason": f"audit log {head}: {type(e).__name__}: {e}"}]

    def report(self, *, allow_unmeasured: bool = False) -> dict[str, Any]:
        devices = []
        for dev in self.devices:
            appraisal = self.attest(dev, allow_unmeasured=allow_unmeasured)
            tl = dev.timeline()
            flow_results = self.results(dev)
            devices.append({
                "name": dev.name, "role": dev.role, "mac": dev.guest.spec.mac, "boot": _boot_kind(dev),
                "firmware": dev.firmware, "arch": "x86_64",
                "outcome": dev.outcome, "reason": dev.reason, "url": dev.url,
                "appraisal": {"status": appraisal.get("status"), "reasons": [
                    f"{c.get('status')}: {c.get('check')}: {c.get('reason')}" for c in appraisal.get("checks", [])]
                    or [appraisal.get("reason", "")]},
                "measurements": appraisal.get("measurements", {}),
                "flow_results": flow_results,
                "problems": self.problems(dev, flow_results),
                "boot_timeline": tl.to_obj(),
                "console": str(dev.guest.dir / "console.log"),
            })
        return {"manifest_cid": str(self.dep.workload.manifest), "flow": self.dep.flow.get("name"),
                "reference_measurements": {**self.dep.workload.measurements}, "devices": devices}


def _boot_kind(dev: Device) -> str:
    return "measured" if dev.firmware == "dice" else "tpm-measured" if dev.swtpm is not None else "unmeasured"


def _devices_yaml(path: Path, roles: list[str]) -> None:
    lines = ["deny_unknown: true", "devices:"]
    lines += [f'  - {{mac: "{device_mac(i)}", role: {r}, ip: {device_ip(i)}}}' for i, r in enumerate(roles)]
    path.write_text("\n".join(lines) + "\n")


def _factory(dep: Deployment, out: Path, names: list[str],
             roles: list[str], tpm: bool = False) -> tuple[list[dice_engine.DeviceState], CID | None]:
    """Device states (UDS, NVRAM), their root keys in the verifiers' roots file, and the device
    registry signed by the workload's signers, in the store, for the agents to find peers by and
    for the bootstraps to know what they may boot: each device's role, and for every role the
    workload's manifest name (docs/trust.md, "What a device may boot")."""
    states = [dice_engine.device(out / "devices", n) for n in names]
    if tpm:
        from qemu.harness import tpm as tpm_factory

        roots = tpm_factory.register([tpm_factory.base(s.dir) for s in states], names, out / "device-roots.json", roles)
    else:
        roots = dice_engine.register(states, out / "device-roots.json", roles)
    if not dep.signer_keys:
        return states, None
    signers = [keys.load_private_key(p) for p in dep.signer_keys]
    name = SignedManifest.decode(Blockstore(dep.store).get(dep.workload.manifest)).manifest.name
    refs = tpm_factory.uki_references(dep) if tpm else None  # the bootstrap UKI's PCR 4/11, for TPM peers
    block = sign_registry(roots, signers, manifests={r: name for r in roles}, tpm_references=refs)
    return states, Blockstore(dep.store).put_block(block, DAG_CBOR)


@contextmanager
def lab(dep: Deployment, out: Path, roles: list[str], *, manifest: str | None = None, loss_percent: int = 0,
        server_args: list[str] | None = None, names: list[str] | None = None, tpm: bool = False) -> Iterator[Lab]:
    """Boot network + `bootstrap serve` for devices with these roles (one tap each); `tpm`: TPM devices."""
    out.mkdir(parents=True, exist_ok=True)
    states, registry = _factory(dep, out, names or [f"device-{i}" for i in range(len(roles))], roles, tpm)
    tftp = out / "tftp"  # the harness built the bootstrap already (bootstrap.bootfiles): the server need not
    (tftp / "bootstrap").mkdir(parents=True, exist_ok=True)
    (tftp / "bootstrap" / "vmlinuz").write_bytes(dep.bootstrap.kernel.read_bytes())
    (tftp / "bootstrap" / "initrd.img").write_bytes(dep.bootstrap.initrd.read_bytes())
    for uki in dep.bootstrap.uki.values():
        (tftp / uki.name).write_bytes(uki.read_bytes())
    _devices_yaml(out / "devices.yaml", roles)
    with ExitStack() as stack:
        net = stack.enter_context(boot_network(taps=len(roles)))
        stack.enter_context(router_advertiser(net))  # else iPXE (--legacy) waits ~16 s for an IPv6 router
        log = open(out / "boot-server.log", "w")
        stack.callback(log.close)
        server = net.popen([sys.executable, "-m", "bootstrap", "--log-json", "-v", "serve", "--interface", "br0",
                            "--dhcp-range", "10.77.0.100-10.77.0.199", "--store", str(dep.store),
                            "--manifest", manifest or str(dep.workload.manifest), "--devices", str(out / "devices.yaml"),
                            "--tftp-root", str(tftp), "--state-dir", str(out / "server-state"),
                            "--agent-port", str(AGENT_PORT),
                            *(["--device-registry", str(registry)] if registry else []), *(server_args or [])],
                           stdout=subprocess.PIPE, stderr=log, text=True)
        stack.callback(_stop, server)
        assert server.stdout is not None
        line = server.stdout.readline()
        if "serving on" not in line:
            raise RuntimeError(f"boot server did not start: {(out / 'boot-server.log').read_text()[-1500:]}")
        if loss_percent:
            from qemu.harness.netloss import add_loss

            for tap in net.taps:
                add_loss(net.cmd([]), tap, loss_percent)
        lb = Lab(dep, net, out, server, states, tpm=tpm)
        try:
            yield lb
        finally:
            for dev in lb.devices:
                dev.guest.stop()
                if dev.swtpm is not None:
                    dev.swtpm.stop()


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
