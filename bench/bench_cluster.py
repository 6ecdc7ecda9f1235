"""Publish throughput to an IPFS Cluster vs `ipfs dag import` of the same CAR on one node
(same run, same machine): a loopback cluster of 3 Kubo + ipfs-cluster-service peers
(tests/cluster_node.py), a signed manifest whose layers total --size-mib of random bytes.

Rows (each a fresh manifest, so no block is already anywhere):
- reference: `ipfs dag import --pin-roots` of the CAR into a standalone Kubo (CLI, process start included);
- `imagebuilder publish --kubo`: CAR written from our store + `dag import` RPC + pin (one node);
- `imagebuilder publish --cluster --replication N:N`: the same import into one member, then the
  cluster pin and the wait until N peers report `pinned` (the others fetch over bitswap);
- the same without `--kubo`: the CAR goes to the cluster REST API (`/add?format=car`), which
  sends every block to each allocated peer's Kubo before pinning.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

from bench.common import parse_args, write_results
from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.ipld.unixfs import import_bytes
from cidboot.store.blockstore import Blockstore
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from imagebuilder.cli import main as imagebuilder
from imagebuilder.commands.publish import write_car
from tests.support.cluster_node import start_cluster
from tests.support.kubo_node import start_kubo

MIB = 1024 * 1024


def manifest(store: Blockstore, seed: int, size: int) -> CID:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    keys = [ed25519.Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in (7, 8)]
    rnd = random.Random(seed)
    layers = []
    for role, share in (("kernel", 0.25), ("agent", 0.75)):
        data = rnd.randbytes(int(size * share))
        layers.append(Layer(import_bytes(data, store).cid, len(data), role))
    m = Manifest(name=f"bench{seed}", version=1, expires=int(time.time()) + 3600, layers=tuple(layers),
                 root=RootOfTrust.from_public_keys([k.public_key() for k in keys], 2),
                 flow=store.put_block(f"flow {seed}".encode(), RAW))
    return store.put_block(sign_manifest(m, keys).encode(), DAG_CBOR)


def publish(*args: str) -> tuple[float, dict[str, object]]:
    out, err = StringIO(), StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(out), redirect_stderr(err):
        rc = imagebuilder(["publish", *args, "--json"])
    dt = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"publish {args} failed: {err.getvalue()}")
    return dt, json.loads(out.getvalue())


def main() -> int:
    args = parse_args(__doc__ or "", [("--size-mib", {"type": int, "default": 64}),
                                      ("--repeat", {"type": int, "default": 3})])
    size = args.size_mib * MIB
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        store = Blockstore(work / "store")
        (work / "solo").mkdir()
        solo, solo_proc = start_kubo(work / "solo")
        cluster = start_cluster(work, 3)
        try:
            entry = cluster.peers[0]
            cases: list[tuple[str, list[str]]] = [
                ("publish --kubo, 1 node", ["--kubo", solo.api_url]),
                ("publish --cluster 1:1", ["--cluster", entry.rest_url, "--kubo", entry.kubo.api_url,
                                           "--replication", "1:1"]),
                ("publish --cluster 2:2", ["--cluster", entry.rest_url, "--kubo", entry.kubo.api_url,
                                           "--replication", "2:2"]),
                ("publish --cluster 3:3", ["--cluster", entry.rest_url, "--kubo", entry.kubo.api_url,
                                           "--replication", "3:3"]),
                ("publish --cluster 2:2, no --kubo (REST /add)", ["--cluster", entry.rest_url,
                                                                  "--replication", "2:2"]),
            ]
            ref_s: list[float] = []
            runs: dict[str, list[tuple[float, float, bool]]] = {name: [] for name, _ in cases}
            seed = 0
            for _ in range(args.repeat):
                # reference: the CLI on one node, same CAR bytes as publish sends
                seed += 1
                car = write_car(manifest(store, seed, size), store, d)
                t0 = time.perf_counter()
                solo.ipfs("dag", "import", "--pin-roots", str(car.path))
                ref_s.append(time.perf_counter() - t0)
                car.path.unlink()
                for name, extra in cases:
                    seed += 1
                    root = manifest(store, seed, size)
                    dt, res = publish(str(root), *extra, "--store", str(store.path))
                    on_entry = entry.peer_id in res.get("pinned", [])  # type: ignore[operator]
                    runs[name].append((dt, float(res["import_seconds"]), on_entry))  # type: ignore[arg-type]
            mb = car.bytes / 1e6
            ref = statistics.median(ref_s)
            rows.append({"case": "ipfs dag import, 1 node (reference)", "MB": round(mb, 1), "blocks": car.blocks,
                         "seconds": round(ref, 2), "min_s": round(min(ref_s), 2), "max_s": round(max(ref_s), 2),
                         "MBps": round(mb / ref, 1), "ref_MBps": round(mb / ref, 1), "ratio": 1.0})
            for name, r in runs.items():
                dt = statistics.median(x[0] for x in r)
                imp = statistics.median(x[1] for x in r)
                rows.append({"case": name, "MB": round(mb, 1), "blocks": car.blocks, "seconds": round(dt, 2),
                             "min_s": round(min(x[0] for x in r), 2), "max_s": round(max(x[0] for x in r), 2),
                             "import_s": round(imp, 2), "pin_wait_s": round(dt - imp, 2),
                             "MBps": round(mb / dt, 1), "ref_MBps": round(mb / ref, 1),
                             "ratio": round(ref / dt, 3), "runs_on_import_node": sum(x[2] for x in r)})
        finally:
            cluster.stop()
            solo_proc.terminate()
            try:
                solo_proc.wait(10)
            except subprocess.TimeoutExpired:
                solo_proc.kill()
    write_results(args.out, "bench_cluster", rows, {
        "size": f"{args.size_mib} MiB of random layer bytes per manifest (a fresh manifest per run: nothing is "
                "already on any node); seconds = median of {args.repeat} runs",
        "runs_on_import_node": "runs where the importing member was among the pinned peers (its copy costs no "
                               "transfer: a 1:1 pin allocated there is almost free)",
        "reference": "`ipfs dag import --pin-roots CAR` on a standalone Kubo (CLI: process start included)",
        "publish": "imagebuilder publish in-process: DAG walk + CAR write + dag import RPC (+ cluster pin and wait "
                   "until N peers report pinned; they fetch over bitswap on loopback)",
        "ratio": "publish MB/s divided by the reference's MB/s (1.0 = as fast as one local dag import)",
        "import_s": "DAG walk + CAR write + dag import RPC (REST /add row: the whole /add, blocks sent to each "
                    "allocated peer)",
        "pin_wait_s": "cluster pin + polling until N peers report pinned (the allocated peers' bitswap fetch)",
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
