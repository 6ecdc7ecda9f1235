"""IPFS Cluster: the REST client against a fake server (bad answers refused precisely), and
`imagebuilder publish` against a real 3-peer CRDT cluster on loopback (replication 2, one
peer killed, the cluster re-pins, the blocks come back verified from a survivor's gateway)."""

from __future__ import annotations

import http.server
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.ipld.dag import walk
from cidboot.ipld.unixfs import export_file, import_bytes
from cidboot.store.blockstore import Blockstore
from cidboot.store.cluster import (
    ClusterClient,
)
from cidboot.store.gateway.client import fetch
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from imagebuilder.cli import main as imagebuilder
from tests.support.cluster_node import Cluster
from tests.support.kubo_node import KuboNode

KEYS = [ed25519.Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in (7, 8)]
CID_A = CID.of(b"a", RAW)


def make_signed_manifest(store: Blockstore, seed: int = 1) -> tuple[CID, dict[str, bytes]]:
    """A small but complete manifest DAG (two multi-block UnixFS layers, a flow, operations)."""
    rnd = random.Random(seed)
    files = {"kernel": rnd.randbytes(700_000), "agent": rnd.randbytes(300_000)}
    layers = tuple(Layer(import_bytes(data, store).cid, len(data), role) for role, data in files.items())
    flow = store.put_block(b"flow: hello\n", RAW)
    ops = {"greet": store.put_block(b"op greet", RAW), "count": store.put_block(b"op count", RAW)}
    m = Manifest(
        name="hello", version=1, expires=int(time.time()) + 3600, layers=layers,
        root=RootOfTrust.from_public_keys([k.public_key() for k in KEYS], threshold=2),
        flow=flow, operations=ops,
    )
    signed = sign_manifest(m, KEYS)
    cid = store.put_block(signed.encode(), DAG_CBOR)
    return cid, {str(lyr.cid): files[lyr.role] for lyr in layers}


# --- the REST client against a fake cluster -------------------------------------------------


Route = Callable[[http.server.BaseHTTPRequestHandler], tuple[int, bytes]]


