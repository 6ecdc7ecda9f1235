"""Power-on to agent ready, per stage, vs a plain iPXE boot of the same kernel, same run.

Reference: QEMU's iPXE ROM PXE-boots the same Debian kernel with a busybox initramfs from the
same boot server (DHCP, `boot.ipxe`, TFTP kernel + initrd), and busybox prints a marker:
what network-booting this kernel costs with no verification or measurement at all.
Ours: the hello flow through firmware (L0) -> bootstrap (L1) -> image (L2) with DICE,
manifest and layer verification, from `python -m qemu.harness boot`'s report (stage times
come from the timestamped serial console). Both under the same accelerator. Writes JSON, a
table, and an SVG timeline (one bar per stage) to --out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import write_results
from imagebuilder.cpio import Entry, archive_bytes

REPO = Path(__file__).resolve().parent.parent
MARKER = "cidboot-bench: busybox init reached"
COLORS = {"firmware": "#4e79a7", "bootstrap": "#f28e2b", "image": "#59a14f", "reference": "#9c9c9c"}


def busybox_initramfs() -> bytes:
    """/init = busybox sh printing the marker, then poweroff -f. gzip, fixed mtime."""
    bb = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    init = f"#!/bin/busybox sh\n/bin/busybox echo '{MARKER}'\n/bin/busybox poweroff -f\n".encode()
    entries = [Entry.file("bin/busybox", bb, 0o755), Entry.file("init", init, 0o755)]
    return gzip.compress(archive_bytes(entries, 0), mtime=0)


def reference_boot(kernel: Path, work: Path) -> dict[str, Any]:
    """PXE via the NIC's iPXE ROM -> the same kernel + busybox initramfs, timed on the console."""
    from qemu.harness.lab import device_mac
    from qemu.harness.netns import boot_network
    from qemu.harness.vm import Guest, GuestSpec

    tftp = work / "tftp-ref" / "bootstrap"
    tftp.mkdir(parents=True, exist_ok=True)
    shutil.copy(kernel, tftp / "vmlinuz")
    (tftp / "initrd.img").write_bytes(busybox_initramfs())
    from cidboot.blockstore import Blockstore
    from cidboot.cid import RAW

    store = Blockstore(work / "ref-store")
    placeholder = store.put_block(b"reference boot: no manifest", RAW)
    with boot_network(taps=1) as net:
        log = open(work / "ref-server.log", "w")
        server = net.popen([sys.executable, "-m", "bootstrap", "serve", "--interface", "br0", "--dhcp-range",
                            "10.77.0.100-10.77.0.119", "--store", str(store.path), "--manifest", str(placeholder),
                            "--tftp-root", str(tftp.parent), "--state-dir", str(work / "ref-state")],
                           stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            assert server.stdout is not None
            server.stdout.readline()
            spec = GuestSpec("reference", tap=net.taps[0], mac=device_mac(0), network_boot=True, memory_mib=512)
            with Guest(spec, work / "ref-guest", net) as g:
                line, _ = g.wait_for_console(MARKER, 300)
                kernel_line, _ = g.wait_for_console(r"Linux version", 5)
        finally:
            server.terminate()
            server.wait(10)
            log.close()
    return {"to_marker_s": line.t, "kernel_start_s": kernel_line.t}


def svg_timeline(bars: list[tuple[str, list[tuple[str, float, float]]]], path: Path) -> None:
    """One row per boot, one coloured segment per stage (start, duration in seconds)."""
    total = max((s + d for _, segs in bars for _, s, d in segs), default=1.0)
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
    for t in range(0, int(total) + 1, max(1, int(total // 10) or 1)):
        out.append(f'<text x="{left + t * scale:.1f}" y="{axis_y + 12}">{t}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def stages_from_report(report: dict[str, Any]) -> dict[str, float]:
    dev = report["devices"][0]
    return {k: float(v) for k, v in dev["boot_timeline"]["stage_seconds"].items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--report", type=Path, help="use this harness report.json instead of booting the hello flow")
    args = ap.parse_args(argv)
    out = Path(args.out)
    work = out / "boot-work"
    shutil.rmtree(work / "ref-guest", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.report:
        report = json.loads(args.report.read_text())
    else:
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", "qemu.harness", "boot", str(REPO / "examples/hello/flow.yaml"),
                              "--devices", "1", "--out", str(work / "ours"), "--keep"])
        print(f"harness boot: exit {rc} after {time.monotonic() - t0:.1f} s", flush=True)
        report = json.loads((work / "ours" / "report.json").read_text())
    kernel = work / "ours" / "work" / "workload" / "built" / "vmlinuz"
    if not kernel.exists():
        kernel = Path(report.get("kernel", kernel))
    ref = reference_boot(kernel, work)
    stages = stages_from_report(report)
    ours_total = sum(stages.values())
    rows = [{"boot": "plain iPXE + busybox (reference)", "seconds": round(ref["to_marker_s"], 2)},
            *({"boot": f"ours: {k}", "seconds": round(v, 2)} for k, v in stages.items()),
            {"boot": "ours: power-on to agent ready", "seconds": round(ours_total, 2),
             "ratio_vs_reference": round(ours_total / ref["to_marker_s"], 2)}]
    bars = [("iPXE+busybox", [("reference", 0.0, ref["to_marker_s"])])]
    t = 0.0
    segs = []
    for k, v in stages.items():
        segs.append((k, t, v))
        t += v
    bars.append(("cidboot L0-L1-L2", segs))
    svg_timeline(bars, out / "boot_timeline.svg")
    write_results(str(out), "bench_boot", rows, {
        "accel": report.get("accel"), "reference": ref, "stages": stages, "goal": "ratio <= 1.0",
        "svg": str(out / "boot_timeline.svg"),
        "appraisal": report["devices"][0]["appraisal"]["status"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
