"""TFTP throughput: our read-only server vs tftpd-hpa (Debian's in.tftpd, run by hand) for a
16 MiB file, at blksize 512 and 1468 and with RFC 7440 windowsize.

Both servers run in one network namespace this bench creates; the client runs in a second
namespace linked to it by a veth through a bridge, and is the same program for both (a server
without windowsize gets a window of 1 from its OACK). Two clients: bench/tftp_client.c, built
here with gcc (never committed as a binary), cheap per packet, so in lock-step the figure is the
servers' work (the goal is judged on it); and bench/tftp_client.py, the Python client the
figures were taken with before, which spends more per block than either server and so pulls
every ratio towards 1. Each figure is the median of --repeat runs, the servers alternating in
every round (a burst of load on this shared machine hits all of them), the order reversed every
other round (no server always runs right after another); `ratio_min`/`ratio_max` are the spread
of the per-round ratios. Every download is checked byte for byte. The served file and the
downloads live in /dev/shm when there is one: both servers read the same page-cache pages, and no
disk writeback of earlier downloads runs during a later one.

Wall time in lock-step is mostly scheduling on this VM (per-round ratios swing 0.2-5x; rounds
are bimodal, a fast mode and slow ones in which every server's wakeups cost several times more),
so the bench also gives the ratio of each server's best round (`best ours/hpa`: the fast mode)
and each server's CPU per block (`cpu_us_blk_*`, `cpu ours/hpa`: the servers' own work, which
load moves far less): each server runs in its own cgroup (v2, or v1 cpuacct), tftpd-hpa's
per-transfer children with it, and the cgroup's CPU usage is read around every download.
Without a cgroup to make, the CPU columns are left out.

The slow mode is the client and the server woken on different vCPUs: on an otherwise idle
machine the kernel wakes each side on the idle vCPU, so every block costs each side an IPI (a
VM exit) and each wake-up waits for the host to run a halted vCPU; with other load on the
machine both often share one vCPU (the fast mode). In the slow mode about 1 % of the blocks
wait 1.5-5 ms for a vCPU (the host's doing, for any server) and those few are 40-60 % of the
seconds, so the C client also reports its median time between two DATA packets (`blk_us_*`,
`blk ours/hpa`): the usual round trip, which those delays do not move; and that tail itself
(`slow_blk_*`, `slow_s_*`: the blocks that took over 1 ms and their seconds, medians of the
rounds; every round's in the JSON), so whether it falls on one server more than another shows.
`--gaps DIR` keeps every gap of every round, for diagnosis.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import statistics
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


class CpuMeter:
    """CPU seconds used by one process and the children it forks (tftpd-hpa forks one per
    transfer and does not wait for them, so no rusage sees them): a cgroup of its own, read
    around each download. `None` from `start` when no cgroup can be made (not root, a cgroup
    hierarchy delegated elsewhere): the bench then leaves the CPU columns out."""

    def __init__(self, path: Path, usage: Path, scale: float) -> None:
        self.path, self.usage, self.scale = path, usage, scale

    @classmethod
    def start(cls, label: str, pid: int) -> CpuMeter | None:
        base = Path("/sys/fs/cgroup")
        if (base / "cgroup.controllers").exists():  # v2: cpu.stat's usage_usec needs no controller
            path, usage, scale = base / f"cidboot-bench-tftp-{label}-{pid}", "cpu.stat", 1e-6
        elif (base / "cpuacct").is_dir():  # v1
            path, usage, scale = base / "cpuacct" / f"cidboot-bench-tftp-{label}-{pid}", "cpuacct.usage", 1e-9
        else:
            return None
        try:
            path.mkdir()
            (path / "cgroup.procs").write_text(str(pid))
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return cls(path, path / usage, scale)

    def seconds(self) -> float:
        text = self.usage.read_text()
        if self.usage.name == "cpu.stat":
            text = next(line.split()[1] for line in text.splitlines() if line.startswith("usage_usec"))
        return int(text) * self.scale

    def close(self) -> None:
        for _ in range(50):  # the processes are gone; the kernel may take a moment to empty the group
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def build_c_client(work: Path) -> Path:
    """bench/tftp_client.c compiled into `work` (gcc -O2); SystemExit without gcc: a bench
    that silently fell back to another client would change what its figures mean."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SystemExit("bench_tftp: the C client needs gcc (or run with --client python)")
    exe = work / "tftp_client"
    subprocess.run([gcc, "-O2", "-Wall", "-o", str(exe), str(Path(__file__).with_name("tftp_client.c"))], check=True)
    return exe


LOOP_CODE = ("import logging; logging.disable()\n"
             "try:\n    from bootstrap.server.tftp_server import lockstep_impl\n"
             "except ImportError:\n    print('python')\n"
             "else:\n    print('python' if lockstep_impl() is None else 'c')")


