"""Run every bench/bench_*.py in turn (each in its own process, so peak-RSS figures are
per benchmark) and summarise which ones wrote their JSON."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/bench", help="directory for the JSON results")
    ap.add_argument("--only", action="append", default=[], help="run only benches whose name contains this")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    benches = sorted(Path(__file__).parent.glob("bench_*.py"))
    if args.only:
        benches = [b for b in benches if any(o in b.stem for o in args.only)]
    failed = []
    for b in benches:
        print(f"== {b.stem}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", f"bench.{b.stem}", "--out", str(out)])
        print(f"== {b.stem}: exit {rc} after {time.monotonic() - t0:.1f} s", flush=True)
        if rc:
            failed.append(b.stem)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
