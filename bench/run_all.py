"""Run every bench/bench_*.py in turn (each in its own process, so peak-RSS figures are per
benchmark), then print ONE table of every ratio against its goal and write
out/bench/summary.json (bench/summary.py) so figures can be compared between runs.

`--quick` skips the slow benches (image builds, 200 PXE clients, a cluster), boots once
instead of three times plus context boots, and runs the rest smaller (figures from smaller
files are not comparable with a full run's); the summary then lists the skipped benches' goals as "skipped", not as passes.
`--summary-only` rebuilds the table and summary.json from the JSON already in --out.
Each bench's wall time is printed and written to out/bench/run.json.
On a VM that hands freed memory back to its host at once, the run keeps it in the guest while it
lasts (bench/common.py `hold_freed_memory`; `--page-reporting leave` measures the VM as it is).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import summary
from bench.common import hold_freed_memory

# stem -> extra arguments in --quick mode, or None to skip the bench there
QUICK: dict[str, list[str] | None] = {
    "bench_boot": ["--quick", "--runs", "1"],  # the headline figure: one boot of ours, one reference
    "bench_build": None,  # cold image builds
    "bench_pxe200": None,  # 200 simultaneous clients
    "bench_cluster": None,  # a 3-peer IPFS Cluster
    "bench_tpm_boot": None,  # two more TCG boots (with and without swtpm); bench_boot is the quick run's boot
    "bench_private_boot": None,  # two harness boots (hello in clear and encrypted)
    "bench_scaleout": ["--clients", "1,2", "--size-mib", "8", "--no-qemu"],
    "bench_import": ["--size-mib", "64", "--repeat", "1"],
    "bench_fetch": ["--size-mib", "64"],
    "bench_tftp": ["--repeat", "3"],  # medians need a few alternating rounds; the C client is quick
    "bench_dhcp": ["--clients", "500"],
}


def discover() -> list[str]:
    return sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench", help="directory for the JSON results")
    ap.add_argument("--only", action="append", default=[], help="run only benches whose name contains this")
    ap.add_argument("--quick", action="store_true", help="skip the slow benches, run the others smaller")
    ap.add_argument("--summary-only", action="store_true", help="run nothing: summarise the JSON already in --out")
    ap.add_argument("--page-reporting", choices=("hold", "leave"), default="hold",
                    help="hold (default): keep freed memory in the guest for the run where the VM reports it "
                         "to the host at once; leave: measure the VM as it is (passed on to every bench)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    benches = discover()
    if args.only:
        benches = [b for b in benches if any(o in b for o in args.only)]
    skipped: dict[str, str] = {}
    failed: list[str] = []
    durations: dict[str, float] = {}
    since = None
    if not args.summary_only:
        since = time.time() - 1.0  # JSON older than this run is stale, not a result of it
        memory = hold_freed_memory() if args.page_reporting == "hold" else {"page_reporting": "left"}
        print("== memory: " + ", ".join(f"{k} {v}" for k, v in memory.items()), flush=True)
        t_all = time.monotonic()
        for stem in benches:
            extra: list[str] = []
            if args.quick:
                quick = QUICK.get(stem, [])
                if quick is None:
                    skipped[stem] = "skipped by --quick"
                    print(f"== {stem}: skipped (--quick)", flush=True)
                    continue
                extra = quick
            print(f"== {stem}", flush=True)
            t0 = time.monotonic()
            rc = subprocess.call([sys.executable, "-m", f"bench.{stem}", "--out", str(out),
                                  "--page-reporting", args.page_reporting, *extra])
            durations[stem] = round(time.monotonic() - t0, 1)
            print(f"== {stem}: exit {rc} after {durations[stem]:.1f} s", flush=True)
            if rc:
                failed.append(stem)
        durations["total"] = round(time.monotonic() - t_all, 1)
        (out / "run.json").write_text(json.dumps({"quick": args.quick, "seconds": durations, "failed": failed,
                                                  "skipped": skipped, "memory": memory}, indent=2) + "\n")
    rows = summary.build(out, benches, failed=failed, skipped=skipped, since=since)
    summary.write(rows, out / "summary.json")
    print()
    print(summary.table(rows))
    print(f"wrote {out / 'summary.json'}" + (f"; {durations['total']:.0f} s in all" if durations else ""))
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
