"""`imagebuilder publish MANIFEST_CID`: copy a signed manifest's whole DAG to IPFS and pin it,
on one Kubo node (`--kubo URL`) or replicated by an IPFS Cluster (`--cluster URL`).

The DAG (signed manifest, flow, operations, every layer) is read from the local store by
walking links from the manifest, written as one CARv1 and sent with `dag import` to a Kubo
node. With `--cluster URL --kubo URL`, that node is one of the cluster's (its blocks are not
pinned there by us: the cluster owns the pin), the root is then pinned through the cluster's
REST API with the replication factor, and the allocated peers' Kubo nodes fetch the blocks
from it over bitswap. With `--cluster URL` alone, the CAR goes to the cluster's REST API
(`/add?format=car`), whose peer sends each block to the Kubo node of every peer it allocates
and pins there: the publisher needs to reach only that one port. Either way the command then
waits until MIN peers report the pin `pinned` and prints where.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cidboot.cli import print_json
from cidboot.errors import CidbootError, FormatError, NotFoundError
from cidboot.ipld import dag
from cidboot.ipld.car import CarWriter
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.store.blockstore import Blockstore, default_store_path
from cidboot.store.cluster import ClusterClient, Peer, PinStatus, Replication
from cidboot.trust.manifest import SignedManifest

if TYPE_CHECKING:
    from cidboot.store.kubo import KuboClient


class NotAManifest(FormatError):
    """The CID to publish is not a signed manifest."""


class IncompleteDag(NotFoundError):
    """A block under the manifest is missing from the local store: publishing it would pin a hole."""


@dataclass(frozen=True)
class CarFile:
    path: Path
    blocks: int
    bytes: int


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "publish", help="copy a manifest's whole DAG to Kubo or an IPFS Cluster and pin it",
        description="Send the DAG of MANIFEST_CID (manifest, flow, operations, layers) from the local store to a "
                    "Kubo node as a CAR and pin it there (--kubo), or pin it through an IPFS Cluster with a "
                    "replication factor and wait until MIN peers hold it (--cluster; the CAR goes to --kubo, one "
                    "cluster member's Kubo RPC, or without --kubo through the cluster's REST API /add).")
    p.add_argument("manifest", metavar="MANIFEST_CID")
    p.add_argument("--cluster", metavar="URL", help="IPFS Cluster REST API of any peer, e.g. http://127.0.0.1:9094")
    p.add_argument("--kubo", metavar="URL",
                   help="Kubo RPC that receives the CAR, e.g. http://127.0.0.1:5001 (with --cluster: one of the "
                        "cluster's Kubo nodes; without it the CAR goes through the cluster REST API)")
    p.add_argument("--replication", default="2:3", metavar="MIN:MAX",
                   help="cluster copies: MIN:MAX, N (= N:N) or -1 (every peer); default 2:3")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="seconds to wait for MIN peers to pin (default 300)")
    p.add_argument("--store", type=Path, help=f"block store (default: $CIDBOOT_STORE or {default_store_path()})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def write_car(root: CID, store: Blockstore, directory: str | None = None) -> CarFile:
    """The whole DAG under `root`, each block once, as a CARv1 temp file (caller deletes it)."""
    fd, tmp = tempfile.mkstemp(prefix="cidboot-publish-", suffix=".car", dir=directory)
    n = size = 0
    try:
        with open(fd, "wb") as f:
            w = CarWriter(f, [root])
            for cid, block in dag.walk(root, store.get):
                if cid.is_identity:
                    continue
                w.write(cid, block)
                n += 1
                size += len(block)
    except NotFoundError as e:
        os.unlink(tmp)
        raise IncompleteDag(f"cannot publish {root}: {e} (the local store must hold the whole DAG)") from None
    except BaseException:
        os.unlink(tmp)
        raise
    return CarFile(Path(tmp), n, size)


def member_of(kubo: KuboClient, peers: list[Peer]) -> list[str]:
    """The cluster peer(s) whose IPFS node is this Kubo (matched by libp2p peer ID)."""
    ident = kubo._call(kubo._c.id)  # KuboClient has no id() yet: its own client and error mapping
    kubo_id = ident.get("ID") if isinstance(ident, Mapping) else None  # ipfshttpclient: a Mapping, not a dict
    return [p.id for p in peers if kubo_id and p.ipfs_id == kubo_id]


def load_manifest(root: CID, store: Blockstore) -> SignedManifest:
    if root.codec != DAG_CBOR:
        raise NotAManifest(f"{root} is a {root.codec_name} block, not a signed manifest (DAG-CBOR)")
    try:
        block = store.get(root)
    except NotFoundError:
        raise IncompleteDag(f"manifest {root} is not in the store {store.path}") from None
    try:
        return SignedManifest.decode(block)
    except FormatError as e:
        raise NotAManifest(f"{root} is not a signed manifest: {e}") from None


def run(args: argparse.Namespace) -> int:
    if not args.cluster and not args.kubo:
        raise CidbootError("publish needs --kubo URL (one Kubo node) or --cluster URL (replicated; with --kubo the CAR "
                           "goes to that cluster member's Kubo, without it through the cluster's REST API)")
    try:
        root = CID.parse(args.manifest)
    except FormatError as e:
        raise FormatError(f"MANIFEST_CID {args.manifest!r}: {e}") from None
    replication = Replication.parse(args.replication)
    quiet = args.quiet or args.json

    def say(msg: str) -> None:
        if not quiet:
            print(f"imagebuilder: {msg}", file=sys.stderr, flush=True)

    store = Blockstore(args.store)
    signed = load_manifest(root, store)
    cluster = ClusterClient(args.cluster) if args.cluster else None
    peers: list[Peer] = []
    if cluster is not None:  # ask before sending anything: a wrong URL fails in one second, not after the CAR
        peers = cluster.peers()
        say(f"cluster at {cluster.url}: {len(peers)} peers, {sum(1 for p in peers if not p.error)} answering")

    t0 = time.monotonic()
    label = f"{signed.manifest.name} v{signed.manifest.version}"
    car = write_car(root, store)
    pin = None
    prefer: list[str] = []
    try:
        if args.kubo:
            from cidboot.store.kubo import KuboClient  # ipfshttpclient: only when publishing to Kubo

            say(f"sending {car.blocks} blocks ({car.bytes / 2**20:.1f} MiB) of {label} to Kubo at {args.kubo}")
            kubo = KuboClient(args.kubo)
            roots = kubo.dag_import(car.path, pin_roots=cluster is None)
            if roots and root not in roots:
                raise CidbootError(f"Kubo at {args.kubo} imported roots {[str(r) for r in roots]}, not {root}")
            if cluster is not None:
                prefer = member_of(kubo, peers)
                if not prefer:
                    say(f"Kubo at {args.kubo} is not the IPFS node of any cluster peer: the allocated peers must "
                        f"reach it over bitswap to fetch the blocks")
        else:
            assert cluster is not None
            say(f"sending {car.blocks} blocks ({car.bytes / 2**20:.1f} MiB) of {label} through the cluster's "
                f"REST API (/add?format=car: the peer forwards them to the peers it allocates)")
            pin = cluster.add_car(car.path, replication, root=root, name=label, timeout=args.timeout)
    finally:
        car.path.unlink()
    t_import = time.monotonic() - t0
    out: dict[str, Any] = {
        "cid": str(root), "name": signed.manifest.name, "version": signed.manifest.version,
        "blocks": car.blocks, "bytes": car.bytes, "kubo": args.kubo, "import_seconds": round(t_import, 3),
    }
    if cluster is None:
        if args.json:
            print_json(out)
        else:
            print(root)
        return 0

    if pin is None:  # the member that already holds the blocks first: its copy costs no transfer
        pin = cluster.pin(root, replication, name=label, prefer=prefer)
    say(f"pinned {root} in the cluster ({replication}), allocated to {len(pin.allocations) or 'every'} peers; "
        f"waiting for {'every live peer' if replication.everywhere else replication.min}")
    last = [""]

    def progress(st: PinStatus) -> None:
        line = st.summary()
        if line != last[0]:
            last[0] = line
            say(f"{root}: {line}")

    st = cluster.wait_for(root, replication, timeout=args.timeout, progress=progress)
    out.update({
        "cluster": cluster.url, "replication": {"min": replication.min, "max": replication.max},
        "allocations": list(pin.allocations), "seconds": round(time.monotonic() - t0, 3),
        "peers": [{"peer": p.peer, "peername": p.peername, "status": p.status, "ipfs_peer_id": p.ipfs_id}
                  for p in sorted(st.peers.values(), key=lambda p: p.peer)],
        "pinned": sorted(p.peer for p in st.pinned),
    })
    if args.json:
        print_json(out)
        return 0
    for p in sorted(st.peers.values(), key=lambda p: (p.status != "pinned", p.peer)):
        print(f"{p.status:<10} {p.peer} {p.peername}")
    print(root)
    return 0
