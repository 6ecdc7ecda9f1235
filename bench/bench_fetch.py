"""Fetch throughput of our verifying client into a store, against, in the same run:

- a plain HTTP download of the same bytes to a file (curl from `python -m http.server`, no
  verification, no store, no fsync: the goal's reference); and, as context, the same download
  followed by an fdatasync of the file (`sync -d`), since our fetch returns only once every block
  it wrote is on the disk (an fsync of each file it wrote; curl leaves its file in the page cache);
- `ipfs dag import` of the same CAR (as our gateway serves it, read from a file) into a second,
  empty Kubo node (Kubo's default flatfs store, its daemon doing the hashing and writing);
- our client fetching from Kubo's gateway;
- our client fetching the same CAR as a static file (`python -m http.server` serves it at
  /ipfs/<cid>, the query ignored, with a Content-Length instead of chunks): the client alone,
  with a gateway that costs nothing, so a gap between this and "from our gateway" is the gateway's;

plus the client's peak RSS for 16 MiB and 256 MiB. Each figure is the median of --runs runs,
the kinds alternating, so a busy spell of the machine hits all of them alike, and each run
starting one kind later than the one before, so no kind always runs right after the same other. `--baseline DIR`
also runs the gateway of another checkout (e.g. main) on the same store, and
`--baseline-client DIR` that checkout's client (its store code too) from our gateway, in the
same alternation: before/after figures of a gateway or a client change from one run. With both
(the same DIR), that checkout's client also fetches from its own gateway (`baseline_both`):
the whole before, beside the whole after.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.bench_import import make_file
from bench.common import parse_args, write_results
from cidboot.ipld.unixfs import ImportOptions, import_file
from cidboot.store.blockstore import Blockstore
from cidboot.store.kubo import KuboClient
from tests.support.kubo_node import free_port, start_kubo

MIB = 1024 * 1024


#: CPU seconds (user + system) of the fetches, by kind: on 2 cores shared with other work the
#: wall times swing with the load; the CPU a fetch costs each side swings much less
CPU: dict[str, list[float]] = {}


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_child(cid: str, gateway: str, store: Path, cwd: str | None = None, *, kind: str = "",
                 gw_pid: int | None = None) -> tuple[float, int]:
    """Our client in a fresh interpreter (seconds, peak RSS in KiB); `cwd`: another checkout's.
    With `kind`, the fetch's CPU (client, and the gateway process `gw_pid`) goes to CPU."""
    code = (
        "import resource,time\n"
        "from cidboot.store.blockstore import Blockstore\n"
        "from cidboot.store.gateway.client import fetch\n"
        "r=resource.getrusage(resource.RUSAGE_SELF)\n"
        "t=time.perf_counter()\n"
        f"fetch({cid!r}, [{gateway!r}], Blockstore({str(store)!r}))\n"
        "e=time.perf_counter()-t\n"
        "q=resource.getrusage(resource.RUSAGE_SELF)\n"
        "print(e, q.ru_maxrss, q.ru_utime+q.ru_stime-r.ru_utime-r.ru_stime)\n"
    )
    g0 = proc_cpu(gw_pid) if gw_pid else 0.0
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=cwd).stdout.split()
    if kind:
        CPU.setdefault(f"{kind}_client_cpu_s", []).append(float(out[2]))
        if gw_pid:
            CPU.setdefault(f"{kind}_gateway_cpu_s", []).append(proc_cpu(gw_pid) - g0)
    return float(out[0]), int(out[1])


def timed(fn: Callable[..., object], *args: object) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def curl(url: str, dest: Path) -> None:
    subprocess.run(["curl", "-sf", "-o", str(dest), url], check=True)


