"""N devices fetching one image through a COLD boot server (empty store, `--upstream` to a Kubo
gateway) vs a WARM one (the same server, its store filled by the cold round): time to all-ready
and bytes the server pulled from upstream (each block once, however many devices ask).

Devices are N host processes running the bootstrap's own fetch path (bootstrap.stage.verify:
the manifest block, then every layer's root, size check and whole DAG, each block verified into
a fresh store), started together after their Python start-up, against a real `bootstrap serve`
in a throwaway network namespace; the upstream is an isolated Kubo node (loopback of that
namespace, no bootstrap/MDNS/routing) holding the DAG (`ipfs dag import`). Full QEMU boots of N
devices are too heavy for a 2-core machine shared with other work (one TCG boot takes the
better part of a core for ~40 s; 4 at once would measure CPU contention, not the server), so
the N-device figures use host processes, plus ONE QEMU figure (`--no-qemu` skips it): the hello flow
booted by `python -m qemu.harness boot` through a cold boot server fed by a 1-peer cluster vs
the usual lab whose boot server holds the image.

Two references beside the boot server (what bench_upstream.py measured in-process before it
was folded in here): the same N devices fetching straight from the upstream Kubo gateway (no
boot server), and a slow uplink: one device, every upstream request delayed --delay-ms by a
proxy, through a cold boot server (the cache's read-ahead on) vs straight over the same link.

    python3 -m bench.bench_scaleout                       # N = 1, 2, 4; 32 MiB image; + the QEMU pair
    python3 -m bench.bench_scaleout --clients 1,2,4,8 --size-mib 64 --no-qemu
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import parse_args, write_results
from bootstrap.bootfiles import SERVED_NAMES
from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.ipld.dag import walk
from cidboot.ipld.unixfs import import_bytes
from cidboot.store.blockstore import Blockstore
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from imagebuilder.commands.publish import write_car
from qemu.harness import cluster as kubo_impl
from qemu.harness.lab import parse_metrics
from qemu.harness.netns import BootNetwork, boot_network, inside
from tests.support.gateway_fixtures import proxy_gateway

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
SERVER = "http://10.77.0.1:8080"

CLIENT = """
import sys, time
from bootstrap.stage.verify import fetch_block, fetch_layer
from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from cidboot.trust.manifest import SignedManifest
cid, gws, store = CID.parse(sys.argv[1]), [sys.argv[2]], Blockstore(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
t = time.perf_counter()
m = SignedManifest.decode(fetch_block(cid, gws, store)).manifest
for layer in m.layers:
    fetch_layer(m, layer.cid, gws, store)
print(time.perf_counter() - t, flush=True)
"""


def manifest(store: Blockstore, size: int, seed: int = 17) -> CID:
    """A signed manifest whose two layers total `size` random bytes (incompressible, unique per run)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    keys = [ed25519.Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in (7, 8)]
    rnd = random.Random(seed ^ time.time_ns())
    layers = []
    for role, share in (("kernel", 0.25), ("initrd", 0.75)):
        data = rnd.randbytes(int(size * share))
        layers.append(Layer(import_bytes(data, store).cid, len(data), role))
    m = Manifest(name="scaleout", version=1, expires=int(time.time()) + 3600, layers=tuple(layers),
                 root=RootOfTrust.from_public_keys([k.public_key() for k in keys], 2),
                 flow=store.put_block(b"scaleout bench flow", RAW))
    return store.put_block(sign_manifest(m, keys).encode(), DAG_CBOR)


def server_metrics(net: BootNetwork) -> dict[str, float]:
    with inside(net.name), urllib.request.urlopen(f"{SERVER}/metrics", timeout=30) as r:
        return parse_metrics(r.read().decode())


def pulled(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.endswith("upstream_bytes_total"))


def round_of(net: BootNetwork, n: int, mcid: CID, work: Path, gateway: str = SERVER) -> tuple[float, list[float]]:
    """N clients, started together once all have imported their code; (wall s to the last done, each's s)."""
    procs = []
    for i in range(n):
        store = work / f"client{i}"
        procs.append(subprocess.Popen(net.cmd([sys.executable, "-c", CLIENT, str(mcid), gateway, str(store)]),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=REPO))
    for p in procs:
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"client did not start: {p.communicate()[1][-1500:]}")
    t0 = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    each = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode:
            raise RuntimeError(f"client failed ({p.returncode}): {err[-1500:]}")
        each.append(float(out.split()[-1]))
    return time.perf_counter() - t0, each


