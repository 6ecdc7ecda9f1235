"""Fetch throughput of our verifying client from our gateway, against a plain HTTP download of
the same bytes (curl from `python -m http.server`, no verification) and against our client
fetching from Kubo's gateway; plus the client's peak RSS for 16 MiB and 256 MiB."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_import import make_file
from bench.common import parse_args, write_results
from cidboot.ipld.unixfs import ImportOptions, import_file
from cidboot.store.blockstore import Blockstore
from cidboot.store.kubo import KuboClient
from tests.support.kubo_node import free_port, start_kubo

MIB = 1024 * 1024


def client_child(cid: str, gateway: str, store: Path) -> tuple[float, int]:
    code = (
        "import resource,time\n"
        "from cidboot.store.blockstore import Blockstore\n"
        "from cidboot.store.gateway.client import fetch\n"
        "t=time.perf_counter()\n"
        f"fetch({cid!r}, [{gateway!r}], Blockstore({str(store)!r}))\n"
        "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), int(out[1])


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
    args = parse_args(__doc__ or "", [("--size-mib", {"type": int, "default": 256})])
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        kubo, kproc = start_kubo(work)
        procs: list[subprocess.Popen[bytes]] = [kproc]
        try:
            store = Blockstore(work / "origin")
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "bootstrap", "gateway", "--store", str(store.path),
                                           "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL))
            ours = f"http://127.0.0.1:{port}"
            hport = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "http.server", str(hport), "--bind", "127.0.0.1",
                                           "--directory", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_http(ours + "/ipfs/bafkqaaa?format=raw")
            wait_http(f"http://127.0.0.1:{hport}/")
            kc = KuboClient(kubo.api_url)
            for mib in (16, args.size_mib):
                f = work / f"f{mib}"
                make_file(f, mib * MIB)
                cid = str(import_file(f, store, ImportOptions(cid_version=1)).cid)
                assert str(kc.add_file(f, cid_version=1).cid) == cid
                t0 = time.perf_counter()
                subprocess.run(["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{hport}/f{mib}"], check=True)
                plain = time.perf_counter() - t0
                ours_s, ours_rss = client_child(cid, ours, work / f"c1-{mib}")
                kubo_s, kubo_rss = client_child(cid, kubo.gateway_url, work / f"c2-{mib}")
                mb = mib * MIB / 1e6
                rows.append({
                    "file_MiB": mib,
                    "plain_http_MBps": round(mb / plain, 1),
                    "ours_from_our_gw_MBps": round(mb / ours_s, 1),
                    "ours_from_kubo_gw_MBps": round(mb / kubo_s, 1),
                    "ours/plain": round(plain / ours_s, 3),
                    "our_gw/kubo_gw": round(kubo_s / ours_s, 3),
                    "client_rss_MiB_our_gw": round(ours_rss / 1024, 1),
                    "client_rss_MiB_kubo_gw": round(kubo_rss / 1024, 1),
                })
                for tmp in (work / f"c1-{mib}", work / f"c2-{mib}"):
                    shutil.rmtree(tmp)
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    write_results(args.out, "fetch", rows, {
        "plain_http": "curl of the same file from python -m http.server on loopback (no hashing, no store)",
        "ours": "cidboot.store.gateway.client.fetch: CAR stream, every block verified and written atomically to a store",
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
