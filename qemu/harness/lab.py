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

Scale-out labs (docs/scale-out.md): `cluster=K` starts K Kubo + IPFS Cluster peers inside the
namespace (qemu.harness.cluster: CRDT, private secret and swarm key, no bootstrap/MDNS/routing;
APIs on the namespace's loopback, gateways on 10.77.0.1), publishes the manifest DAG and the
device registry to it, and gives every boot server an EMPTY store with `--upstream` to every
peer's gateway (and lists those gateways after itself in the boot config, for the devices'
fail-over). `boot_servers=S` gives site s>0 its own LAN (bridge br{s}) and its own `bootstrap
serve` in its own namespace at 10.77.{s}.1; device i goes to site `sites[i]` (default i % S).

A private image (the deployment has a flow secret: flow.yaml `encrypt: true`, docs/privacy.md):
every boot server runs the key broker (`--key-policy`, `--flow-secret`) with a policy allowing the
flow's roles at affirming (`key_policy`), and logs its decisions to OUT/keys[-s].log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cidboot.errors import CidbootError
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.manifest import SignedManifest
from cidboot.trust.registry import sign_registry
from qemu.harness import dice_engine, problems, timeline
from qemu.harness.cluster import Cluster, KuboNode, start_cluster
from qemu.harness.cluster import stop as stop_process
from qemu.harness.deploy import Deployment
from qemu.harness.netns import BootNetwork, Site, boot_network, inside
from qemu.harness.ra import router_advertiser
from qemu.harness.vm import Guest, GuestError, GuestSpec

AGENT_PORT = 8000
FIRMWARES = ("dice", "bios-ipxe", "uefi-pxe", "uefi-http")
READY_RX = r"cidboot-stage: agent ready url=(?P<url>\S+)|cidboot: (?P<kind>refused|fatal): (?P<reason>.*)"
# the end of an agent's flow (agent/device.py run_flow): after it the results and audit log are final
DONE_RX = r"cidboot: agent: (?:flow done|the manifest names no flow)|cidboot: (?P<kind>fatal): (?P<reason>.*)"


def device_mac(i: int) -> str:
    return f"52:54:00:c1:d0:{i + 1:02x}"


def device_ip(i: int, site: int = 0) -> str:
    return f"10.77.{site}.{10 + i}"


CLUSTER_HOST = "10.77.0.1"  # the cluster peers' gateways, as devices and boot servers reach them


class LabError(CidbootError):
    """A lab part (boot server, cluster publish) did not come up (the message says which)."""


