"""IPFS Cluster: the REST client against a fake server (bad answers refused precisely), and
`imagebuilder publish` against a real 3-peer CRDT cluster on loopback (replication 2, one
peer killed, the cluster re-pins, the blocks come back verified from a survivor's gateway)."""

from __future__ import annotations

import http.server
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.ipld.unixfs import import_bytes
from cidboot.store.blockstore import Blockstore
from cidboot.store.cluster import (
    BadClusterURL,
    BadReplication,
    ClusterClient,
    ClusterProtocolError,
    ClusterRequestRefused,
    ClusterUnreachable,
    PinNotFound,
    PinStatus,
    Replication,
    ReplicationTimeout,
)
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from imagebuilder.cli import main as imagebuilder
from tests.support.kubo_node import free_port

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


def test_replication_parses_min_max_n_and_everywhere() -> None:
    assert Replication.parse("2:3") == Replication(2, 3)
    assert Replication.parse("2") == Replication(2, 2)
    assert Replication.parse("-1").everywhere
    for bad in ("3:2", "0:1", "x", "1:", "-1:2", ""):
        with pytest.raises(BadReplication):
            Replication.parse(bad)


def test_cluster_url_must_be_http() -> None:
    for bad in ("127.0.0.1:9094", "/ip4/127.0.0.1/tcp/9094", "ftp://h:1", "http://h:port"):
        with pytest.raises(BadClusterURL):
            ClusterClient(bad)


def test_cluster_down_is_unreachable_with_the_url_in_the_message() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ClusterUnreachable, match=r"cluster at http://127\.0\.0\.1:\d+: GET /peers: .*refused"):
        ClusterClient(url, timeout=3).peers()


def test_cluster_answering_html_is_a_protocol_error(fake: Any) -> None:
    url, routes = fake
    routes[("GET", "/peers")] = lambda h: (200, b"<html>not a cluster</html>\n")
    routes[("GET", "/id")] = lambda h: (200, b"<html>not a cluster</html>")
    with pytest.raises(ClusterProtocolError, match="line 1 is not JSON"):
        ClusterClient(url).peers()
    with pytest.raises(ClusterProtocolError, match="did not answer JSON"):
        ClusterClient(url).id()


def test_cluster_url_answering_not_http_is_a_protocol_error() -> None:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(ClusterProtocolError, match="not an HTTP answer"):
            ClusterClient(f"http://127.0.0.1:{srv.getsockname()[1]}", timeout=5).peers()
    finally:
        t.join(5)
        srv.close()


def test_pin_answer_about_another_cid_is_refused(fake: Any) -> None:
    url, routes = fake
    other = CID.of(b"b", RAW)
    routes[("POST", f"/pins/{CID_A}")] = _json({"cid": str(other), "allocations": ["p1"]})
    with pytest.raises(ClusterProtocolError, match="the cluster answered about"):
        ClusterClient(url).pin(CID_A, Replication(1, 1))


def test_status_without_peer_map_is_refused(fake: Any) -> None:
    url, routes = fake
    routes[("GET", f"/pins/{CID_A}")] = _json({"cid": str(CID_A)})
    with pytest.raises(ClusterProtocolError, match="no peer_map"):
        ClusterClient(url).status(CID_A)


def test_cluster_error_message_is_quoted(fake: Any) -> None:
    url, routes = fake
    routes[("POST", f"/pins/{CID_A}")] = _json(
        {"code": 500, "message": "not enough peers to allocate CID. Needed at least: 5. Wanted at most: 5."}, 500)
    with pytest.raises(ClusterRequestRefused, match="HTTP 500: not enough peers to allocate") as e:
        ClusterClient(url).pin(CID_A, Replication(5, 5))
    assert e.value.status == 500
    with pytest.raises(PinNotFound, match="HTTP 404"):
        ClusterClient(url).allocation(CID_A)


