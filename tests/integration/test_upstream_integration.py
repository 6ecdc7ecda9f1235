"""A boot server with an empty store in front of a real Kubo node (`bootstrap serve --upstream`):
it serves a whole manifest DAG fetched from Kubo, verified; a lying upstream is dropped for the
block and the next one used, nothing unverified is cached; N devices asking at once pull each
block from upstream once; the bounded cache evicts unpinned blocks only; the bootstrap's anchor
(boot-file building) is read through the cache."""

from __future__ import annotations

import random
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from bootstrap.commands.serve import manifest_root
from bootstrap.server.serve import cache_gauges
from cidboot.ipld import dag
from cidboot.ipld.car import CarReader, CarWriter
from cidboot.ipld.cid import CID, RAW
from cidboot.ipld.unixfs import export_file, import_path
from cidboot.store.blockstore import Blockstore
from cidboot.store.cluster import ClusterClient, Replication
from cidboot.store.gateway.client import fetch
from cidboot.store.gateway.pathing import resolve
from cidboot.store.gateway.upstream import CachingStore, UpstreamUnavailable
from cidboot.store.kubo import KuboClient
from cidboot.trust.manifest import SignedManifest
from tests.support.cluster_node import Cluster
from tests.support.gateway_fixtures import proxy_gateway, running_gateway
from tests.support.kubo_node import KuboNode
from tests.unit.test_cluster import make_signed_manifest

pytestmark = pytest.mark.kubo


class Published:
    """The manifest DAG and a UnixFS tree, imported into Kubo from `source` (then only Kubo has them)."""

    def __init__(self, kubo: KuboNode, tmp: Path) -> None:
        self.source = Blockstore(tmp / "source")
        self.manifest, self.layers = make_signed_manifest(self.source, seed=17)
        tree = tmp / "tree"
        (tree / "sub").mkdir(parents=True)
        self.file = random.Random(5).randbytes(600_000)
        (tree / "sub" / "a.bin").write_bytes(self.file)
        (tree / "b.txt").write_text("b\n")
        self.tree = import_path(tree, self.source).cid
        client = KuboClient(kubo.api_url)
        for root in (self.manifest, self.tree):
            car = tmp / f"{root}.car"
            with open(car, "wb") as f:
                w = CarWriter(f, [root])
                for cid, block in dag.walk(root, self.source.get):
                    w.write(cid, block)
            assert client.dag_import(car) == [root]
        self.dag = dict(dag.walk(self.manifest, self.source.get))

    @property
    def dag_bytes(self) -> int:
        return sum(len(b) for b in self.dag.values())


@pytest.fixture(scope="module")
def published(kubo: KuboNode, tmp_path_factory: pytest.TempPathFactory) -> Published:
    return Published(kubo, tmp_path_factory.mktemp("published"))


def all_verified(store: Blockstore) -> int:
    """Every block the store holds hashes to its name (raises otherwise); how many there are."""
    n = 0
    for mh in store.multihashes():
        Blockstore.get(store, CID(1, RAW, mh))
        n += 1
    return n


def test_empty_boot_server_serves_the_manifest_dag_from_kubo(kubo: KuboNode, published: Published,
                                                              tmp_path: Path) -> None:
    cache = CachingStore(tmp_path / "cache", [kubo.gateway_url])
    assert list(cache.multihashes()) == []
    # the boot-file build reads the manifest's root of trust through the same store
    anchor = manifest_root(cache, str(published.manifest), "test")
    assert anchor == SignedManifest.decode(published.source.get(published.manifest)).manifest.root
    with running_gateway(cache) as gw:
        device = Blockstore(tmp_path / "device")
        res = fetch(published.manifest, [gw.url], device)  # what the bootstrap does, verifying each block
        assert not res.dropped and res.blocks_fetched + res.blocks_present == len(published.dag)
        for layer, data in published.layers.items():
            assert b"".join(export_file(CID.parse(layer), device.get)) == data
        # a path (UnixFS) request and a raw one, neither in the store before
        with urllib.request.urlopen(f"{gw.url}/ipfs/{published.tree}/sub/a.bin?format=car", timeout=60) as r:
            got = dict(CarReader(r))  # verify=True: every section hashed
        file_root = resolve(published.tree, ["sub", "a.bin"], published.source.get).terminal
        assert published.tree in got and b"".join(export_file(file_root, got.__getitem__)) == published.file
        with urllib.request.urlopen(f"{gw.url}/ipfs/{published.tree}/b.txt?format=raw", timeout=60) as r:
            small = resolve(published.tree, ["b.txt"], published.source.get).terminal
            assert r.read() == published.source.get(small)
    assert cache.stats.bytes == sum(len(Blockstore.get(cache, CID(1, RAW, mh))) for mh in cache.multihashes())
    gauges = dict(cache_gauges(cache))
    assert gauges["upstream_blocks_total"] == cache.stats.blocks and gauges["upstream_rejected_total"] == 0
    assert all_verified(cache) == cache.stats.blocks


