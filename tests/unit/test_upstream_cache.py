"""The boot server's caching store (cidboot.store.gateway.upstream) against loopback gateways:
verified fetches, liars dropped per block, single flight, dead upstreams marked down, and the
cache bound (LRU, pins never evicted)."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.ipld.dagcbor import encode
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.upstream import CachingStore, UpstreamUnavailable, parse_size
from tests.support.gateway_fixtures import _serving, proxy_gateway, running_gateway


def blocks(store: Blockstore, n: int, size: int = 1000, seed: int = 0) -> list[CID]:
    return [store.put_block(bytes([seed, i]) * (size // 2)) for i in range(n)]


@contextmanager
def counting_gateway(store: Blockstore, delay: float = 0.0) -> Iterator[tuple[str, dict[str, int]]]:
    """Raw blocks from `store`, after `delay` seconds, counting requests per path."""
    counts: dict[str, int] = {}
    lock = threading.Lock()

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            with lock:
                counts[self.path] = counts.get(self.path, 0) + 1
            time.sleep(delay)
            cid = CID.parse(self.path.split("/")[2].split("?")[0])
            if not store.has(cid):
                self.send_response(404)
                self.end_headers()
                return
            body = store.get(cid)
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.ipld.raw")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with _serving(H) as url:
        yield url, counts


@pytest.fixture
def origin(tmp_path: Path) -> Blockstore:
    return Blockstore(tmp_path / "origin")


def test_parse_size() -> None:
    assert parse_size("1000") == 1000
    assert parse_size("4K") == 4096 and parse_size("512M") == 512 << 20 and parse_size("1.5GiB") == 3 << 29
    assert parse_size("8g") == 8 << 30
    for bad in ("", "lots", "-1G"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_missing_block_is_fetched_verified_and_cached(tmp_path: Path, origin: Blockstore) -> None:
    (cid,) = blocks(origin, 1)
    with running_gateway(origin) as gw:
        cache = CachingStore(tmp_path / "cache", [gw.url])
        assert not cache.has(cid)  # has() is local: it never goes upstream
        assert cache.get(cid) == origin.get(cid)
        assert cache.has(cid) and Blockstore(tmp_path / "cache").get(cid) == origin.get(cid)
        assert cache.get(cid) == origin.get(cid)  # the second read is local
    assert (cache.stats.blocks, cache.stats.bytes) == (1, 1000)
    assert cache.stats.by_upstream == {gw.url: 1000}


def test_lying_upstream_is_dropped_for_the_block_and_the_next_used(tmp_path: Path, origin: Blockstore) -> None:
    cids = blocks(origin, 3)
    target = str(cids[1])

    def flip(path: str, body: bytes) -> bytes:
        return body[:-1] + bytes([body[-1] ^ 1]) if target in path else body

    with running_gateway(origin) as honest, proxy_gateway(honest.url, flip) as liar:
        cache = CachingStore(tmp_path / "cache", [liar, honest.url])
        for c in cids:
            assert cache.get(c) == origin.get(c)
    assert cache.stats.rejected == 1 and cache.stats.blocks == 3
    assert cache.stats.by_upstream == {liar: 2000, honest.url: 1000}  # the liar is still used for other blocks


def test_nothing_unverified_is_cached_when_only_liars_have_it(tmp_path: Path, origin: Blockstore) -> None:
    (cid,) = blocks(origin, 1)
    with running_gateway(origin) as honest, proxy_gateway(honest.url, lambda p, b: b[:-1] + b"X") as liar:
        cache = CachingStore(tmp_path / "cache", [liar])
        with pytest.raises(UpstreamUnavailable, match="does not match") as e:
            cache.get(cid)
    assert len(e.value.causes) == 1
    assert not cache.has(cid) and list(cache.multihashes()) == []
    assert cache.stats.rejected == 1 and cache.stats.blocks == 0 and cache.cached_bytes == 0


def test_concurrent_requests_for_one_block_fetch_it_once(tmp_path: Path, origin: Blockstore) -> None:
    (cid,) = blocks(origin, 1)
    with counting_gateway(origin, delay=0.3) as (url, counts):
        cache = CachingStore(tmp_path / "cache", [url])
        got: list[bytes] = []
        threads = [threading.Thread(target=lambda: got.append(cache.get(cid))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert got == [origin.get(cid)] * 8
    assert sum(counts.values()) == 1
    assert cache.stats.blocks == 1 and cache.stats.coalesced == 7


def test_a_failed_flight_fails_its_waiters_and_the_next_request_retries(tmp_path: Path, origin: Blockstore) -> None:
    (cid,) = blocks(origin, 1)
    empty = Blockstore(tmp_path / "empty")
    with counting_gateway(empty, delay=0.3) as (url, counts):
        cache = CachingStore(tmp_path / "cache", [url])
        errors: list[BaseException] = []

        def ask() -> None:
            try:
                cache.get(cid)
            except UpstreamUnavailable as e:
                errors.append(e)

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(errors) == 4 and sum(counts.values()) == 1
        empty.put(cid, origin.get(cid))  # the upstream gets it: the next request is a new flight
        assert cache.get(cid) == origin.get(cid) and sum(counts.values()) == 2


def test_dead_upstream_is_marked_down_not_asked_per_block(tmp_path: Path, origin: Blockstore) -> None:
    cids = blocks(origin, 5)
    dead = "http://127.0.0.1:9"  # nothing listens: connection refused
    with running_gateway(origin) as gw:
        cache = CachingStore(tmp_path / "cache", [dead, gw.url], down_for=60)
        for c in cids:
            assert cache.get(c) == origin.get(c)
    assert cache.stats.failures == 1 and cache.stats.marked_down == 1 and cache.stats.blocks == 5


def test_all_upstreams_down_are_tried_anyway(tmp_path: Path, origin: Blockstore) -> None:
    (cid,) = blocks(origin, 1)
    cache = CachingStore(tmp_path / "cache", ["http://127.0.0.1:9"], down_for=60)
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable):
            cache.get(cid)
    assert cache.stats.failures == 2  # not failed closed without asking


def test_cache_evicts_least_recently_used_within_its_bound(tmp_path: Path, origin: Blockstore) -> None:
    a, b, c = blocks(origin, 3)
    with running_gateway(origin) as gw:
        cache = CachingStore(tmp_path / "cache", [gw.url], max_bytes=2500)
        cache.get(a)
        cache.get(b)
        cache.get(a)  # a is now the most recently used
        cache.get(c)
        assert cache.has(a) and not cache.has(b) and cache.has(c)
        assert cache.cached_bytes == 2000 and cache.stats.evictions == 1 and cache.stats.evicted_bytes == 1000
        assert cache.get(b) == origin.get(b)  # evicted: fetched again (verified)
    assert not cache.has(a) and cache.stats.blocks == 4


def test_pinned_dags_are_never_evicted_nor_counted(tmp_path: Path, origin: Blockstore) -> None:
    cache_dir = tmp_path / "cache"
    local = Blockstore(cache_dir)
    leaves = blocks(local, 3, seed=9)
    root = local.put_block(encode({"leaves": leaves}), DAG_CBOR)
    local.pin(root)
    stray = blocks(local, 1, seed=8)[0]  # unpinned, already there at start: counted, evictable
    others = blocks(origin, 3)
    with running_gateway(origin) as gw:
        cache = CachingStore(cache_dir, [gw.url], max_bytes=1500)
        assert cache.cached_bytes == 1000
        for o in others:
            cache.get(o)
    assert all(cache.has(x) for x in [root, *leaves])
    assert not cache.has(stray) and cache.cached_bytes <= 1500 and cache.stats.evictions == 3


def test_a_pin_taken_by_another_process_protects_its_blocks(tmp_path: Path, origin: Blockstore) -> None:
    cache_dir = tmp_path / "cache"
    others = blocks(origin, 3)
    with running_gateway(origin) as gw:
        cache = CachingStore(cache_dir, [gw.url], max_bytes=2000)
        cache.get(others[0])
        Blockstore(cache_dir).pin(others[0])  # e.g. `imagebuilder` on the same store
        cache.get(others[1])
        cache.get(others[2])
        assert cache.has(others[0]) and cache.stats.evictions == 0  # the pinned block left the bound
        cache.unpin(others[0])  # back in the bound (as the most recent): the oldest other goes
    assert cache.stats.evictions == 1 and not cache.has(others[1]) and cache.cached_bytes == 2000


def test_pin_through_the_cache_fetches_the_dag_without_deadlock(tmp_path: Path, origin: Blockstore) -> None:
    leaves = blocks(origin, 4)
    root = origin.put_block(encode({"leaves": leaves}), DAG_CBOR)
    with running_gateway(origin) as gw:
        cache = CachingStore(tmp_path / "cache", [gw.url], max_bytes=500)  # every put evicts
        t = threading.Thread(target=cache.pin, args=(root,), daemon=True)
        t.start()
        t.join(30)
        assert not t.is_alive(), "pin() deadlocked on its own pin lock"
    assert cache.pins() == [root]


def test_gateway_over_an_empty_cache_serves_raw_car_and_respects_only_if_cached(
        tmp_path: Path, origin: Blockstore) -> None:
    from cidboot.ipld.car import CarReader

    leaves = blocks(origin, 2)
    root = origin.put_block(encode({"leaves": leaves}), DAG_CBOR)
    with running_gateway(origin) as up:
        cache = CachingStore(tmp_path / "cache", [up.url])
        with running_gateway(cache) as gw:
            req = urllib.request.Request(f"{gw.url}/ipfs/{root}", headers={"Cache-Control": "only-if-cached",
                                                                           "Accept": "application/vnd.ipld.raw"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            assert e.value.code == 412 and cache.stats.blocks == 0
            with urllib.request.urlopen(f"{gw.url}/ipfs/{root}?format=car", timeout=10) as r:
                got = dict(CarReader(r))
            assert set(got) == {root, *leaves}
            with urllib.request.urlopen(f"{gw.url}/ipfs/{leaves[0]}?format=raw", timeout=10) as r:
                assert r.read() == origin.get(leaves[0])
    assert cache.stats.blocks == 3 and cache.stats.bytes == sum(len(origin.get(c)) for c in [root, *leaves])


def test_gateway_answers_502_when_no_upstream_delivers(tmp_path: Path) -> None:
    cid = CID.of(b"nowhere", RAW)
    cache = CachingStore(tmp_path / "cache", ["http://127.0.0.1:9"])
    with running_gateway(cache) as gw:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{gw.url}/ipfs/{cid}?format=raw", timeout=10)
        assert e.value.code == 502 and b"no upstream delivered it" in e.value.read()
        with pytest.raises(urllib.error.HTTPError) as e:  # the server keeps serving
            urllib.request.urlopen(f"{gw.url}/ipfs/{cid}?format=raw", timeout=10)
        assert e.value.code == 502


def test_read_ahead_fetches_the_children_of_a_block_read_once_each(tmp_path: Path, origin: Blockstore) -> None:
    leaves = blocks(origin, 12)
    root = origin.put_block(encode({"leaves": leaves}), DAG_CBOR)
    with counting_gateway(origin, delay=0.05) as (url, counts):
        cache = CachingStore(tmp_path / "cache", [url], readahead=4)
        cache.get(root)  # queues the 12 leaves for the background fetchers
        for leaf in leaves:  # the walk, racing them: single flight keeps it to one request per block
            assert cache.get(leaf) == origin.get(leaf)
        deadline = time.monotonic() + 30
        while cache.stats.blocks < 13 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sum(counts.values()) == 13 and set(counts.values()) == {1}
    assert cache.stats.read_ahead > 0 and cache.stats.blocks == 13
    off = CachingStore(tmp_path / "off", [url], readahead=0)
    assert off.readahead == 0


def test_a_store_over_a_smaller_bound_is_trimmed_at_start(tmp_path: Path) -> None:
    local = Blockstore(tmp_path / "cache")
    first, *rest = blocks(local, 4)
    cache = CachingStore(tmp_path / "cache", ["http://127.0.0.1:9"], max_bytes=3000)
    assert cache.cached_bytes <= 3000 and cache.stats.evictions == 1
    assert sum(cache.has(c) for c in [first, *rest]) == 3


def test_pin_manifest_fetches_the_whole_dag_and_pins_it(tmp_path: Path, origin: Blockstore,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    from bootstrap.server.serve import pin_dag

    leaves = blocks(origin, 5)
    root = origin.put_block(encode({"leaves": leaves}), DAG_CBOR)
    with running_gateway(origin) as gw:
        cache = CachingStore(tmp_path / "cache", [gw.url], max_bytes=1000)
        assert pin_dag(cache, root)
    assert cache.pins() == [root] and all(cache.has(c) for c in [root, *leaves]) and cache.cached_bytes == 0
    dead = CachingStore(tmp_path / "dead", ["http://127.0.0.1:9"])
    assert not pin_dag(dead, root)  # logged, not raised: the server keeps serving
    assert "could not pin the manifest" in caplog.text and dead.pins() == []