def test_wait_pinned_reports_progress_then_returns(fake: Any) -> None:
    url, routes = fake
    answers = iter([{"p1": "pinning", "p2": "pin_queued"}, {"p1": "pinned", "p2": "pinning"},
                    {"p1": "pinned", "p2": "pinned", "p3": "remote"}])
    routes[("GET", f"/pins/{CID_A}")] = lambda h: (200, json.dumps(status_obj(CID_A, next(answers))).encode())
    seen: list[PinStatus] = []
    st = ClusterClient(url).wait_pinned(CID_A, 2, interval=0.01, progress=seen.append)
    assert sorted(p.peer for p in st.pinned) == ["p1", "p2"]
    assert [s.summary() for s in seen] == ["1 pin_queued, 1 pinning", "1 pinned, 1 pinning",
                                           "2 pinned, 1 remote"]


def test_wait_pinned_times_out_naming_each_peer(fake: Any) -> None:
    url, routes = fake
    routes[("GET", f"/pins/{CID_A}")] = _json(status_obj(CID_A, {"p1": "pinned", "p2": "pin_error"}))
    with pytest.raises(ReplicationTimeout, match=r"reached 1 of 2 peers .*p2: pin_error"):
        ClusterClient(url).wait_pinned(CID_A, 2, timeout=0.2, interval=0.05)


# --- imagebuilder publish: bad input, no cluster needed --------------------------------------


def _publish(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = imagebuilder(["publish", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_publish_to_a_cluster_that_is_down_exits_1_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Blockstore(tmp_path / "s")
    cid, _ = make_signed_manifest(store)
    url = f"http://127.0.0.1:{free_port()}"
    rc, out, err = _publish(capsys, str(cid), "--cluster", url, "--kubo", "http://127.0.0.1:1",
                            "--store", str(store.path))
    assert rc == 1 and out == ""
    assert f"imagebuilder: error: cluster at {url}: GET /peers:" in err and "refused" in err


def test_publish_to_a_cluster_url_answering_garbage_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: Any
) -> None:
    url, routes = fake
    routes[("GET", "/peers")] = lambda h: (200, b"HTTP/1.1 gateway says hi\n")
    store = Blockstore(tmp_path / "s")
    cid, _ = make_signed_manifest(store)
    rc, out, err = _publish(capsys, str(cid), "--cluster", url, "--kubo", "http://127.0.0.1:1",
                            "--store", str(store.path))
    assert rc == 1 and out == ""
    assert "is not JSON (is this the cluster REST API" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--replication", "3:2"], "need 1 <= MIN <= MAX"),
    (["--kubo", "http://127.0.0.1:1", "--replication", "x"], "replication must be MIN:MAX"),
    (["--no-target"], "publish needs --kubo URL (one Kubo node) or --cluster URL"),
])
def test_publish_bad_arguments_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    store = Blockstore(tmp_path / "s")
    cid, _ = make_signed_manifest(store)
    base = [str(cid), "--store", str(store.path)]
    if args == ["--no-target"]:
        args = []
    else:
        base += ["--cluster", "http://127.0.0.1:1"]
    rc, _, err = _publish(capsys, *base, *args)
    assert rc == 1 and message in err


def test_publish_refuses_a_manifest_whose_dag_is_incomplete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: Any
) -> None:
    url, routes = fake
    routes[("GET", "/peers")] = _json({"id": "p1", "peername": "p1"})
    store = Blockstore(tmp_path / "s")
    cid, layers = make_signed_manifest(store)
    store.delete(CID.parse(next(iter(layers))))
    rc, _, err = _publish(capsys, str(cid), "--cluster", url, "--kubo", "http://127.0.0.1:1",
                          "--store", str(store.path))
    assert rc == 1 and "the local store must hold the whole DAG" in err


def test_publish_refuses_a_cid_that_is_not_a_signed_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Blockstore(tmp_path / "s")
    raw = store.put_block(b"not a manifest", RAW)
    rc, _, err = _publish(capsys, str(raw), "--kubo", "http://127.0.0.1:1", "--store", str(store.path))
    assert rc == 1 and "not a signed manifest" in err


# --- a real 3-peer cluster ---------------------------------------------------------------------