def test_lying_upstream_is_dropped_and_the_next_used_nothing_unverified_cached(
        kubo: KuboNode, published: Published, tmp_path: Path) -> None:
    layer = CID.parse(next(iter(published.layers)))
    target = dag.links(layer, published.source.get(layer))[0]  # one leaf of a layer

    def flip(path: str, body: bytes) -> bytes:
        return body[:-1] + bytes([body[-1] ^ 1]) if str(target) in path else body

    with proxy_gateway(kubo.gateway_url, flip) as liar:
        cache = CachingStore(tmp_path / "cache", [liar, kubo.gateway_url])
        with running_gateway(cache) as gw:
            res = fetch(published.manifest, [gw.url], Blockstore(tmp_path / "device"))
        assert not res.dropped  # the device never saw a bad block
        assert cache.stats.rejected == 1 and cache.stats.by_upstream[kubo.gateway_url] == len(published.dag[target])
        assert all_verified(cache) == len(published.dag)
        only_liar = CachingStore(tmp_path / "cache2", [liar])
        with pytest.raises(UpstreamUnavailable):
            only_liar.get(target)
        assert not only_liar.has(target) and all_verified(only_liar) == 0


def test_n_devices_at_once_pull_each_block_from_upstream_once(kubo: KuboNode, published: Published,
                                                               tmp_path: Path) -> None:
    asked: dict[str, int] = {}
    lock = threading.Lock()

    def count(path: str, body: bytes) -> bytes:
        with lock:
            asked[path] = asked.get(path, 0) + 1
        return body

    n = 8
    with proxy_gateway(kubo.gateway_url, count) as up:
        cache = CachingStore(tmp_path / "cache", [up])
        with running_gateway(cache) as gw:
            errors: list[BaseException] = []

            def device(i: int) -> None:
                try:
                    fetch(published.manifest, [gw.url], Blockstore(tmp_path / f"device{i}"))
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=device, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
    assert not errors
    assert len(asked) == len(published.dag) and set(asked.values()) == {1}, asked
    assert cache.stats.bytes == published.dag_bytes and cache.stats.blocks == len(published.dag)
    for i in range(n):
        assert all_verified(Blockstore(tmp_path / f"device{i}")) == len(published.dag)


def test_bounded_cache_evicts_unpinned_blocks_only(kubo: KuboNode, published: Published, tmp_path: Path) -> None:
    bound = 300_000  # smaller than the manifest DAG and than the tree
    cache = CachingStore(tmp_path / "cache", [kubo.gateway_url], max_bytes=bound)
    cache.pin(published.manifest)  # fetched through the cache, then never evicted
    assert published.dag_bytes > bound and cache.cached_bytes == 0
    with running_gateway(cache) as gw:
        fetch(published.tree, [gw.url], Blockstore(tmp_path / "device"))
    assert cache.stats.evictions > 0 and cache.cached_bytes <= bound
    local = Blockstore(tmp_path / "cache")
    assert sum(len(b) for _, b in dag.walk(published.manifest, local.get)) == published.dag_bytes  # all still here


@pytest.mark.cluster
def test_new_site_boot_server_fetches_from_cluster_members_after_one_is_killed(
        cluster_factory: Callable[[int], Cluster], tmp_path: Path) -> None:
    """Published 2:2 to a 3-peer cluster; one holder killed; a boot server with an empty store
    and every member's gateway as upstream (the dead one first) serves the whole DAG, verified:
    the dead member costs one failed request (marked down), not one per block."""
    cluster = cluster_factory(3)
    entry = cluster.peers[0]
    source = Blockstore(tmp_path / "source")
    manifest, layers = make_signed_manifest(source, seed=23)
    car = tmp_path / "m.car"
    with open(car, "wb") as f:
        w = CarWriter(f, [manifest])
        for cid, block in dag.walk(manifest, source.get):
            w.write(cid, block)
    client = ClusterClient(entry.rest_url)
    client.add_car(car, Replication(2, 2), root=manifest, name="upstream test")
    st = client.wait_for(manifest, Replication(2, 2), timeout=120)
    holders = [cluster.by_id(p.peer) for p in st.pinned]
    victim = holders[0]
    victim.kill()
    upstreams = [victim.kubo.gateway_url] + [p.kubo.gateway_url for p in cluster.peers if p is not victim]
    cache = CachingStore(tmp_path / "cache", upstreams, timeout=5)
    with running_gateway(cache) as gw:
        device = Blockstore(tmp_path / "device")
        res = fetch(manifest, [gw.url], device)
    assert not res.dropped
    for layer, data in layers.items():
        assert b"".join(export_file(CID.parse(layer), device.get)) == data
    n = len(dict(dag.walk(manifest, source.get)))
    assert cache.stats.blocks == n and cache.stats.marked_down == 1
    assert victim.kubo.gateway_url not in cache.stats.by_upstream
    assert all_verified(cache) == n
