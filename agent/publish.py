"""Publishing an agent's results to IPFS: `--publish kubo=URL` or `--publish cluster=URL`.

Results, their provenance and audit blocks live in the agent's Blockstore first (served on
/ipfs/ at once); publishing copies each result's whole provenance DAG (and the audit logs) off
the device so the graph outlives it:

- `kubo=URL` (a Kubo RPC API): every block is put, then the root pinned, on that one node.
- `cluster=URL[,replication=MIN:MAX]` (an IPFS Cluster peer's REST API, default port 9094):
  each root's DAG goes as one CAR through `/add?format=car` (the peer forwards the blocks to the
  peers it allocates; no Kubo RPC is needed on the device's side), pinned with the replication
  factor (default 2:3, as `imagebuilder publish`), and publishing waits until MIN peers hold it:
  results from every device end up replicated in one place, fetchable from any member.

cidboot.store.kubo (ipfshttpclient) and cidboot.store.cluster are imported only when publishing
is asked for: the device image does not carry the former.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cidboot.errors import FormatError
from cidboot.ipld.car import CarWriter
from cidboot.ipld.cid import CID
from cidboot.ipld.dag import walk
from cidboot.store.blockstore import Blockstore

KINDS = ("kubo", "cluster")
DEFAULT_REPLICATION = "2:3"
#: how long publishing to a cluster waits for MIN peers to hold a root
CLUSTER_WAIT = 300.0


@dataclass(frozen=True)
class PublishTarget:
    kind: str
    url: str
    replication: str = DEFAULT_REPLICATION  # cluster only: MIN:MAX, N, or -1 (every peer)

    @classmethod
    def parse(cls, spec: str) -> PublishTarget:
        kind, sep, rest = spec.partition("=")
        url, _, opts = rest.partition(",")
        if kind not in KINDS or not sep or not url.startswith(("http://", "https://")):
            raise FormatError(f"--publish takes kubo=http://HOST:PORT or cluster=http://HOST:9094[,replication=MIN:MAX], "
                              f"got {spec!r}")
        replication = DEFAULT_REPLICATION
        if opts:
            key, eq, value = opts.partition("=")
            if kind != "cluster" or key != "replication" or not eq:
                raise FormatError(f"--publish {spec!r}: the only option is replication=MIN:MAX, for cluster= only")
            from cidboot.store.cluster import Replication

            Replication.parse(value)  # BadReplication (a FormatError) now, not after the run
            replication = value
        return cls(kind, url, replication)


def publish(store: Blockstore, roots: Iterable[CID], target: PublishTarget, *, client: Any = None,
            label: str = "cidboot agent") -> int:
    """Copy every block under each root to the target and pin the roots; returns blocks sent."""
    if target.kind == "cluster":
        return _publish_cluster(store, roots, target, client, label)
    if client is None:
        from cidboot.store.kubo import KuboClient

        client = KuboClient(target.url)
    sent = 0
    for root in roots:
        for cid, data in walk(root, store.get):
            client.put(cid, data)
            sent += 1
        client.pin(root)
    return sent


def _publish_cluster(store: Blockstore, roots: Iterable[CID], target: PublishTarget, client: Any,
                     label: str) -> int:
    """One CAR per root through the cluster's REST API, pinned MIN:MAX; wait for MIN peers.
    Raises the cluster client's typed errors (ClusterUnreachable, ClusterRequestRefused,
    ReplicationTimeout) and NotFoundError for a DAG the store does not hold whole."""
    from cidboot.store.cluster import ClusterClient, Replication

    replication = Replication.parse(target.replication)
    cluster = client if client is not None else ClusterClient(target.url)
    sent = 0
    for root in dict.fromkeys(roots):  # each root once, in order
        fd, car = tempfile.mkstemp(prefix="cidboot-publish-", suffix=".car")
        try:
            with os.fdopen(fd, "wb") as f:
                w = CarWriter(f, [root])
                for cid, data in walk(root, store.get):
                    if not cid.is_identity:
                        w.write(cid, data)
                        sent += 1
            cluster.add_car(car, replication, root=root, name=f"{label} {root}")
        finally:
            os.unlink(car)
        cluster.wait_for(root, replication, timeout=CLUSTER_WAIT)
    return sent
