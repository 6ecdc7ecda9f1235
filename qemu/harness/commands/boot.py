"""`python -m qemu.harness boot FLOW --devices N`: build, boot, appraise, report."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from cidboot.cli import UsageError, print_json
from cidboot.errors import CidbootError, FormatError
from cidboot.ipld.cid import CID
from cidboot.store.cluster import Replication
from qemu.harness import accel, rundir
from qemu.harness.deploy import Deployment, prepare, prepare_manifest
from qemu.harness.lab import FIRMWARES, lab
from qemu.harness.problems import problem_line

log = logging.getLogger("qemu.harness")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("boot", help="boot a flow on N QEMU devices and appraise them",
                       description="Build the firmware, the bootstrap (trusting the flow's signers) and the flow; "
                                   "start the boot server in a network namespace; power on N devices; wait for "
                                   "their agents; attest each with a fresh nonce; write report.json.")
    add_boot_args(p)
    p.set_defaults(func=run)


def add_boot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("flow", help="flow.yaml of the workload, or the CID of a signed manifest in --store")
    p.add_argument("--store", type=Path, help="with a manifest CID: the block store that holds it")
    p.add_argument("--keys", type=Path, nargs="*", default=[],
                   help="with a manifest CID: its signing keys (PEM), to sign the device registry peers need")
    p.add_argument("--devices", type=int, default=None, help="number of devices (default: one per placement role)")
    p.add_argument("--out", type=Path, default=Path("out/harness"), help="report, consoles and device state")
    p.add_argument("--keep", action="store_true",
                   help="keep the whole run dir (images, store, keys, device disks and UDSs); without it only "
                        "report.json, the consoles, the boot server's log and fleet state stay")
    p.add_argument("--firmware", choices=FIRMWARES, default=None,
                   help="how devices boot (x86_64): dice = our L0 firmware from flash with the harness's DICE "
                        "engine (measured, the default); bios-ipxe = SeaBIOS + the NIC's iPXE ROM; uefi-pxe / "
                        "uefi-http = OVMF's own PXE / HTTP Boot loading the bootstrap UKI (no iPXE). The last "
                        "three are unmeasured without --tpm: appraised so, never affirming")
    p.add_argument("--legacy", action="store_true", help="same as --firmware bios-ipxe")
    p.add_argument("--tpm", action="store_true",
                   help="give each device a TPM 2.0 (swtpm, kept under its device dir; needs --firmware uefi-pxe or "
                        "uefi-http): the boot is TPM-measured. A device's first boot is the factory's known-good "
                        "boot: its firmware PCRs become the enrolled baseline (docs/tpm.md)")
    p.add_argument("--arch", choices=("x86_64", "arm64"), default="x86_64",
                   help="device architecture (default x86_64). arm64 builds the flow's arm64 twin "
                        "(flow-arm64.yaml beside it) and boots AAVMF on qemu-system-aarch64 -machine virt "
                        "(TCG) with --firmware uefi-pxe or uefi-http (default uefi-http)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for every agent (default 600)")
    p.add_argument("--cluster", type=int, default=0, metavar="K",
                   help="start K Kubo + IPFS Cluster peers in the lab (CRDT, private secret and swarm key, no public "
                        "routing), publish the manifest to them, and give every boot server an empty store that "
                        "fetches through --upstream from the peers' gateways (docs/scale-out.md)")
    p.add_argument("--boot-servers", type=int, default=1, metavar="S",
                   help="S boot servers, each on its own site LAN; device i boots from server i %% S (default 1)")
    p.add_argument("--replication", default="2:2", metavar="MIN:MAX",
                   help="with --cluster: the pins' replication factor (default 2:2; at most K)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def scale_out(args: argparse.Namespace) -> tuple[int, int, str]:
    """(cluster peers, boot servers, replication) from the arguments, checked before any build."""
    cluster, servers = getattr(args, "cluster", 0), getattr(args, "boot_servers", 1)
    replication = getattr(args, "replication", "2:2")
    if cluster < 0 or servers < 1:
        raise UsageError(f"--cluster must be >= 0 and --boot-servers >= 1 (got {cluster} and {servers})")
    if cluster:
        try:
            rep = Replication.parse(replication)
        except FormatError as e:
            raise UsageError(f"--replication: {e}") from None
        if not rep.everywhere and rep.min > cluster:
            raise UsageError(f"--replication {replication} needs at least {rep.min} cluster peers, --cluster is {cluster}")
    return cluster, servers, replication


def boot(args: argparse.Namespace) -> dict[str, Any]:
    scale_out(args)  # a bad --cluster/--replication is a usage error before anything is built
    out: Path = args.out.resolve()  # builds run with cwd = the repo: a relative --out would not be found
    if Path(args.flow).is_file() and Path(args.flow).resolve().parent in (out, *out.parents):
        raise CidbootError(f"--out {args.out} is inside the flow's directory, which is copied into the "
                           "image (with --out in it, forever): choose a directory outside it")
    out.mkdir(parents=True, exist_ok=True)
    keep = getattr(args, "keep", False)
    try:
        report = _boot(args, out)
    finally:  # a failed run too: its consoles and log stay, its images do not
        if not keep:
            cleaned = rundir.clean(out, spare=(args.store,) if getattr(args, "store", None) is not None else ())
            say(cleaned.line())
    if not keep:
        report["run_dir"] = cleaned.to_obj()
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _boot(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cluster, servers, replication = scale_out(args)
    if Path(args.flow).is_file():
        say(f"building firmware, bootstrap and {args.flow} (cached layers are reused)")
        dep: Deployment = prepare(Path(args.flow), out / "work", say=say, arch=getattr(args, "arch", "x86_64"))
    else:
        try:
            mcid = CID.parse(args.flow)
        except FormatError:
            raise CidbootError(f"{args.flow}: neither a flow file nor a manifest CID") from None
        if args.store is None:
            raise CidbootError("booting a manifest CID needs --store (the block store that holds it)")
        if getattr(args, "arch", "x86_64") != "x86_64":
            raise CidbootError("--arch arm64 boots a flow file (its flow-arm64.yaml), not a manifest CID")
        say(f"building firmware and a bootstrap that trusts manifest {mcid}'s root")
        dep = prepare_manifest(mcid, args.store.resolve(), out / "work", signer_keys=args.keys, say=say)
    roles = dep.roles
    n = args.devices or len(roles)
    device_roles = [roles[i % len(roles)] for i in range(n)]
    say(f"manifest {dep.workload.manifest}; {n} device(s): {', '.join(device_roles)}")
    mode = accel.choose(dep.firmware.kernel if dep.arch == "x86_64" else None, dep.arch)
    firmware = args.firmware or ("bios-ipxe" if args.legacy else "dice" if dep.arch == "x86_64" else "uefi-http")
    tpm = bool(getattr(args, "tpm", False))
    if tpm and not firmware.startswith("uefi"):
        raise CidbootError("--tpm needs --firmware uefi-pxe or uefi-http (UEFI measures the boot into the TPM)")
    if cluster:
        say(f"lab: {cluster} cluster peers, {servers} boot server(s) with empty stores and --upstream")
    with lab(dep, out / "lab", device_roles, cluster=cluster, boot_servers=servers, replication=replication,
             tpm=tpm) as lb:
        for role in device_roles:
            lb.add_device(role, firmware=firmware, accel=mode)
        say(f"powering on ({mode}); consoles in {out / 'lab' / 'devices'}")
        lb.power_on()
        lb.wait_ready(args.timeout)
        if tpm:
            enrol_first_boots(lb)
        lb.wait_flow(args.timeout)  # results and vetoes are known only once the flow is done
        say("attesting every device with a fresh nonce")
        report = lb.report(allow_unmeasured=False)
    report["accel"] = mode
    report["firmware"] = firmware
    report["arch"] = dep.arch
    return report


def enrol_first_boots(lb: Any) -> None:
    """A TPM device without a firmware baseline is on its factory boot: record it (docs/tpm.md)."""
    from cidboot.trust.appraisal import DeviceRoots

    roots = DeviceRoots.load(lb.roots_file)
    for dev in lb.devices:
        known = [t for d, t in roots.tpm.items() if roots.names.get(d) == dev.name]
        if dev.url and known and not known[0].firmware_pcrs:
            say(f"{dev.name}: factory boot: recording its firmware PCRs as the enrolled baseline")
            lb.enrol(dev)


def summary(report: dict[str, Any]) -> str:
    lines = [f"manifest {report['manifest_cid']} ({report['flow']}, {report['accel']})"]
    for d in report["devices"]:
        st = d["boot_timeline"]["stage_seconds"]
        stages = "  ".join(f"{k} {v:.1f}s" for k, v in st.items())
        how = ", ".join([d["role"], *([f"{d['firmware']} {d.get('arch', '')}".strip()] if d.get("firmware") else []),
                         d["boot"]])
        lines.append(f"{d['name']} [{how}] {d['outcome']}: appraisal {d['appraisal']['status']}"
                     f"  {stages}")
        if d.get("boot_server"):
            bs = d["boot_server"]
            lines.append(f"    boot server {bs['site']} {bs['url']}"
                         + (f", upstreams {' '.join(bs['upstreams'])}" if bs.get("upstreams") else ""))
        if d["reason"]:
            lines.append(f"    {d['reason']}")
        for r in d["appraisal"]["reasons"]:
            if not r.startswith("affirming"):
                lines.append(f"    {r}")
        for p in d.get("problems") or []:  # vetoes, refusals, errors: from the audit log, with their inputs
            lines.append(f"    {problem_line(p)}")
        if not d.get("problems"):  # no audit log to read (no agent): what the console said
            for p in d["boot_timeline"].get("problems", []):
                lines.append(f"    {p['kind']}: {p['reason']}")
        if isinstance(d["flow_results"], dict):
            res = d["flow_results"].get("results", d["flow_results"])
            lines.append(f"    results: {json.dumps(res, sort_keys=True)[:300]}")
    for k in report.get("key_broker") or []:  # a private image: the boot server's key broker decisions
        lines.append(f"key broker: {k['decision']} device {str(k.get('device_id'))[:16]}: {k['check']}"
                     + ("" if k["decision"] == "release" else f": {str(k.get('reason'))[:300]}"))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = boot(args)
    if args.json:
        print_json(report)
    else:
        print(summary(report))
        print(f"report: {args.out / 'report.json'}")
    return 0 if all(d["appraisal"]["status"] == "affirming" for d in report["devices"]) else 1
