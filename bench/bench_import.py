"""UnixFS import throughput vs `ipfs add --only-hash` (same file, same run), and the peak RSS
of our import for 16 MiB and 256 MiB files (it must not grow with the file).

The machine this runs on is shared, so one timing means little: for every file and profile
ours and Kubo run back to back `--repeat` times (alternating, so a burst of load hits both),
and the figure is the ratio of the two medians, with the spread of the per-pair ratios.
Ours is timed inside its child process (the import only, as in a long-running builder); the
whole-process ratio, interpreter start-up included, is reported beside it.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import parse_args, write_results

MIB = 1024 * 1024


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:  # random bytes: no two chunks dedupe, as with real images
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))


@dataclass(frozen=True)
class Run:
    cid: str
    wall_s: float  # the import (ours: inside the child) or the whole `ipfs add` (Kubo)
    cpu_s: float  # user + system CPU of the same span
    process_s: float  # the whole child process, start-up included
    peak_rss_kib: int


def ours(path: Path, cid_version: int) -> Run:
    code = (
        "import resource,time\n"
        "from cidboot.ipld.unixfs import ImportOptions, import_file\n"
        "t=time.perf_counter();c=time.process_time()\n"
        f"r=import_file({str(path)!r}, None, ImportOptions(cid_version={cid_version}))\n"
        "print(r.cid, time.perf_counter()-t, time.process_time()-c, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return Run(out[0], float(out[1]), float(out[2]), time.perf_counter() - t0, int(out[3]))


def kubo(binary: str, env: dict[str, str], path: Path, cid_version: int) -> Run:
    flags = ["--cid-version=1"] if cid_version else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    cid = subprocess.run([binary, "add", "-Q", "--only-hash", "--offline", *flags, str(path)], env=env,
                         check=True, capture_output=True, text=True).stdout.strip()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(cid, wall, cpu, wall, 0)


def main() -> int:
    args = parse_args(__doc__ or "", [
        ("--size-mib", {"type": int, "default": 256}),
        ("--repeat", {"type": int, "default": 3, "help": "runs of each side per figure (median taken)"}),
    ])
    binary = os.path.join(os.environ.get("CIDBOOT_TOOLS", os.path.expanduser("~/.cache/cidboot/bin")), "ipfs")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "IPFS_PATH": os.path.join(d, "repo")}
        subprocess.run([binary, "init", "--profile", "test", "--empty-repo"], env=env, check=True, capture_output=True)
        for mib in (16, args.size_mib):
            f = Path(d) / f"f{mib}"
            make_file(f, mib * MIB)
            for version in (0, 1):
                mine: list[Run] = []
                theirs: list[Run] = []
                for _ in range(max(1, args.repeat)):
                    mine.append(ours(f, version))
                    theirs.append(kubo(binary, env, f, version))
                pair_ratios = [k.wall_s / o.wall_s for o, k in zip(mine, theirs, strict=True)]
                o_s = statistics.median(r.wall_s for r in mine)
                k_s = statistics.median(r.wall_s for r in theirs)
                rows.append({
                    "file_MiB": mib, "cid_version": version,
                    "same_cid": all(o.cid == k.cid for o, k in zip(mine, theirs, strict=True)),
                    "ours_MBps": round(mib * MIB / 1e6 / o_s, 1), "kubo_MBps": round(mib * MIB / 1e6 / k_s, 1),
                    "ours/kubo": round(k_s / o_s, 3),
                    "ratio_min": round(min(pair_ratios), 3), "ratio_max": round(max(pair_ratios), 3),
                    "cpu_ratio": round(statistics.median(r.cpu_s for r in theirs)
                                       / statistics.median(r.cpu_s for r in mine), 3),
                    "process_ratio": round(k_s / statistics.median(r.process_s for r in mine), 3),
                    "ours_peak_rss_MiB": round(max(r.peak_rss_kib for r in mine) / 1024, 1),
                })
    write_results(args.out, "import", rows, {
        "kubo": "ipfs add --only-hash --offline (includes Kubo's process start, ~0.1 s)",
        "ours/kubo": f"Kubo's median wall time / ours (median of {args.repeat} alternating runs each); "
                     "ratio_min/max: spread of the per-pair ratios",
        "cpu_ratio": "the same with user+system CPU seconds (less sensitive to other load on the machine)",
        "process_ratio": "Kubo / our whole child process (Python start-up and imports included)",
        "rss": "peak RSS of a child process that only imports (Python interpreter included)",
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