@dataclass
class BootServer:
    """One site's `bootstrap serve`: where it runs, its store and where it fetches what it lacks."""

    site: Site
    store: Path
    upstreams: tuple[str, ...]
    gateways: tuple[str, ...]  # what its boot configs list, in order ("self" first)
    proc: subprocess.Popen[str]
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.site.server_ip}:8080"

    def describe(self) -> dict[str, Any]:
        return {"site": self.site.index, "url": self.url, "store": str(self.store),
                "upstreams": list(self.upstreams), "gateways": list(self.gateways)}

    def metrics(self, net: BootNetwork) -> dict[str, float]:
        """Its /metrics (unlabelled gauges and counters by name, labelled ones summed), read
        inside the lab: upstream bytes/blocks, coalesced requests, cache size."""
        proc = net.run(["curl", "-sf", "--max-time", "30", f"{self.url}/metrics"], capture_output=True, text=True,
                       timeout=60)
        return parse_metrics(proc.stdout) if proc.returncode == 0 else {}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value}, labelled series of one name summed."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        name = name.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + v
    return out


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
    servers: list[BootServer] = field(default_factory=list)
    site_of: list[int] = field(default_factory=list)  # device index -> site (boot server) index
    cluster: Cluster | None = None
    published: dict[str, Any] = field(default_factory=dict)  # `imagebuilder publish --json` of the manifest
    tpm: bool = False  # devices have a TPM (qemu.harness.tpm), not a DICE engine
    registry: CID | None = None  # the signed device registry the boot servers hand out (in dep.store)

    def inside(self) -> Any:
        """`with lb.inside():` this thread (and what it starts) in the lab's namespace, where the
        cluster's REST/RPC APIs listen on loopback."""
        return inside(self.net.name)

    def server_of(self, dev: Device) -> BootServer:
        return self.servers[self.site_of[dev.index]]

    def cluster_rest_url(self, peer: int = 0) -> str:
        """A peer's cluster REST API as devices and boot servers reach it."""
        if self.cluster is None:
            raise LabError("this lab has no cluster")
        return f"http://{CLUSTER_HOST}:{self.cluster.peers[peer].rest_url.rsplit(':', 1)[1]}"

    def cluster_gateways(self) -> list[str]:
        return [f"http://{CLUSTER_HOST}:{p.kubo.gateway_port}" for p in (self.cluster.peers if self.cluster else [])]

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
        arch = self.dep.arch
        if arch != "x86_64" and not kind.startswith("uefi"):
            raise GuestError(f"firmware {kind!r} is x86_64 only; {arch} devices boot uefi-pxe or uefi-http (AAVMF)")
        if dice:
            fw = self.dep.firmware
            fw_cfg[dice_engine.FW_CFG_NAME] = dice_engine.provision(state, fw.kernel.read_bytes(), fw.initrd.read_bytes())
        spec = GuestSpec(name, kernel=self.dep.firmware.kernel if dice else None,
                         initrd=self.dep.firmware.initrd if dice else None,
                         append=str(self.dep.firmware.result.get("cmdline") or "console=ttyS0 quiet panic=-1 no_timer_check"),
                         fw_cfg=fw_cfg, tap=self.net.taps[i], mac=device_mac(i), network_boot=not dice,
                         disk=state.nvram, accel=accel, firmware="uefi" if kind.startswith("uefi") else "bios",
                         uefi_http=kind == "uefi-http", arch=arch)
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

    def wait_flow(self, timeout: float) -> None:
        """Wait until every ready device's flow is done (`cidboot: agent: flow done`): `agent
        ready` comes before the flow runs, so a report taken then lists no results and none of
        the flow's vetoes (seen: `results: []` while the console said `cidboot: result ...`
        six seconds later). A device whose flow does not end in time keeps outcome ready, with
        the reason."""
        deadline = time.monotonic() + timeout
        for dev in self.devices:
            if dev.outcome != "ready":
                continue
            try:
                _line, m = dev.guest.wait_for_console(DONE_RX, max(1.0, deadline - time.monotonic()))
            except GuestError as e:
                dev.reason = "flow not done: " + str(e).split("; console tail", 1)[0]
                continue
            if m["kind"]:
                dev.reason = f"{m['kind']}: {m['reason'].strip()}"

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

    def built_uki(self, arch: str | None = None) -> Path:
        """The bootstrap UKI as the deployment built it for `arch` (default: the deployment's):
        what a UEFI device's PCR 4 must hold."""
        return self.dep.bootstrap.uki[arch or self.dep.arch]

    def served_uki(self, arch: str | None = None) -> Path:
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
                "firmware": dev.firmware, "arch": dev.guest.spec.arch,
                "outcome": dev.outcome, "reason": dev.reason, "url": dev.url,
                "appraisal": {"status": appraisal.get("status"), "reasons": [
                    f"{c.get('status')}: {c.get('check')}: {c.get('reason')}" for c in appraisal.get("checks", [])]
                    or [appraisal.get("reason", "")]},
                "measurements": appraisal.get("measurements", {}),
                "flow_results": flow_results,
                "problems": self.problems(dev, flow_results),
                "boot_timeline": tl.to_obj(),
                "console": str(dev.guest.dir / "console.log"),
                **({"boot_server": self.server_of(dev).describe()} if self.servers else {}),
            })
        out: dict[str, Any] = {"manifest_cid": str(self.dep.workload.manifest), "flow": self.dep.flow.get("name"),
                               "reference_measurements": {**self.dep.workload.measurements}, "devices": devices}
        if len(self.servers) > 1 or self.cluster is not None:
            out["boot_servers"] = [{**srv.describe(), "upstream_metrics": {
                k: v for k, v in srv.metrics(self.net).items() if "upstream" in k or "cache" in k}}
                for srv in self.servers]
        decisions = key_decisions(self.out)
        if decisions:  # a private image: who got keys, who was refused and why
            out["key_broker"] = [{k: e.get(k) for k in ("decision", "check", "reason", "device_id", "role", "status",
                                                        "manifest")} for e in decisions]
        if self.cluster is not None:
            out["cluster"] = {"peers": [{"name": f"peer{p.index}", "id": p.peer_id, "alive": p.alive,
                                         "gateway": g} for p, g in zip(self.cluster.peers, self.cluster_gateways(), strict=True)],
                              "published": self.published}
        return out


