"""Power-on to agent ready, per stage, vs a plain iPXE boot of the same kernel, same run.

Reference: QEMU's iPXE ROM PXE-boots the same Debian kernel with a busybox initramfs from the
same boot server (`bootstrap serve`: DHCP, its generated `boot.ipxe`, TFTP kernel + initrd;
the busybox initramfs simply takes the bootstrap's place in the TFTP root, so no script
override is needed), and busybox prints a marker: what network-booting this kernel costs with
no verification or measurement at all. Timed from power-on (QMP `cont`) to the marker on the
timestamped serial console, median of --runs.
Ours: the hello flow through firmware (L0) -> bootstrap (L1) -> image (L2) with DICE,
manifest and layer verification, from the report.json of `python -m qemu.harness boot`
(stage times come from the same timestamped console), median of --our-runs boots (default
--runs); the per-stage rows are those of the median boot. Reference and our boots alternate
(reference, ours, reference, ours, ..., reference): on a shared machine the load changes over
minutes, and one busy spell must not fall on one side of the ratio only. Both under the same
accelerator.
With `--firmware` naming several kinds (the harness's `--firmware dice|bios-ipxe|uefi-pxe|
uefi-http`, x86_64), the hello flow boots once per kind. The dice and bios-ipxe boots are compared
with the plain iPXE reference, the uefi-* boots with a plain UEFI PXE boot in the same run:
OVMF's own PXE loads a UKI (the same systemd-boot stub our bootstrap UKI uses) of the same kernel
and busybox initramfs.
With `--arch arm64` the hello flow boots on AAVMF (`qemu-system-aarch64 -machine virt`, TCG) by
each uefi-* kind given (default uefi-http), compared with a plain AAVMF HTTP Boot in the same run of a UKI
(Debian's pinned linuxaa64.efi.stub) of the same arm64 kernel with an initramfs holding no
userspace at all (there is no arm64 busybox here): timed to the kernel's "no root, no init"
panic, the moment busybox's init would start. The x86_64 references still run, as context.
Writes JSON, a table, and an SVG timeline (one bar per stage) to --out.

    python3 -m bench.bench_boot                      # boot the hello flow, then the reference
    python3 -m bench.bench_boot --firmware dice,bios-ipxe,uefi-pxe,uefi-http
    python3 -m bench.bench_boot --arch arm64         # AAVMF UEFI HTTP Boot of the hello flow
    python3 -m bench.bench_boot --report R.json      # stages from an existing harness report
    python3 -m bench.bench_boot --reference-only     # just the plain iPXE boot
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.common import add_memory_option, settle_memory, write_results
from bootstrap.bootfiles import INITRD_NAME, KERNEL_NAME, SERVED_NAMES
from imagebuilder.cpio import Entry, archive_bytes

REPO = Path(__file__).resolve().parent.parent
MARKER = "cidboot-bench: busybox init reached"
REF_IPXE = "plain iPXE + busybox (reference)"
REF_UEFI = "plain UEFI PXE + busybox UKI (reference)"
REF_AAVMF = "plain AAVMF HTTP Boot, same kernel, no userspace (reference)"
NO_ARM64_REF = "no plain AAVMF reference boot in this run"
PANIC_MARKER = r"Kernel panic - not syncing"  # the arm64 reference's end: the kernel found no init to run
ARM64_KERNEL_PKG = "linux-image-cloud-arm64"
UKI_CMDLINE = "console=ttyS0 quiet panic=-1 no_timer_check"  # the hello flow's, as our bootstrap UKI's
KERNEL_PKG = "linux-image-cloud-amd64"  # the kernel firmware, bootstrap and hello all pin
COLORS = {"firmware": "#4e79a7", "bootstrap": "#f28e2b", "image": "#59a14f", "reference": "#9c9c9c",
          "firmware boot": "#a0cbe8", "bootstrap boot": "#ffbe7d", "image boot": "#8cd17d"}
STAGES = ("firmware", "bootstrap", "image")

Bars = list[tuple[str, list[tuple[str, float, float]]]]


def busybox_initramfs(script: str | None = None) -> bytes:
    """/init = busybox sh printing the marker, then `poweroff -f` (or `script`). gzip, fixed mtime.

    /dev/console is in the archive because the kernel opens it for init's stdio before any
    devtmpfs could be mounted; without it the marker would go nowhere."""
    bb = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    body = script if script is not None else f"/bin/busybox echo '{MARKER}'\n/bin/busybox poweroff -f\n"
    init = f"#!/bin/busybox sh\n{body}".encode()
    entries = [Entry.directory("bin"), Entry.directory("dev"), Entry.chardev("dev/console", 5, 1),
               Entry.file("bin/busybox", bb, 0o755), Entry.file("init", init, 0o755)]
    return gzip.compress(archive_bytes(entries, 0), mtime=0)


def pinned_kernel(dest: Path, arch: str = "x86_64") -> Path:
    """The Debian kernel the stages boot (from the hello flow's lock for `arch`, via the .deb cache)."""
    from imagebuilder.debpkg import read_deb
    from imagebuilder.lock import Lock, fetch_deb

    if not dest.exists():
        lock = REPO / "examples/hello" / ("flow.lock" if arch == "x86_64" else "flow-arm64.lock")
        deb = fetch_deb(Lock.load(lock).pin(KERNEL_PKG if arch == "x86_64" else ARM64_KERNEL_PKG), f"refresh {lock}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(next(f.data for f in read_deb(deb) if f.path.startswith("boot/vmlinuz-")))
    return dest


def busybox_uki(kernel: Path) -> bytes:
    """The same kernel + busybox initramfs as a UKI on Debian's systemd-boot stub (what OVMF's
    PXE loads, as it loads our bootstrap UKI)."""
    from imagebuilder import uki

    return uki.build_uki(uki.stub_path().read_bytes(), kernel.read_bytes(), busybox_initramfs(), UKI_CMDLINE,
                         uki.os_release("busybox-reference", 1))


def arm64_reference_uki(kernel: Path) -> bytes:
    """The arm64 kernel on the arm64 bootstrap's pinned stub with an initramfs of only
    /dev/console: nothing to run, so the kernel panics where busybox's init would have started."""
    from imagebuilder import uki
    from imagebuilder.build import _stub_from_deb
    from imagebuilder.lock import Lock, fetch_deb

    lock = REPO / "bootstrap/image/flow-arm64.lock"
    stub = _stub_from_deb(fetch_deb(Lock.load(lock).pin(uki.STUB_PACKAGE), f"refresh {lock}"), "arm64")
    empty = gzip.compress(archive_bytes([Entry.directory("dev"), Entry.chardev("dev/console", 5, 1)], 0), mtime=0)
    return uki.build_uki(stub, kernel.read_bytes(), empty, "console=ttyAMA0 quiet", uki.os_release("aavmf-reference", 1),
                         "arm64")


def reference_boot(kernel: Path, work: Path, *, accel: str = "tcg", timeout: float = 300,
                   ipv6_router: bool = True, uefi: bool = False, arch: str = "x86_64") -> dict[str, Any]:
    """PXE via the NIC's iPXE ROM (or, `uefi`, OVMF's own PXE loading a busybox UKI) -> the same
    kernel + busybox initramfs, timed on the console.

    With `ipv6_router` an empty router advertisement answers iPXE's IPv6 solicitations (see
    qemu/harness/ra.py); without, iPXE waits ~16 s for a router before it fetches anything.
    `arch` "arm64": AAVMF's HTTP Boot of arm64_reference_uki(kernel), to its panic marker."""
    from cidboot.ipld.cid import RAW
    from cidboot.store.blockstore import Blockstore
    from qemu.harness.lab import device_mac
    from qemu.harness.netns import boot_network
    from qemu.harness.ra import router_advertiser
    from qemu.harness.vm import Guest, GuestError, GuestSpec

    tftp = work / "tftp-ref"
    (tftp / "bootstrap").mkdir(parents=True, exist_ok=True)
    shutil.copy(kernel, tftp / "bootstrap" / "vmlinuz")
    (tftp / "bootstrap" / "initrd.img").write_bytes(busybox_initramfs())
    # the placeholder manifest has no root to build a bootstrap for, so every other boot file the
    # server offers is supplied too (the QEMU NIC's iPXE ROM asks only for boot.ipxe and bootstrap/)
    for name in set(SERVED_NAMES) - {KERNEL_NAME, INITRD_NAME}:
        (tftp / name).write_bytes(f"reference boot: placeholder {name}\n".encode())
    arm64 = arch == "arm64"
    if arm64:
        (tftp / "bootstrap" / "vmlinuz").write_bytes(b"reference boot: placeholder (arm64 boots its UKI)\n")
        (tftp / "bootstrap-arm64.efi").write_bytes(arm64_reference_uki(kernel))
    elif uefi:
        (tftp / "bootstrap-x86_64.efi").write_bytes(busybox_uki(kernel))
    store = Blockstore(work / "ref-store")
    placeholder = store.put_block(b"reference boot: no manifest", RAW)
    shutil.rmtree(work / "ref-guest", ignore_errors=True)
    with boot_network(taps=1) as net, open(work / "ref-server.log", "w") as log, ExitStack() as stack:
        if ipv6_router:
            stack.enter_context(router_advertiser(net))
        server = net.popen([sys.executable, "-m", "bootstrap", "--log-json", "-v", "serve", "--interface", "br0", "--dhcp-range",
                            "10.77.0.100-10.77.0.119", "--store", str(store.path), "--manifest", str(placeholder),
                            "--tftp-root", str(tftp), "--state-dir", str(work / "ref-state")],
                           stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
        try:
            assert server.stdout is not None
            if "serving on" not in server.stdout.readline():
                raise RuntimeError(f"boot server did not start: {(work / 'ref-server.log').read_text()[-1500:]}")
            if arm64:
                g = Guest(GuestSpec("reference", tap=net.taps[0], mac=device_mac(0), network_boot=True, accel=accel,
                                    firmware="uefi", uefi_http=True, arch="arm64"), work / "ref-guest", net)
            else:
                g = Guest.create("reference", work / "ref-guest", nic=(net.taps[0], device_mac(0)),
                                 boot_from_network=True, memory_mib=512, accel=accel, net=net,
                                 firmware="uefi" if uefi else "bios")
            with g:
                line, _ = g.wait_for_console(PANIC_MARKER if arm64 else MARKER, timeout)
                if arm64:  # the kernel waits there (no panic=): nothing more to time
                    return {"to_marker_s": line.t, "firmware": "uefi-http", "arch": "arm64",
                            "console": str(work / "ref-guest" / "console.log")}
                found: dict[str, float | None] = {}
                for key, rx in (() if uefi else (("ipxe_configured_s", r"^Configuring \(net0 .* ok"),
                                                  ("kernel_start_s", r"Linux version"),
                                                  ("ipxe_first_line_s", r"iPXE"))):
                    try:  # context only: boot.ipxe passes the bootstrap's `quiet`, so no `Linux version`
                        hit, _ = g.wait_for_console(rx, 5)
                        found[key] = hit.t
                    except GuestError:
                        found[key] = None
                off_t, _ = g.wait_for_event("SHUTDOWN", 60)
        finally:
            server.terminate()
            server.wait(10)
    return {"to_marker_s": line.t, **found, "firmware": "uefi-pxe" if uefi else "bios-ipxe",
            "ipv6_router": ipv6_router, "powered_off_s": round(off_t, 3),
            "console": str(work / "ref-guest" / "console.log")}


def direct_boot(kernel: Path, work: Path, *, accel: str = "tcg") -> dict[str, Any]:
    """The floor: the same kernel + busybox initramfs from -kernel/-initrd, no network at all."""
    from qemu.harness.vm import Guest

    initrd = work / "busybox-initrd.img"
    initrd.write_bytes(busybox_initramfs())
    shutil.rmtree(work / "direct-guest", ignore_errors=True)
    with Guest.create("direct", work / "direct-guest", kernel=kernel, initrd=initrd, append="console=ttyS0 panic=-1",
                      memory_mib=512, accel=accel) as g:
        line, _ = g.wait_for_console(MARKER, 120)
    return {"to_marker_s": line.t}


def stages_from_report(report: dict[str, Any], device: int = 0) -> dict[str, float]:
    """Per-stage seconds of one device of a harness report (boot_timeline.stage_seconds)."""
    st = report["devices"][device]["boot_timeline"]["stage_seconds"]
    return {k: float(st[k]) for k in STAGES if k in st}


def median_boot(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The report whose power-on-to-ready total is the median of `reports` (the lower middle of
    an even count): its stage and phase rows then belong to one real boot, not a mix of several."""
    ranked = sorted(reports, key=lambda r: sum(stages_from_report(r).values()))
    return ranked[(len(ranked) - 1) // 2]


def phases_from_report(report: dict[str, Any], device: int = 0) -> list[tuple[str, float, float]]:
    """Each stage split in two, from the console events: "<stage> boot" (from the previous
    hand-over, or power-on, to the stage's `start` line: kernel, modules, Python start-up) and
    the stage's own work (`start` to its hand-over, or `agent ready`). (name, start, seconds)."""
    ev = report["devices"][device]["boot_timeline"].get("events", {})
    marks = [("firmware", "firmware", "handover"), ("bootstrap", "bootstrap", "handover"), ("image", "agent", "ready")]
    out: list[tuple[str, float, float]] = []
    prev = 0.0
    for name, stage, end_event in marks:
        start, end = ev.get(stage, {}).get("start"), ev.get(stage, {}).get(end_event)
        if start is None or end is None:
            continue
        out += [(f"{name} boot", prev, round(start - prev, 3)), (name, start, round(end - start, 3))]
        prev = end
    return out


def svg_timeline(bars: Bars, path: Path) -> None:
    """One row per boot, one coloured segment per stage (start, duration in seconds). Stdlib only."""
    total = max((s + d for _, segs in bars for _, s, d in segs), default=1.0) or 1.0
    scale, left, row_h = 600 / total, 150, 34
    height = 40 + row_h * len(bars) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + 640}" height="{height}" font-family="sans-serif" '
           'font-size="12">', '<text x="10" y="20" font-size="14">Power-on to ready (seconds since power-on)</text>']
    for i, (label, segs) in enumerate(bars):
        y = 36 + i * row_h
        out.append(f'<text x="10" y="{y + 16}">{label}</text>')
        for name, start, dur in segs:
            x, w = left + start * scale, max(dur * scale, 1)
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="22" fill="{COLORS.get(name, "#bab0ac")}">'
                       f'<title>{name}: {dur:.2f} s</title></rect>')
            if w > 60:
                out.append(f'<text x="{x + 4:.1f}" y="{y + 15}" fill="white">{name} {dur:.1f}s</text>')
    axis_y = 36 + row_h * len(bars) + 8
    step = max(1, int(total // 10))
    for t in range(0, int(total) + 1, step):
        out.append(f'<text x="{left + t * scale:.1f}" y="{axis_y + 12}">{t}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def firmware_rows(boots: dict[str, dict[str, Any]], refs: dict[str, float],
                  arch: str = "x86_64") -> tuple[list[dict[str, Any]], Bars]:
    """One row per firmware kind other than dice: power-on to agent ready (from that boot's
    report), with its ratio to the plain boot of the same firmware family and arch (`reference`
    names it; arm64 has none yet, so its rows say why instead of borrowing x86_64's)."""
    rows: list[dict[str, Any]] = []
    bars: Bars = []
    for kind, report in boots.items():
        label = kind if arch == "x86_64" else f"{kind}, {arch}"
        stages = stages_from_report(report)
        if not stages:
            rows.append({"boot": f"ours ({label}): power-on to agent ready", "seconds": None, "note": "no timeline",
                         "arch": arch})
            continue
        total = sum(stages.values())
        ref_name = (REF_UEFI if kind.startswith("uefi") else REF_IPXE) if arch == "x86_64" else REF_AAVMF
        ref = refs.get(ref_name)
        rows.append({"boot": f"ours ({label}): power-on to agent ready", "seconds": round(total, 2),
                     "ratio_vs_reference": round(total / ref, 2) if ref else None, "reference": ref_name,
                     "appraisal": report["devices"][0].get("appraisal", {}).get("status"), "arch": arch,
                     **({} if ref or arch == "x86_64" else {"note": NO_ARM64_REF})})
        segs, t = [], 0.0
        for k, v in stages.items():
            segs.append((k, t, v))
            t += v
        bars.append((f"ours {label}", segs))
    return rows, bars


def summarize(ref_s: float | None, stages: dict[str, float], extra: dict[str, float] | None = None,
              phases: list[tuple[str, float, float]] | None = None) -> tuple[list[dict[str, Any]], Bars]:
    """Table rows and SVG bars for the reference time and our per-stage times (either may be
    missing); `extra` are further context rows (label -> seconds), not in the ratio; `phases`
    (phases_from_report) draw each stage as its boot and its work."""
    rows: list[dict[str, Any]] = []
    bars: Bars = []
    for label, sec in (extra or {}).items():
        rows.append({"boot": label, "seconds": round(sec, 2)})
    if ref_s is not None:
        rows.append({"boot": REF_IPXE, "seconds": round(ref_s, 2)})
        bars.append(("iPXE+busybox", [("reference", 0.0, ref_s)]))
    if stages:
        total = sum(stages.values())
        rows += [{"boot": f"ours: {k}", "seconds": round(v, 2)} for k, v in stages.items()]
        rows.append({"boot": "ours: power-on to agent ready", "seconds": round(total, 2),
                     "ratio_vs_reference": round(total / ref_s, 2) if ref_s else None, "reference": REF_IPXE})
        segs, t = [], 0.0
        for k, v in stages.items():
            segs.append((k, t, v))
            t += v
        bars.append(("cidboot L0-L1-L2", segs))
        if phases:
            rows += [{"boot": f"ours: {name}" + ("" if name.endswith(" boot") else " work"), "seconds": round(d, 2)}
                     for name, _s, d in phases]
            bars.append(("boot | work", phases))
    return rows, bars


def harness_boot(firmware: str, out: Path, arch: str = "x86_64") -> dict[str, Any] | None:
    """The hello flow, one device, booted by the harness with `firmware` on `arch`; its report (None if none)."""
    t0 = time.monotonic()
    rc = subprocess.call([sys.executable, "-m", "qemu.harness", "boot", str(REPO / "examples/hello/flow.yaml"),
                          "--devices", "1", "--firmware", firmware, "--arch", arch, "--out", str(out)], cwd=REPO)
    print(f"harness boot ({firmware}, {arch}): exit {rc} after {time.monotonic() - t0:.1f} s", flush=True)
    path = out / "report.json"
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--report", type=Path, help="use this harness report.json instead of booting the hello flow")
    ap.add_argument("--reference-only", action="store_true", help="only the plain iPXE + busybox boot")
    ap.add_argument("--runs", type=int, default=3, help="reference boots (the median is reported)")
    ap.add_argument("--our-runs", type=int, default=None,
                    help="boots of the hello flow with the dice firmware, alternating with the reference boots "
                         "(the median boot is reported; default: --runs)")
    ap.add_argument("--quick", action="store_true",
                    help="skip the context rows (direct -kernel boot; iPXE with no IPv6 router)")
    ap.add_argument("--firmware", default=None,
                    help="comma-separated firmware kinds to boot the hello flow with (dice, bios-ipxe, uefi-pxe, "
                         "uefi-http; default dice, with --arch arm64 uefi-http); uefi-* on x86_64 adds the plain "
                         "UEFI PXE reference")
    ap.add_argument("--arch", choices=("x86_64", "arm64"), default="x86_64",
                    help="the architecture the hello flow boots on (arm64: AAVMF, uefi-* kinds only)")
    add_memory_option(ap)
    args = ap.parse_args(argv)
    settle_memory(args)
    from qemu.harness.lab import FIRMWARES

    kinds = [k.strip() for k in (args.firmware or ("uefi-http" if args.arch == "arm64" else "dice")).split(",")
             if k.strip()]
    bad = [k for k in kinds if k not in FIRMWARES]
    if bad or not kinds:
        ap.error(f"--firmware: {', '.join(bad) or 'none given'}: choose from {', '.join(FIRMWARES)}")
    if args.arch == "arm64" and any(not k.startswith("uefi") for k in kinds):
        ap.error(f"--arch arm64 boots UEFI only (AAVMF): {', '.join(k for k in kinds if not k.startswith('uefi'))} "
                 "is x86_64's")
    from qemu.harness import accel as accel_mod

    out = Path(args.out).resolve()  # the harness runs with cwd=REPO
    work = out / "boot-work"
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] | None = None
    others: dict[str, dict[str, Any]] = {}  # firmware kind -> its report (kinds other than dice)
    if args.report:
        report = json.loads(args.report.read_text())
    kernel = pinned_kernel(work / "vmlinuz")
    mode = str(report.get("accel")) if report and report.get("accel") else accel_mod.choose(kernel)
    booting = not args.report and not args.reference_only
    refs: list[dict[str, Any]] = []
    uefi_refs: list[dict[str, Any]] = []
    arm64_refs: list[dict[str, Any]] = []
    arm64_kernel = pinned_kernel(work / "vmlinuz-arm64", "arm64") if args.arch == "arm64" and booting else None

    def references(n: int) -> None:
        for _ in range(n):
            refs.append(reference_boot(kernel, work, accel=mode))
            if args.arch == "x86_64" and any(k.startswith("uefi") for k in kinds):
                uefi_refs.append(reference_boot(kernel, work, accel=mode, uefi=True))
            if arm64_kernel is not None:
                arm64_refs.append(reference_boot(arm64_kernel, work, accel=mode, arch="arm64"))

    our_runs = max(1, args.our_runs if args.our_runs is not None else args.runs)
    dice_reports: list[dict[str, Any]] = []
    if booting:
        references(1)
        for kind in kinds:
            sub = "ours" if kind == "dice" else f"ours-{kind}" + ("" if args.arch == "x86_64" else f"-{args.arch}")
            got = harness_boot(kind, work / sub, args.arch)
            if kind == "dice" and got is not None:
                dice_reports.append(got)
            elif got is not None:
                others[kind] = got
        for i in range(2, our_runs + 1 if "dice" in kinds else 0):
            references(1)
            got = harness_boot("dice", work / f"ours-run{i}", args.arch)
            if got is not None:
                dice_reports.append(got)
    done = len(refs)
    references(max(1, args.runs - done) if booting else max(1, args.runs))
    if dice_reports:
        report = median_boot(dice_reports)
    ref_s = statistics.median(r["to_marker_s"] for r in refs)
    ref_times = {REF_IPXE: ref_s}
    if uefi_refs:
        ref_times[REF_UEFI] = statistics.median(r["to_marker_s"] for r in uefi_refs)
    if arm64_refs:
        ref_times[REF_AAVMF] = statistics.median(r["to_marker_s"] for r in arm64_refs)
    extra: dict[str, float] = {}
    context: dict[str, Any] = {}
    if not args.quick:
        context["direct"] = direct_boot(kernel, work, accel=mode)
        context["no_ipv6_router"] = reference_boot(kernel, work, accel=mode, ipv6_router=False)
        extra = {"same kernel + busybox, -kernel/-initrd, no network": context["direct"]["to_marker_s"],
                 "plain iPXE + busybox, no IPv6 router on the link": context["no_ipv6_router"]["to_marker_s"]}
    stages = stages_from_report(report) if report else {}
    phases = phases_from_report(report) if report else []
    rows, bars = summarize(ref_s, stages, extra, phases)
    if uefi_refs:
        rows.append({"boot": REF_UEFI, "seconds": round(ref_times[REF_UEFI], 2)})
        bars.append(("UEFI PXE+busybox", [("reference", 0.0, ref_times[REF_UEFI])]))
    if arm64_refs:
        rows.append({"boot": REF_AAVMF, "seconds": round(ref_times[REF_AAVMF], 2), "arch": "arm64"})
        bars.append(("AAVMF HTTP, no init", [("reference", 0.0, ref_times[REF_AAVMF])]))
    fw_rows, fw_bars = firmware_rows(others, ref_times, args.arch)
    rows += fw_rows
    bars += fw_bars
    svg_timeline(bars, out / "boot_timeline.svg")
    write_results(str(out), "bench_boot", rows, {
        "accel": mode, "reference_runs": refs, "uefi_reference_runs": uefi_refs, "firmware": kinds, "arch": args.arch,
        "arm64_reference_runs": arm64_refs,
        "firmware_stages": {k: stages_from_report(r) for k, r in others.items()},
        "context_runs": context, "stages": stages,
        "our_runs": [{"total_s": round(sum(stages_from_report(r).values()), 3), "stages": stages_from_report(r)}
                     for r in dice_reports],
        "phases": [{"phase": n, "start_s": st, "seconds": d} for n, st, d in phases], "goal": "ours / reference as low as verification allows",
        "svg": str(out / "boot_timeline.svg"),
        "appraisal": report["devices"][0]["appraisal"]["status"] if report else None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
