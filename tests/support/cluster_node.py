"""A real, isolated IPFS Cluster for interop tests (pytest plugin, loaded by conftest.py).

K Kubo daemons and K `ipfs-cluster-service` peers on 127.0.0.1 (CRDT, private cluster secret,
private swarm key, no bootstrap/MDNS/routing, re-pinning on): the implementation is
`qemu.harness.cluster`, shared with `python -m qemu.harness boot --cluster K`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qemu.harness import cluster as _impl
from qemu.harness.cluster import PING, Cluster, ClusterLabError, ClusterPeer

__all__ = ["PING", "Cluster", "ClusterPeer", "cluster_factory", "start_cluster", "tool"]


def tool(name: str) -> str:
    try:
        return _impl.tool(name)
    except ClusterLabError as e:
        pytest.fail(str(e))


def start_cluster(workdir: Path, k: int) -> Cluster:
    """K members on loopback; returns once every peer sees K peers."""
    for name in ("ipfs", "ipfs-cluster-service", "ipfs-cluster-ctl"):
        tool(name)
    return _impl.start_cluster(workdir, k)


@pytest.fixture
def cluster_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[int], Cluster]]:
    """`cluster_factory(3)`: a fresh K-member cluster, stopped after the test."""
    started: list[Cluster] = []

    def make(k: int) -> Cluster:
        c = start_cluster(tmp_path_factory.mktemp("cluster"), k)
        started.append(c)
        return c

    try:
        yield make
    finally:
        for c in started:
            c.stop()