def children_cpu() -> float:
    """User + system CPU seconds of this process's waited-for children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def curl_synced(url: str, dest: Path) -> None:
    """curl, then the file made durable as our fetch makes its files (fdatasync)."""
    curl(url, dest)
    subprocess.run(["sync", "-d", str(dest)], check=True)


def wait_http(url: str) -> None:
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def main() -> int:
    args = parse_args(__doc__ or "", [("--size-mib", {"type": int, "default": 256}),
                                      ("--runs", {"type": int, "default": 5}),
                                      ("--baseline", {"metavar": "DIR", "help": "also fetch from the gateway of this "
                                                      "checkout (same store): before/after from one run"}),
                                      ("--baseline-client", {"metavar": "DIR", "help": "also fetch with the client (and "
                                                             "store) of this checkout, from our gateway"})])
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        kubo, kproc = start_kubo(work)
        (work / "sink").mkdir()
        sink, sproc = start_kubo(work / "sink")  # empty: what `ipfs dag import` writes into
        procs: list[subprocess.Popen[bytes]] = [kproc, sproc]
        try:
            store = Blockstore(work / "origin")
            port = free_port()
            gw = subprocess.Popen([sys.executable, "-m", "bootstrap", "gateway", "--store", str(store.path),
                                   "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL)
            procs.append(gw)
            ours = f"http://127.0.0.1:{port}"
            base = None
            bgw: subprocess.Popen[bytes] | None = None
            if args.baseline:
                bport = free_port()
                bgw = subprocess.Popen([sys.executable, "-m", "bootstrap", "gateway", "--store",
                                        str(store.path), "--listen", f"127.0.0.1:{bport}"],
                                       stdout=subprocess.DEVNULL, cwd=Path(args.baseline).resolve())
                procs.append(bgw)
                base = f"http://127.0.0.1:{bport}"
                wait_http(base + "/ipfs/bafkqaaa?format=raw")
            hport = free_port()
            hserver = subprocess.Popen([sys.executable, "-m", "http.server", str(hport), "--bind", "127.0.0.1",
                                        "--directory", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(hserver)
            wait_http(ours + "/ipfs/bafkqaaa?format=raw")
            wait_http(f"http://127.0.0.1:{hport}/")
            kc = KuboClient(kubo.api_url)
            for mib in (16, args.size_mib):
                f = work / f"f{mib}"
                make_file(f, mib * MIB)
                # the origin as `imagebuilder add` makes it: since session 11 an import of more than 16
                # blocks lands in one pack file (before: a flatfs file per block; docs/gateway.md)
                cid = str(import_file(f, store, ImportOptions(cid_version=1)).cid)
                assert str(kc.add_file(f, cid_version=1).cid) == cid
                car = work / "ipfs" / cid  # http.server serves it as /ipfs/<cid>?format=car...
                car.parent.mkdir(exist_ok=True)
                curl(f"{ours}/ipfs/{cid}?format=car&dag-scope=all", car)
                static = f"http://127.0.0.1:{hport}"
                plain_s: list[float] = []
                ours_s: list[float] = []
                kubo_s: list[float] = []
                dag_s: list[float] = []
                static_s: list[float] = []
                rss: list[int] = []
                kubo_rss: list[int] = []
                synced_s: list[float] = []
                base_s: list[float] = []
                base_client_s: list[float] = []
                base_both_s: list[float] = []  # the baseline's client from the baseline's gateway
                base_dir = str(Path(args.baseline_client).resolve()) if args.baseline_client else None
                # each fetch kind: (store dir tag, gateway, times, RSS list, client checkout, CPU kind, gateway pid)
                fetches: dict[str, tuple[str, str, list[float], list[int] | None, str | None, str, int | None]] = {
                    "ours": ("c1", ours, ours_s, rss, None, f"ours_{mib}", gw.pid),
                    "kubo_gw": ("c2", kubo.gateway_url, kubo_s, kubo_rss, None, "", None),
                    "static": ("c3", static, static_s, None, None, "", None),
                }
                if base_dir:
                    fetches["baseline_client"] = ("c5", ours, base_client_s, None, base_dir, "", None)
                if base is not None:
                    fetches["baseline_gw"] = ("c4", base, base_s, None, None, "", None)
                if base is not None and base_dir:  # before: that checkout's client and gateway
                    fetches["baseline_both"] = ("c6", base, base_both_s, None, base_dir, f"baseline_both_{mib}",
                                                bgw.pid if bgw else None)
                order = ["plain", "plain_fsync", *fetches, "dag_import"]
                dl = work / f"download-{mib}"
                for i in range(max(1, args.runs)):
                    # each run starts one kind later: no kind always follows the same other one (with the
                    # order fixed, what the kind before left behind moved some kinds' times by up to 1.5x)
                    k = i % len(order)
                    for name in order[k:] + order[:k]:
                        if name == "plain":
                            c0, h0 = children_cpu(), proc_cpu(hserver.pid)
                            plain_s.append(timed(curl, f"http://127.0.0.1:{hport}/f{mib}", dl))
                            CPU.setdefault(f"plain_{mib}_client_cpu_s", []).append(children_cpu() - c0)
                            CPU.setdefault(f"plain_{mib}_server_cpu_s", []).append(proc_cpu(hserver.pid) - h0)
                            dl.unlink()
                        elif name == "plain_fsync":
                            synced_s.append(timed(curl_synced, f"http://127.0.0.1:{hport}/f{mib}", dl))
                            dl.unlink()
                        elif name == "dag_import":
                            dag_s.append(timed(sink.ipfs, "dag", "import", "--pin-roots=true", str(car)))
                            sink.ipfs("pin", "rm", cid)
                            sink.ipfs("repo", "gc")
                        else:
                            tag, url, out, rss_out, cwd, kind, gw_pid = fetches[name]
                            dest = work / f"{tag}-{mib}-{i}"
                            sec, kb = client_child(cid, url, dest, cwd, kind=kind, gw_pid=gw_pid)
                            out.append(sec)
                            if rss_out is not None:
                                rss_out.append(kb)
                            shutil.rmtree(dest)
                mb = mib * MIB / 1e6
                plain, mine, from_kubo, dag, from_file = (statistics.median(x) for x in
                                                          (plain_s, ours_s, kubo_s, dag_s, static_s))
                rows.append({
                    "file_MiB": mib,
                    "plain_http_MBps": round(mb / plain, 1),
                    "ours_from_our_gw_MBps": round(mb / mine, 1),
                    "ours_from_kubo_gw_MBps": round(mb / from_kubo, 1),
                    "kubo_dag_import_MBps": round(mb / dag, 1),
                    "ours_from_static_car_MBps": round(mb / from_file, 1),
                    "ours/plain": round(plain / mine, 3),
                    "plain_http_fsync_MBps": round(mb / statistics.median(synced_s), 1),
                    "ours/plain_fsync": round(statistics.median(synced_s) / mine, 3),
                    "ours/dag_import": round(dag / mine, 3),
                    "our_gw/kubo_gw": round(from_kubo / mine, 3),
                    "static_car/plain": round(plain / from_file, 3),
                    "client_rss_MiB_our_gw": round(max(rss) / 1024, 1),
                    "client_rss_MiB_kubo_gw": round(max(kubo_rss) / 1024, 1),
                    "ours_runs_s": [round(x, 3) for x in ours_s], "plain_runs_s": [round(x, 3) for x in plain_s],
                    "ours/plain_runs": [round(p / o, 3) for p, o in zip(plain_s, ours_s, strict=True)],
                })
                if base_client_s:
                    b = statistics.median(base_client_s)
                    rows[-1]["baseline_client_MBps"] = round(mb / b, 1)
                    rows[-1]["baseline_client/plain"] = round(plain / b, 3)
                    rows[-1]["client/baseline_client"] = round(b / mine, 3)
                    rows[-1]["baseline_client_runs_s"] = [round(x, 3) for x in base_client_s]
                if base_s:
                    rows[-1]["ours_from_baseline_gw_MBps"] = round(mb / statistics.median(base_s), 1)
                    rows[-1]["our_gw/baseline_gw"] = round(statistics.median(base_s) / mine, 3)
                for key, values in CPU.items():
                    if key.endswith((f"_{mib}_client_cpu_s", f"_{mib}_gateway_cpu_s", f"_{mib}_server_cpu_s")):
                        rows[-1][key.replace(f"_{mib}_", "_")] = round(statistics.median(values), 3)
                # CPU seconds of both sides, the reference's over ours: what the fetch costs the machine,
                # which other work on shared cores moves far less than it moves the wall-clock ratio
                # (medians of each run's sum, written beside the ratio so the summary's row is made of them)
                plain_cpu = statistics.median(c + h for c, h in zip(CPU[f"plain_{mib}_client_cpu_s"],
                                                                    CPU[f"plain_{mib}_server_cpu_s"], strict=True))
                ours_cpu = statistics.median(c + g for c, g in zip(CPU[f"ours_{mib}_client_cpu_s"],
                                                                   CPU[f"ours_{mib}_gateway_cpu_s"], strict=True))
                rows[-1]["plain_cpu_s"] = round(plain_cpu, 3)
                rows[-1]["ours_cpu_s"] = round(ours_cpu, 3)
                rows[-1]["plain_cpu/ours_cpu"] = round(plain_cpu / ours_cpu, 3)
                if base_both_s:
                    b = statistics.median(base_both_s)
                    rows[-1]["baseline_both_MBps"] = round(mb / b, 1)
                    rows[-1]["baseline_both/plain"] = round(plain / b, 3)
                    rows[-1]["ours/baseline_both"] = round(b / mine, 3)
                    rows[-1]["baseline_both_runs_s"] = [round(x, 3) for x in base_both_s]
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    write_results(args.out, "fetch", rows, {
        "plain_http": "curl of the same file from python -m http.server on loopback to a file (no hashing, no store, "
                      "no fsync: the file is left in the page cache)",
        "plain_http_fsync": "the same curl followed by `sync -d` of the file (fdatasync): durable, as our fetch is",
        "dag_import": "ipfs dag import (CLI -> the daemon's API) of the CAR our gateway serves, from a file, into an "
                      "empty second Kubo node; pinned, then unpinned and gc'd between runs",
        "ours": "cidboot.store.gateway.client.fetch: CAR stream, each block read into a buffer the "
                "store lends, hashed there and written from there (a DAG of more than 16 blocks: all of them "
                "appended to one pack file), then an fsync of each file it wrote (not a syncfs of the "
                "file system); our gateway reads and hashes every block it sends",
        "runs": args.runs, "figures": "median of the runs (ours_runs_s, plain_runs_s: each run); RSS the largest",
        "cpu": "*_client_cpu_s: user + system CPU of the fetch in the client process (plain: curl's whole run); "
               "*_gateway_cpu_s / plain_server_cpu_s: of the gateway / http.server process (all threads) during "
               "that fetch; medians. plain_cpu/ours_cpu: both sides' CPU, the reference's over ours. Steadier "
               "than wall time on shared cores",
        "baseline": args.baseline, "baseline_client": args.baseline_client,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