def lockstep_loop(cwd: str) -> str:
    """Which lock-step loop the server of the checkout at `cwd` runs ("c" or "python"): the
    figures of a server whose C module was not built are the Python loop's, and say so."""
    out = subprocess.run([sys.executable, "-c", LOOP_CODE], cwd=cwd, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        return client_main(sys.argv[2:])
    args = parse_args(__doc__ or "", [
        ("--size-mib", {"type": int, "default": 16}), ("--repeat", {"type": int, "default": 9}),
        ("--cases", {"default": ",".join(f"{bs}x{win}" for bs, win in CASES),
                     "help": "comma-separated BLKSIZExWINDOWSIZE, e.g. 512x1,1468x1 (lock-step only)"}),
        ("--clients", {"default": "c,python", "help": "comma-separated: c, python"}),
        ("--baseline", {"metavar": "DIR", "help": "also run the server of another checkout (e.g. main) in the same "
                                                  "alternation: before/after figures from one run"}),
        ("--gaps", {"metavar": "DIR", "help": "diagnosis: the C client writes every round's gaps between DATA packets "
                                              "to DIR/<server>-<blksize>x<window>-<n>.f64 (native doubles, seconds)"})])
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if not clients or any(c not in ("c", "python") for c in clients):
        print(f"bench_tftp: --clients takes c and/or python, not {args.clients!r}", file=sys.stderr)
        return 2
    try:
        cases = [(int(bs), int(win)) for bs, _, win in (c.strip().partition("x") for c in args.cases.split(","))]
    except ValueError:
        print(f"bench_tftp: --cases takes BLKSIZExWINDOWSIZE,..., not {args.cases!r}", file=sys.stderr)
        return 2
    if args.gaps:
        os.makedirs(args.gaps, exist_ok=True)
    rows = []
    rounds: dict[str, dict[str, dict[str, list[float]]]] = {}  # every round's figures, for the JSON
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=shm) as d, boot_network(taps=0) as net:
        work = Path(d)
        root = work / "root"
        root.mkdir()
        blob = os.urandom(args.size_mib * MIB)
        (root / "bootstrap.img").write_bytes(blob)
        os.chmod(d, 0o755)
        os.chmod(root, 0o755)
        want = hashlib.sha256(blob).hexdigest()
        c_client = build_c_client(work) if "c" in clients else None
        ip = net.server_ip
        server_code = ("import sys; from pathlib import Path; from bootstrap.server.tftp_server import TftpServer; "
                       "TftpServer(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])).serve_forever()")
        procs = [net.popen([sys.executable, "-c", server_code, str(root), ip, str(OURS)], cwd=os.getcwd()),
                 net.popen(["in.tftpd", "-L", "-s", str(root), "-a", f"{ip}:{HPA}"])]
        servers = {"ours": OURS, "tftpd-hpa": HPA}
        loops = {"ours": lockstep_loop(os.getcwd())}
        if args.baseline:
            loops["baseline"] = lockstep_loop(os.path.abspath(args.baseline))
        print(f"bench_tftp: lock-step loop {loops}", file=sys.stderr, flush=True)
        if args.baseline:
            procs.append(net.popen([sys.executable, "-c", server_code, str(root), ip, str(BASELINE)],
                                   cwd=os.path.abspath(args.baseline)))
            servers["baseline"] = BASELINE
        meters = {label: CpuMeter.start(label, proc.pid) for label, proc in zip(servers, procs, strict=True)}
        try:
            host = net.add_host("10.77.0.50")
            time.sleep(1.0)

            # the C client's tail per round: (blocks that took over 1 ms, their seconds), per server
            tails: dict[str, list[tuple[int, float]]] = {label: [] for label in servers}

            def download(client: str, label: str, port: int, bs: int,
                         win: int) -> tuple[float, float | None, float | None]:
                """One download in the client namespace: its seconds (bytes checked), the
                server's CPU seconds for it (None without a meter) and the C client's median
                microseconds between two DATA packets (None for the Python client)."""
                meter = meters[label]
                cpu0 = meter.seconds() if meter else 0.0
                if client == "c":
                    assert c_client is not None
                    dest = work / "got.bin"
                    cmd = [str(c_client), ip, str(port), "bootstrap.img", str(bs), str(win), str(dest)]
                    if args.gaps:
                        n = len(tails[label])
                        cmd = ["env", f"TFTP_CLIENT_GAPS={os.path.abspath(args.gaps)}/{label}-{bs}x{win}-{n}.f64", *cmd]
                else:
                    cmd = [sys.executable, "-m", "bench.bench_tftp", "--client", ip, str(port), "bootstrap.img",
                           str(bs), str(win)]
                out = subprocess.run(net.host_cmd(host, cmd), capture_output=True, text=True, timeout=600)
                if out.returncode != 0:
                    raise SystemExit(f"{label} {client} client bs={bs} win={win}: {out.stderr.strip()[-500:]}")
                block_us = None
                if client == "c":
                    secs, _n, median_us, slow, slow_s = out.stdout.split()
                    block_us = float(median_us)
                    tails[label].append((int(slow), float(slow_s)))
                    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
                    dest.unlink()
                else:
                    secs, digest, _n = out.stdout.split()
                if digest != want:
                    raise SystemExit(f"{label} {client} client bs={bs} win={win}: wrong bytes")
                return float(secs), (meter.seconds() - cpu0 if meter else None), block_us

            for client in clients:
                for bs, win in cases:
                    row: dict[str, object] = {"client": client, "blksize": bs, "windowsize": win}
                    runs: dict[str, list[float]] = {label: [] for label in servers}
                    cpus: dict[str, list[float]] = {label: [] for label in servers}
                    blk: dict[str, list[float]] = {label: [] for label in servers}
                    order = list(servers.items())
                    for t in tails.values():
                        t.clear()
                    for _ in range(args.repeat):  # alternating, so a burst of load hits every server
                        for label, port in order:
                            secs, cpu, block_us = download(client, label, port, bs, win)
                            runs[label].append(secs)
                            if block_us is not None:
                                blk[label].append(block_us)
                            if cpu is not None:
                                cpus[label].append(cpu)
                        order.reverse()
                    for label, times in runs.items():
                        row[f"{label}_MiB_s"] = round(args.size_mib / statistics.median(times), 2)
                    row["ours/hpa"] = round(statistics.median(runs["tftpd-hpa"]) / statistics.median(runs["ours"]), 3)
                    paired = [h / o for o, h in zip(runs["ours"], runs["tftpd-hpa"], strict=True)]
                    row["ratio_min"], row["ratio_max"] = round(min(paired), 3), round(max(paired), 3)
                    row["best ours/hpa"] = round(min(runs["tftpd-hpa"]) / min(runs["ours"]), 3)
                    if args.baseline:
                        row["baseline/hpa"] = round(statistics.median(runs["tftpd-hpa"])
                                                    / statistics.median(runs["baseline"]), 3)
                        row["ours/baseline"] = round(statistics.median(runs["baseline"])
                                                     / statistics.median(runs["ours"]), 3)
                    blocks = args.size_mib * MIB // bs + 1
                    if all(len(c) == args.repeat for c in cpus.values()):
                        for label, used in cpus.items():
                            row[f"cpu_us_blk_{label}"] = round(statistics.median(used) / blocks * 1e6, 2)
                        row["cpu ours/hpa"] = round(statistics.median(cpus["ours"]) / statistics.median(cpus["tftpd-hpa"]), 3)
                    if all(len(v) == args.repeat for v in blk.values()):
                        for label, used in blk.items():
                            row[f"blk_us_{label}"] = round(statistics.median(used), 2)
                        row["blk ours/hpa"] = round(statistics.median(blk["tftpd-hpa"]) / statistics.median(blk["ours"]), 3)
                    if all(len(v) == args.repeat for v in tails.values()):
                        for label, tail in tails.items():
                            row[f"slow_blk_{label}"] = statistics.median(n for n, _ in tail)
                            row[f"slow_s_{label}"] = round(statistics.median(x for _, x in tail), 3)
                    rounds[f"{client} {bs}x{win}"] = {
                        label: {"seconds": [round(x, 4) for x in runs[label]],
                                "cpu_us_blk": [round(x / blocks * 1e6, 2) for x in cpus[label]],
                                "blk_us": blk[label],
                                "slow_blocks": [n for n, _ in tails[label]],
                                "slow_s": [round(x, 4) for _, x in tails[label]]} for label in servers}
                    rows.append(row)
                    print(row, file=sys.stderr, flush=True)
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
            for m in meters.values():
                if m is not None:
                    m.close()
    write_results(args.out, "bench_tftp", rows, {
        "size_mib": args.size_mib, "repeat": args.repeat, "baseline": args.baseline, "rounds": rounds,
        "lockstep_loop": loops,
        "figures": "median MiB/s of --repeat runs per server, servers alternating in each round; ours/hpa = ratio of "
                   "the medians; ratio_min/max = spread of the per-round ratios; best ours/hpa = ratio of each server's "
                   "fastest round; cpu_us_blk_* = median server CPU "
                   "(its cgroup, children included) per block; cpu ours/hpa = our CPU / tftpd-hpa's (<= 1: ours "
                   "does no more work per block); blk_us_* = median over the rounds of the C client's median "
                   "microseconds between two DATA packets (the usual round trip, which the rare wake-ups "
                   "delayed by milliseconds do not move); blk ours/hpa = tftpd-hpa's / ours (>= 1: ours is "
                   "no slower per usual block); slow_blk_* / slow_s_* = median over the rounds of the C client's "
                   "count of blocks that took over 1 ms and their seconds in all (the tail that decides the wall time)",
        "client": {"c": "bench/tftp_client.c (gcc -O2) in a second namespace (veth + bridge): measures the servers",
                   "python": "bench/tftp_client.py, same namespace: its per-block cost is larger than either "
                             "server's, so it compresses the ratios towards 1"},
        "reference": "in.tftpd -L -s DIR -a ADDR:PORT (tftpd-hpa) in the same namespace, the two alternating; it has no windowsize, "
                     "so its rows with windowsize > 1 run lock-step (window 1 after its OACK)"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
