"""UnixFS import throughput vs `ipfs add --only-hash` (same file, same run), and the peak RSS
of our import for 16 MiB and 256 MiB files (it must not grow with the file)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import parse_args, write_results

MIB = 1024 * 1024


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:  # random bytes: no two chunks dedupe, as with real images
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))


def rss_child(path: Path, cid_version: int) -> tuple[float, int, str]:
    code = (
        "import resource,sys,time\n"
        "from cidboot.ipld.unixfs import ImportOptions, import_file\n"
        "t=time.perf_counter()\n"
        f"r=import_file({str(path)!r}, None, ImportOptions(cid_version={cid_version}))\n"
        "print(r.cid, time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return float(out[1]), int(out[2]), out[0]


def main() -> int:
    args = parse_args(__doc__ or "", [("--size-mib", {"type": int, "default": 256})])
    kubo = os.path.join(os.environ.get("CIDBOOT_TOOLS", os.path.expanduser("~/.cache/cidboot/bin")), "ipfs")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "IPFS_PATH": os.path.join(d, "repo")}
        subprocess.run([kubo, "init", "--profile", "test", "--empty-repo"], env=env, check=True, capture_output=True)
        for mib in (16, args.size_mib):
            f = Path(d) / f"f{mib}"
            make_file(f, mib * MIB)
            for version in (0, 1):
                secs, rss_kib, ours = rss_child(f, version)
                t0 = time.perf_counter()
                flags = ["--cid-version=1"] if version else []
                theirs = subprocess.run([kubo, "add", "-Q", "--only-hash", "--offline", *flags, str(f)], env=env,
                                        check=True, capture_output=True, text=True).stdout.strip()
                kubo_s = time.perf_counter() - t0
                rows.append({
                    "file_MiB": mib, "cid_version": version, "same_cid": ours == theirs,
                    "ours_MBps": round(mib * MIB / 1e6 / secs, 1), "kubo_MBps": round(mib * MIB / 1e6 / kubo_s, 1),
                    "ours/kubo": round(kubo_s / secs, 3), "ours_peak_rss_MiB": round(rss_kib / 1024, 1),
                })
    write_results(args.out, "import", rows, {
        "kubo": "ipfs add --only-hash --offline (includes Kubo's process start, ~0.1 s)",
        "rss": "peak RSS of a child process that only imports (Python interpreter included)",
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
