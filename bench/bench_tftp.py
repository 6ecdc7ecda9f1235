"""TFTP throughput: our read-only server vs tftpd-hpa (Debian's in.tftpd, run by hand) for a
16 MiB file, at blksize 512 and 1468 and with RFC 7440 windowsize.

Both servers run in one network namespace this bench creates; the client runs in a second
namespace linked to it by a veth through a bridge, and is the same program for both
(bench/tftp_client.py; a server without windowsize gets a window of 1 from its OACK). Each
figure is the best of --repeat runs, ours and tftpd-hpa alternating; every download is checked byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import parse_args, write_results
from qemu.harness.netns import boot_network

MIB = 1024 * 1024
OURS, HPA, BASELINE = 6969, 6970, 6971
CASES = [(512, 1), (1468, 1), (1468, 8), (1468, 32)]


def client_main(argv: list[str]) -> int:
    """Child mode (inside the client namespace): one download, prints seconds and sha256."""
    from bench.tftp_client import get

    host, port, name, bs, win = argv[0], int(argv[1]), argv[2], int(argv[3]), int(argv[4])
    t0 = time.perf_counter()
    data = get(host, port, name, blksize=bs, windowsize=win)
    print(time.perf_counter() - t0, hashlib.sha256(data).hexdigest(), len(data))
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        return client_main(sys.argv[2:])
    args = parse_args(__doc__ or "", [
        ("--size-mib", {"type": int, "default": 16}), ("--repeat", {"type": int, "default": 4}),
        ("--baseline", {"metavar": "DIR", "help": "also run the server of another checkout (e.g. main) in the same "
                                                  "alternation: before/after figures from one run"})])
    rows = []
    with tempfile.TemporaryDirectory() as d, boot_network(taps=0) as net:
        root = Path(d) / "root"
        root.mkdir()
        blob = os.urandom(args.size_mib * MIB)
        (root / "bootstrap.img").write_bytes(blob)
        os.chmod(d, 0o755)
        os.chmod(root, 0o755)
        want = hashlib.sha256(blob).hexdigest()
        ip = net.server_ip
        server_code = ("import sys; from pathlib import Path; from bootstrap.server.tftp_server import TftpServer; "
                       "TftpServer(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])).serve_forever()")
        procs = [net.popen([sys.executable, "-c", server_code, str(root), ip, str(OURS)], cwd=os.getcwd()),
                 net.popen(["in.tftpd", "-L", "-s", str(root), "-a", f"{ip}:{HPA}"])]
        servers = {"ours": OURS, "tftpd-hpa": HPA}
        if args.baseline:
            procs.append(net.popen([sys.executable, "-c", server_code, str(root), ip, str(BASELINE)],
                                   cwd=os.path.abspath(args.baseline)))
            servers["baseline"] = BASELINE
        try:
            host = net.add_host("10.77.0.50")
            time.sleep(1.0)
            for bs, win in CASES:
                row: dict[str, object] = {"blksize": bs, "windowsize": win}
                best = dict.fromkeys(servers, float("inf"))
                for _ in range(args.repeat):  # alternating, so a burst of load on this shared machine hits both
                    for label, port in servers.items():
                        out = subprocess.run(net.host_cmd(host, [sys.executable, "-m", "bench.bench_tftp", "--client", ip,
                                                                 str(port), "bootstrap.img", str(bs), str(win)]),
                                             capture_output=True, text=True, timeout=600)
                        if out.returncode != 0:
                            raise SystemExit(f"{label} bs={bs} win={win}: {out.stderr.strip()[-500:]}")
                        secs, digest, _n = out.stdout.split()
                        if digest != want:
                            raise SystemExit(f"{label} bs={bs} win={win}: wrong bytes")
                        best[label] = min(best[label], float(secs))
                for label, best_secs in best.items():
                    row[f"{label}_MiB_s"] = args.size_mib / best_secs
                row["ours/hpa"] = float(row["ours_MiB_s"]) / float(row["tftpd-hpa_MiB_s"])  # type: ignore[arg-type]
                if args.baseline:
                    row["baseline/hpa"] = float(row["baseline_MiB_s"]) / float(row["tftpd-hpa_MiB_s"])  # type: ignore[arg-type]
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    write_results(args.out, "bench_tftp", rows, {
        "size_mib": args.size_mib, "repeat": args.repeat, "baseline": args.baseline, "client": "bench/tftp_client.py in a second namespace (veth + bridge)",
        "reference": "in.tftpd -L -s DIR -a ADDR:PORT (tftpd-hpa) in the same namespace, the two alternating; it has no windowsize, "
                     "so its rows with windowsize > 1 run lock-step (window 1 after its OACK)"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