@pytest.fixture
def fake() -> Iterator[tuple[str, dict[tuple[str, str], Route]]]:
    """An HTTP server whose answers the test sets per (method, path)."""
    routes: dict[tuple[str, str], Route] = {}

    class H(http.server.BaseHTTPRequestHandler):
        def _any(self) -> None:
            path = self.path.split("?", 1)[0]
            route = routes.get((self.command, path))
            status, body = route(self) if route else (404, b'{"code":404,"message":"no route"}')
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = _any

        def log_message(self, *a: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", routes
    finally:
        srv.shutdown()
        srv.server_close()


def _json(obj: Any, status: int = 200) -> Route:
    return lambda h: (status, json.dumps(obj).encode())


def status_obj(cid: CID, statuses: dict[str, str]) -> dict[str, Any]:
    return {"cid": str(cid), "name": "x", "allocations": list(statuses), "peer_map": {
        p: {"peername": p, "status": s, "ipfs_peer_id": "12D3K" + p, "error": "", "attempt_count": 0}
        for p, s in statuses.items()}}


# --- imagebuilder publish: bad input, no cluster needed --------------------------------------


def _publish(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = imagebuilder(["publish", *args])
    out, err = capsys.readouterr()
    return rc, out, err


# --- a real 3-peer cluster ---------------------------------------------------------------------


@pytest.mark.kubo
@pytest.mark.cluster
def test_publish_reaches_two_peers_and_cluster_repins_when_one_is_killed(
    cluster_factory: Callable[[int], Cluster], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = cluster_factory(3)
    entry = cluster.peers[0]
    store = Blockstore(tmp_path / "store")
    cid, layers = make_signed_manifest(store)
    n_blocks = sum(1 for c, _ in walk(cid, store.get))

    rc, out, err = _publish(capsys, str(cid), "--cluster", entry.rest_url, "--kubo", entry.kubo.api_url,
                            "--replication", "2:2", "--store", str(store.path), "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["cid"] == str(cid) and res["blocks"] == n_blocks
    assert len(res["pinned"]) == 2 and set(res["allocations"]) == set(res["pinned"])
    assert entry.peer_id in res["pinned"]  # the member that received the CAR is allocated first
    ctl = entry.ctl("status", str(cid))
    assert ctl.count("PINNED") == 2, ctl
    for seed in (4, 5, 6):  # 1 copy: always on the member that already holds the blocks (no transfer)
        small, _ = make_signed_manifest(store, seed)
        rc, out, err = _publish(capsys, str(small), "--cluster", entry.rest_url, "--kubo", entry.kubo.api_url,
                                "--replication", "1", "--store", str(store.path), "--json")
        assert rc == 0 and json.loads(out)["pinned"] == [entry.peer_id], err

    # Kill an allocated peer other than the one we talk to (SIGKILL: no goodbye to the cluster).
    victim = cluster.by_id(next(p for p in res["pinned"] if p != entry.peer_id))
    victim.kill()
    client = ClusterClient(entry.rest_url)
    deadline = time.monotonic() + 120
    while True:
        st = client.status(cid)
        live_pinned = [p.peer for p in st.pinned if p.peer != victim.peer_id]
        if len(live_pinned) >= 2 and victim.peer_id not in client.allocation(cid).allocations:
            break
        assert time.monotonic() < deadline, f"no re-pin after killing {victim.peer_id}: {st.describe()}"
        time.sleep(1)
    ctl = entry.ctl("status", str(cid))
    assert ctl.count("PINNED") == 2, ctl

    # The blocks come back, verified by CID, from a survivor's gateway (NoFetch: only what it holds).
    survivor = next(cluster.by_id(p) for p in live_pinned if p != entry.peer_id) if any(
        p != entry.peer_id for p in live_pinned) else cluster.by_id(live_pinned[0])
    dest = Blockstore(tmp_path / "fetched")
    fr = fetch(cid, [survivor.kubo.gateway_url], dest)
    assert not fr.dropped and fr.blocks_fetched == n_blocks
    for layer_cid, data in layers.items():
        assert b"".join(export_file(CID.parse(layer_cid), dest.get)) == data

    # Without --kubo the CAR goes through the REST API (/add?format=car) to the 2 live peers.
    cid2, layers2 = make_signed_manifest(store, seed=2)
    rc, out, err = _publish(capsys, str(cid2), "--cluster", entry.rest_url, "--replication", "2:2",
                            "--store", str(store.path), "--json")
    assert rc == 0, err
    res2 = json.loads(out)
    assert len(res2["pinned"]) == 2 and victim.peer_id not in res2["pinned"]
    other = next(cluster.by_id(p) for p in res2["pinned"] if p != entry.peer_id)
    dest2 = Blockstore(tmp_path / "fetched2")
    fetch(cid2, [other.kubo.gateway_url], dest2)
    for layer_cid, data in layers2.items():
        assert b"".join(export_file(CID.parse(layer_cid), dest2.get)) == data

    # More copies than live peers: the cluster's own refusal, quoted, exit 1.
    rc, out, err = _publish(capsys, str(cid2), "--cluster", entry.rest_url, "--kubo", entry.kubo.api_url,
                            "--replication", "3:3", "--store", str(store.path))
    assert rc == 1 and out == ""
    assert "HTTP 500: not enough peers to allocate" in err, err


@pytest.mark.kubo
def test_publish_to_one_kubo_node_pins_the_whole_dag_there(
    kubo: KuboNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Blockstore(tmp_path / "store")
    cid, layers = make_signed_manifest(store, seed=3)
    rc, out, err = _publish(capsys, str(cid), "--kubo", kubo.api_url, "--store", str(store.path))
    assert rc == 0, err
    assert out.strip() == str(cid)
    assert str(cid) in kubo.ipfs("pin", "ls", "--type=recursive", str(cid))
    for layer_cid, data in layers.items():
        assert kubo.ipfs_bytes("cat", layer_cid) == data
