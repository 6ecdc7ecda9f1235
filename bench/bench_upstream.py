"""N devices fetching one manifest DAG through a boot server's gateway with an upstream
(`bootstrap serve --upstream`): cold (empty store, every block comes from the upstream Kubo)
vs warm (the same store, filled), and, as the reference in the same run, the same N devices
fetching straight from the Kubo gateway. Each device is one verifying fetch
(cidboot.store.gateway.client.fetch, what the bootstrap does) into its own store, all N at
once; the figure is the time until all N hold the whole DAG (the QEMU boot around it is the
same in every case and is left out). Bytes pulled from upstream are counted by the cache:
each block once, however many devices ask. Last rows: one device, the upstream behind a
proxy adding --delay-ms per request (a slow uplink), with and without read-ahead.
"""

from __future__ import annotations

import functools
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.bench_cluster import manifest
from bench.common import parse_args, write_results
from cidboot.ipld import dag
from cidboot.ipld.car import CarWriter
from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.client import fetch
from cidboot.store.gateway.upstream import CachingStore
from cidboot.store.kubo import KuboClient
from tests.support.gateway_fixtures import proxy_gateway, running_gateway
from tests.support.kubo_node import start_kubo

MIB = 1024 * 1024


def all_fetch(root: CID, gateway: str, n: int, work: Path) -> float:
    """N verifying fetches of `root` at once, each into a fresh store; seconds until all are done."""
    errors: list[BaseException] = []
    stores = [Blockstore(work / f"dev-{time.monotonic_ns()}-{i}") for i in range(n)]

    def one(store: Blockstore) -> None:
        try:
            fetch(root, [gateway], store)
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(s,)) for s in stores]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"a device's fetch failed: {errors[0]}")
    for s in stores:
        subprocess.run(["rm", "-rf", str(s.path)], check=True)
    return dt


def median_of(repeat: int, run: Callable[[], float]) -> tuple[float, list[float]]:
    runs = [run() for _ in range(repeat)]
    return statistics.median(runs), runs


def main() -> int:
    args = parse_args(__doc__ or "", [("--size-mib", {"type": int, "default": 32}),
                                      ("--devices", {"default": "1,4,8"}),
                                      ("--repeat", {"type": int, "default": 3}),
                                      ("--delay-ms", {"type": int, "default": 20})])
    counts = [int(x) for x in args.devices.split(",")]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        source = Blockstore(work / "source")
        root = manifest(source, 1, args.size_mib * MIB)
        blocks = dict(dag.walk(root, source.get))
        mb = sum(len(b) for b in blocks.values()) / 1e6
        (work / "kubo").mkdir()
        kubo, proc = start_kubo(work / "kubo")
        try:
            car = work / "m.car"
            with open(car, "wb") as f:
                w = CarWriter(f, [root])
                for cid, block in blocks.items():
                    w.write(cid, block)
            KuboClient(kubo.api_url).dag_import(car)
            for n in counts:
                ref, ref_runs = median_of(args.repeat, functools.partial(all_fetch, root, kubo.gateway_url, n, work))
                cold_runs: list[float] = []
                pulled: list[int] = []
                coalesced: list[int] = []
                warm_runs: list[float] = []
                for i in range(args.repeat):
                    cache = CachingStore(work / f"cache-{n}-{i}", [kubo.gateway_url])
                    with running_gateway(cache) as gw:
                        cold_runs.append(all_fetch(root, gw.url, n, work))
                        pulled.append(cache.stats.bytes)
                        coalesced.append(cache.stats.coalesced)
                        warm_runs.append(all_fetch(root, gw.url, n, work))
                        if cache.stats.bytes != pulled[-1]:
                            raise SystemExit("the warm run pulled from upstream")
                    subprocess.run(["rm", "-rf", str(cache.path)], check=True)
                cold, warm = statistics.median(cold_runs), statistics.median(warm_runs)
                for case, secs, runs, up in (("direct from Kubo gateway (reference)", ref, ref_runs, None),
                                             ("boot server, cold (empty store, --upstream Kubo)", cold, cold_runs,
                                              statistics.median(pulled)),
                                             ("boot server, warm", warm, warm_runs, 0)):
                    rows.append({"case": case, "devices": n, "MB_each": round(mb, 1), "seconds": round(secs, 2),
                                 "min_s": round(min(runs), 2), "max_s": round(max(runs), 2),
                                 "MBps_total": round(n * mb / secs, 1),
                                 "upstream_MB": None if up is None else round(up / 1e6, 1),
                                 "coalesced": statistics.median(coalesced) if "cold" in case else None,
                                 "ratio_vs_reference": round(ref / secs, 3)})
            # a slow uplink: every upstream request pays `delay` (a proxy that sleeps, then forwards)
            delay = args.delay_ms / 1000

            def slow(path: str, body: bytes) -> bytes:
                time.sleep(delay)
                return body

            with proxy_gateway(kubo.gateway_url, slow) as far:
                ref, ref_runs = median_of(args.repeat, functools.partial(all_fetch, root, far, 1, work))
                rows.append({"case": f"direct over a +{args.delay_ms} ms link (reference)", "devices": 1,
                             "MB_each": round(mb, 1), "seconds": round(ref, 2), "min_s": round(min(ref_runs), 2),
                             "max_s": round(max(ref_runs), 2), "MBps_total": round(mb / ref, 1),
                             "ratio_vs_reference": 1.0})
                for ahead in (0, 8):
                    runs = []
                    for i in range(args.repeat):
                        cache = CachingStore(work / f"cache-far-{ahead}-{i}", [far], readahead=ahead)
                        with running_gateway(cache) as gw:
                            runs.append(all_fetch(root, gw.url, 1, work))
                        subprocess.run(["rm", "-rf", str(cache.path)], check=True)
                    secs = statistics.median(runs)
                    rows.append({"case": f"boot server, cold, upstream over +{args.delay_ms} ms, read-ahead {ahead}",
                                 "devices": 1, "MB_each": round(mb, 1), "seconds": round(secs, 2),
                                 "min_s": round(min(runs), 2), "max_s": round(max(runs), 2),
                                 "MBps_total": round(mb / secs, 1), "upstream_MB": round(mb, 1),
                                 "ratio_vs_reference": round(ref / secs, 3)})
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    write_results(args.out, "bench_upstream", rows, {
        "what": f"a signed manifest DAG with {args.size_mib} MiB of random layer bytes ({len(blocks)} blocks), "
                "fetched and verified by N devices at once (threads, one fetch each into its own store); seconds = "
                f"median of {args.repeat} runs until all N are done",
        "reference": "the N devices fetch straight from the Kubo gateway (no boot server)",
        "cold": "a fresh CachingStore behind our gateway, upstream = the Kubo gateway; every block is pulled once",
        "upstream_MB": "bytes the boot server pulled from upstream (each block once however many devices ask)",
        "coalesced": "device requests that waited for another's upstream fetch of the same block (single flight)",
        "ratio_vs_reference": "reference seconds / case seconds (above 1: faster than fetching from Kubo directly)",
        "slow link rows": f"every upstream request delayed {args.delay_ms} ms by a proxy (a WAN uplink); the "
                          "reference there is one device fetching over the same link (CARs: few requests); "
                          "read-ahead N = N background fetchers of the children of each block read",
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