def start_server(net: BootNetwork, work: Path, mcid: CID, upstream: str) -> subprocess.Popen[str]:
    tftp = work / "tftp"  # placeholders: the clients fetch no boot files, and the server need not build any
    (tftp / "bootstrap").mkdir(parents=True, exist_ok=True)
    for name in SERVED_NAMES:
        (tftp / name).write_bytes(f"scale-out bench: placeholder {name}\n".encode())
    store = work / "server-store"
    log = open(work / "server.log", "w")
    server = net.popen([sys.executable, "-m", "bootstrap", "--log-json", "serve", "--interface", "br0",
                        "--dhcp-range", "10.77.0.100-10.77.0.119", "--store", str(store), "--manifest", str(mcid),
                        "--tftp-root", str(tftp), "--state-dir", str(work / "state"), "--upstream", upstream],
                       stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
    assert server.stdout is not None
    if "serving on" not in server.stdout.readline():
        server.kill()
        raise RuntimeError(f"boot server did not start: {(work / 'server.log').read_text()[-1500:]}")
    return server


def slow_link_row(net: BootNetwork, work: Path, mcid: CID, upstream: str, delay_ms: int) -> dict[str, Any]:
    """One device, the upstream behind a proxy that delays every request (a WAN uplink): through a
    cold boot server (block by block from upstream, the cache's read-ahead on) vs straight over
    the same link (one CAR request per layer)."""
    def slow(path: str, body: bytes) -> bytes:
        time.sleep(delay_ms / 1000)
        return body

    with inside(net.name), proxy_gateway(upstream, slow) as far:  # bound in the namespace, serving from there
        direct_s, _ = round_of(net, 1, mcid, work / "far-direct", gateway=far)
        server = start_server(net, work / "far", mcid, far)
        try:
            cold_s, _ = round_of(net, 1, mcid, work / "far" / "cold")
        finally:
            kubo_impl.stop(server, 10)
    return {"devices": f"1 over +{delay_ms} ms", "cold_all_ready_s": round(cold_s, 2),
            "direct_all_ready_s": round(direct_s, 2), "cold/direct": round(cold_s / direct_s, 3)}


def host_rows(ns: list[int], size: int, delay_ms: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as d, boot_network(taps=0) as net:
        work = Path(d)
        origin = Blockstore(work / "origin")
        mcid = manifest(origin, size)
        dag_bytes = sum(len(b) for _c, b in walk(mcid, origin.get))
        car = write_car(mcid, origin, d).path
        with inside(net.name):  # the upstream lives on the namespace's loopback (its CLI talks to it there)
            kubo, kproc = kubo_impl.start_kubo(work / "kubo")
            kubo.ipfs("dag", "import", "--pin-roots", str(car))
        try:
            for n in ns:
                run = work / f"n{n}"
                run.mkdir()
                server = start_server(net, run, mcid, kubo.gateway_url)
                try:
                    before = pulled(server_metrics(net))
                    cold_s, cold_each = round_of(net, n, mcid, run / "cold")
                    mid = pulled(server_metrics(net))
                    warm_s, warm_each = round_of(net, n, mcid, run / "warm")
                    after = pulled(server_metrics(net))
                finally:
                    kubo_impl.stop(server, 10)
                direct_s, _ = round_of(net, n, mcid, run / "direct", gateway=kubo.gateway_url)
                rows.append({
                    "devices": n, "image_MB": round(dag_bytes / 1e6, 1),
                    "cold_all_ready_s": round(cold_s, 2), "warm_all_ready_s": round(warm_s, 2),
                    "direct_all_ready_s": round(direct_s, 2),
                    "cold/warm": round(cold_s / warm_s, 3), "warm/direct": round(warm_s / direct_s, 3),
                    "cold_median_device_s": round(statistics.median(cold_each), 2),
                    "upstream_MB_cold": round((mid - before) / 1e6, 2), "upstream_MB_warm": round((after - mid) / 1e6, 2),
                    "upstream/image": round((mid - before) / dag_bytes, 3),
                })
            if delay_ms > 0:
                rows.append(slow_link_row(net, work, mcid, kubo.gateway_url, delay_ms))
        finally:
            kubo_impl.stop(kproc)
    return rows, {"dag_bytes": dag_bytes}


def qemu_row(out: Path) -> list[dict[str, Any]]:
    """One device, the hello flow: cold boot server fed by a 1-peer cluster vs the usual warm lab."""
    rows = []
    for label, extra in (("warm", []), ("cold", ["--cluster", "1", "--replication", "1"])):
        d = out / f"scaleout-qemu-{label}"
        proc = subprocess.run([sys.executable, "-m", "qemu.harness", "boot", str(REPO / "examples/hello/flow.yaml"),
                               "--out", str(d), "--json", *extra], capture_output=True, text=True, cwd=REPO)
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            raise RuntimeError(f"harness boot ({label}) failed: {proc.stderr[-2000:]}") from None
        dev = report["devices"][0]
        if dev["outcome"] != "ready":
            raise RuntimeError(f"harness boot ({label}): {dev['outcome']}: {dev['reason']}")
        st = dev["boot_timeline"]["stage_seconds"]
        srv = (report.get("boot_servers") or [{}])[0].get("upstream_metrics", {})
        rows.append({"devices": f"1 QEMU ({label})", "all_ready_s": round(sum(st.values()), 2),
                     "bootstrap_s": st.get("bootstrap"),
                     "upstream_MB": round(pulled(srv) / 1e6, 2) if srv else 0.0})
    rows[1]["cold/warm"] = round(rows[1]["all_ready_s"] / rows[0]["all_ready_s"], 3)
    return rows


def main() -> int:
    args = parse_args(__doc__ or "", [
        ("--clients", {"default": "1,2,4", "help": "comma-separated device counts (default 1,2,4: 2 cores)"}),
        ("--size-mib", {"type": int, "default": 32, "help": "image size (random layer bytes)"}),
        ("--no-qemu", {"action": "store_true", "help": "skip the one-device QEMU figure (two harness boots)"}),
        ("--delay-ms", {"type": int, "default": 20, "help": "the slow-uplink row's delay per upstream request "
                                                            "(0: no such row)"}),
    ])
    ns = [int(x) for x in str(args.clients).split(",") if x.strip()]
    rows, facts = host_rows(ns, args.size_mib * MIB, args.delay_ms)
    if not args.no_qemu:
        rows += qemu_row(Path(args.out))
    write_results(args.out, "bench_scaleout", rows, {
        **facts,
        "devices": "host processes running bootstrap.stage.verify's fetch path (manifest block, then each layer), "
                   "started together; QEMU rows: python -m qemu.harness boot of examples/hello",
        "cold": "bootstrap serve with an empty store and --upstream to an isolated Kubo gateway holding the image",
        "warm": "the same server again: its store now holds every block (the reference)",
        "direct": "the same N devices straight from the upstream Kubo gateway, no boot server",
        "slow link": f"one device; a proxy delays every upstream request {args.delay_ms} ms; cold boot server (its "
                     "cache's read-ahead on) vs the device straight over the same link",
        "upstream": "the server's /metrics upstream_bytes_total: upstream/image 1.0 = each block pulled once",
        "why_not_n_qemu": "N TCG guests on 2 shared cores measure CPU contention, not the boot server",
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