def _boot_kind(dev: Device) -> str:
    return "measured" if dev.firmware == "dice" else "tpm-measured" if dev.swtpm is not None else "unmeasured"


def key_policy(name: str, roles: list[str], min_status: str = "affirming") -> dict[str, Any]:
    """The lab's key policy: the flow's manifest name, its roles, affirming only (or `min_status`:
    "warning" for a TPM factory boot, whose firmware baseline is not enrolled yet)."""
    return {"version": 1, "manifests": {name: {"roles": sorted(set(roles)), "min_status": min_status}}}


def key_log(out: Path, site: int = 0) -> Path:
    return out / f"keys{f'-{site}' if site else ''}.log"


def key_decisions(out: Path) -> list[dict[str, Any]]:
    """Every key broker decision of the lab's boot servers (their JSON-lines logs), in order."""
    entries: list[dict[str, Any]] = []
    for log in sorted(out.glob("keys*.log")):
        entries += [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return sorted(entries, key=lambda e: e.get("time", 0))


def _devices_yaml(path: Path, roles: list[str], sites: list[int] | None = None) -> None:
    """Every device of every site, with its fixed address: a server answers only the devices on its
    own LAN (the others' DHCP never reaches it) but tells each agent where its peers are."""
    lines = ["deny_unknown: true", "devices:"]
    lines += [f'  - {{mac: "{device_mac(i)}", role: {r}, ip: {device_ip(i, sites[i] if sites else 0)}}}'
              for i, r in enumerate(roles)]
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
    refs = tpm_factory.uki_references(dep) if tpm else None  # the bootstrap UKIs' PCR 4/11 (per arch), for TPM peers
    block = sign_registry(roots, signers, manifests={r: name for r in roles}, tpm_references=refs)
    return states, Blockstore(dep.store).put_block(block, DAG_CBOR)


@contextmanager
def lab(dep: Deployment, out: Path, roles: list[str], *, manifest: str | None = None, loss_percent: int = 0,
        server_args: list[str] | None = None, names: list[str] | None = None, cluster: int = 0,
        boot_servers: int = 1, sites: list[int] | None = None, replication: str = "2:2",
        publish_results: bool = False, tpm: bool = False, key_min_status: str = "affirming") -> Iterator[Lab]:
    """Boot network + `bootstrap serve` for devices with these roles (one tap each); with
    `cluster`/`boot_servers`, the scale-out lab of the module docstring; `publish_results`: the
    boot servers' configs tell agents to publish results and audit logs to the cluster
    (`bootstrap serve --publish cluster=URL`, the REST API of peer 0 as devices reach it); `tpm`: TPM
    devices (qemu.harness.tpm); `key_min_status`: a private image's key policy's minimum appraisal
    ("warning" lets a TPM factory boot, appraised before its firmware baseline exists, get keys)."""
    if boot_servers < 1 or cluster < 0:
        raise LabError(f"a lab needs at least one boot server and no negative cluster size "
                       f"(got {boot_servers} boot servers, {cluster} peers)")
    site_of = list(sites) if sites is not None else [i % boot_servers for i in range(len(roles))]
    if len(site_of) != len(roles) or any(not 0 <= s < boot_servers for s in site_of):
        raise LabError(f"sites {site_of} must name one of {boot_servers} boot servers for each of {len(roles)} devices")
    multi = boot_servers > 1 or cluster > 0
    out.mkdir(parents=True, exist_ok=True)
    states, registry = _factory(dep, out, names or [f"device-{i}" for i in range(len(roles))], roles, tpm)
    tftp = out / "tftp"  # the harness built the bootstrap already (bootstrap.bootfiles): the server need not
    (tftp / "bootstrap").mkdir(parents=True, exist_ok=True)
    (tftp / "bootstrap" / "vmlinuz").write_bytes(dep.bootstrap.kernel.read_bytes())
    (tftp / "bootstrap" / "initrd.img").write_bytes(dep.bootstrap.initrd.read_bytes())
    for uki in dep.bootstrap.uki.values():
        (tftp / uki.name).write_bytes(uki.read_bytes())
    _devices_yaml(out / "devices.yaml", roles, site_of if multi else None)
    mcid = manifest or str(dep.workload.manifest)
    with ExitStack() as stack:
        net = stack.enter_context(boot_network(taps=0))
        site_list = [Site(0, net.bridge, net.server_ip, None)] + [net.add_site(s) for s in range(1, boot_servers)]
        for s in site_of:
            net.add_tap(bridge=site_list[s].bridge)
        stack.enter_context(router_advertiser(net))  # else iPXE (--legacy) waits ~16 s for an IPv6 router
        lb = Lab(dep, net, out, None, states, site_of=site_of, tpm=tpm,  # type: ignore[arg-type]  # server set below
                 registry=registry)
        if cluster:
            with lb.inside():
                lb.cluster = start_cluster(_fresh(out / "cluster"), cluster, gateway_host="0.0.0.0",
                                           rest_host="0.0.0.0")
                stack.callback(lb.cluster.stop)
                lb.published = _publish(lb.cluster, dep.store, mcid, registry, replication)
        extra = list(server_args or [])
        if dep.flow_secret is not None:  # a private image: the boot servers run the key broker
            if registry is None:
                raise LabError("a private image needs the device registry (the key broker's devices): no signer keys")
            name = SignedManifest.decode(Blockstore(dep.store).get(CID.parse(mcid))).manifest.name
            (out / "keys-policy.json").write_text(json.dumps(key_policy(name, roles, key_min_status), indent=1) + "\n")
            extra += ["--key-policy", str(out / "keys-policy.json"), "--flow-secret", f"{name}={dep.flow_secret}"]
        if publish_results:
            if lb.cluster is None:
                raise LabError("publish_results needs a cluster to publish to")
            extra += ["--publish", f"cluster={lb.cluster_rest_url()},replication={replication}"]
        for site in site_list:
            lb.servers.append(_start_server(stack, lb, site, mcid, tftp, registry, multi, extra))
        lb.server = lb.servers[0].proc
        if loss_percent:
            from qemu.harness.netloss import add_loss

            for tap in net.taps:
                add_loss(net.cmd([]), tap, loss_percent)
        try:
            yield lb
        finally:
            for dev in lb.devices:
                dev.guest.stop()
                if dev.swtpm is not None:
                    dev.swtpm.stop()


def _fresh(d: Path) -> Path:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def _publish(cluster: Cluster, store: Path, mcid: str, registry: CID | None, replication: str) -> dict[str, Any]:
    """`imagebuilder publish` of the manifest DAG to the cluster (CAR to peer0's Kubo, pinned with
    `replication`), then the device registry block pinned the same way: everything a device
    needs from IPFS. Runs in the caller's namespace (the lab's)."""
    from cidboot.store.cluster import ClusterClient, Replication

    entry = cluster.peers[0]
    proc = subprocess.run([sys.executable, "-m", "imagebuilder", "publish", mcid, "--store", str(store),
                           "--cluster", entry.rest_url, "--kubo", entry.kubo.api_url, "--replication", replication,
                           "--json"], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise LabError(f"imagebuilder publish {mcid} to the lab cluster failed: {proc.stderr.strip()[-1500:]}")
    result = dict(json.loads(proc.stdout))
    if registry is not None:
        block = Blockstore(store).get(registry)
        got = _block_put(entry.kubo, block)
        if got != str(registry):
            raise LabError(f"Kubo stored the device registry as {got}, not {registry}")
        client = ClusterClient(entry.rest_url)
        rep = Replication.parse(replication)
        client.pin(registry, rep, name="device-registry", prefer=[entry.peer_id])
        client.wait_pinned(registry, rep.min if not rep.everywhere else len(cluster.peers), timeout=120)
        result["device_registry"] = str(registry)
    return result


def _block_put(kubo: KuboNode, block: bytes) -> str:
    """`ipfs block put` of one dag-cbor block (the device registry is no manifest: publish refuses it)."""
    env = {**os.environ, "IPFS_PATH": str(kubo.repo)}
    proc = subprocess.run([kubo.binary, "block", "put", "--cid-codec", "dag-cbor", "--mhtype", "sha2-256"],
                          input=block, env=env, capture_output=True, timeout=60)
    if proc.returncode:
        raise LabError(f"ipfs block put: {proc.stderr.decode()}")
    return proc.stdout.decode().strip()


def _start_server(stack: ExitStack, lb: Lab, site: Site, mcid: str, tftp: Path, registry: CID | None, multi: bool,
                  extra: list[str]) -> BootServer:
    """One site's `bootstrap serve`: site 0 on br0 in the lab's namespace (as single-server labs
    always were), site s in its own namespace on eth0. With a cluster: an empty store of its own
    and every peer's gateway as `--upstream` and, after itself, as a boot-config gateway."""
    s, out = site.index, lb.out
    suffix = f"-{s}" if s else ""
    gws = lb.cluster_gateways()
    store = lb.dep.store
    if gws:
        store = out / f"server{s}-store"
        store.mkdir(parents=True, exist_ok=True)
    upstreams = tuple(gws)
    gateways = ("self", *gws) if gws else ()
    pfx = "/16" if multi else ""
    argv = [sys.executable, "-m", "bootstrap", "--log-json", "-v", "serve", "--interface",
            site.bridge if site.namespace is None else "eth0",
            "--dhcp-range", f"10.77.{s}.100-10.77.{s}.199{pfx}", "--store", str(store),
            "--manifest", mcid, "--devices", str(out / "devices.yaml"),
            "--tftp-root", str(tftp), "--state-dir", str(out / f"server-state{suffix}"),
            # only what the harness built into tftp/: a server in the lab's namespace has no mirror to build more from
            *[a for arch in sorted(lb.dep.bootstrap.uki) for a in ("--arch", arch)],
            "--agent-port", str(AGENT_PORT),
            *(["--device-registry", str(registry)] if registry else []),
            *[a for u in upstreams for a in ("--upstream", u)], *[a for g in gateways for a in ("--gateway", g)],
            *extra, *(["--key-log", str(key_log(out, s))] if "--key-policy" in extra else [])]
    log_path = out / f"boot-server{suffix}.log"
    log = open(log_path, "w")
    stack.callback(log.close)
    cmd = lb.net.cmd(argv) if site.namespace is None else lb.net.host_cmd(site.namespace, argv)
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    stack.callback(stop_process, server, 10)
    assert server.stdout is not None
    line = server.stdout.readline()
    if "serving on" not in line:
        raise LabError(f"boot server {s} did not start: {log_path.read_text()[-1500:]}")
    return BootServer(site, store, upstreams, gateways or ("self",), server, log_path)

