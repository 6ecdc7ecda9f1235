"""Our trustless gateway against the Trustless Gateway spec's rules."""

from __future__ import annotations

import io
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cidboot.errors import VerificationError
from cidboot.ipld import dag
from cidboot.ipld.car import CarReader
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.ipld.dagcbor import encode
from cidboot.ipld.unixfs import ImportOptions, import_bytes, import_path
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.server import GatewayServer
from tests.support.gateway_fixtures import running_gateway

DATA = random.Random(9).randbytes(1_000_000)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayServer, dict[str, CID]]]:
    root = tmp_path_factory.mktemp("gw")
    store = Blockstore(root / "store")
    f = import_bytes(DATA, store, ImportOptions(cid_version=1, chunk_size=100_000)).cid
    tree = root / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file.bin").write_bytes(DATA[:300_000])
    (tree / "hello.txt").write_text("hello\n")
    d = import_path(tree, store, ImportOptions(cid_version=1)).cid
    node = store.put_block(encode({"file": f, "dir": d}), DAG_CBOR)
    with running_gateway(store) as server:
        yield server, {"file": f, "dir": d, "node": node}


def get(server: GatewayServer, path: str, accept: str = "", method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(server.url + path, headers={"Accept": accept} if accept else {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def car_blocks(body: bytes) -> tuple[list[CID], list[CID]]:
    r = CarReader(io.BytesIO(body))
    return r.roots, [c for c, _ in r]


def test_raw_block(gw: tuple[GatewayServer, dict[str, CID]]) -> None:
    server, c = gw
    for path, accept in ((f"/ipfs/{c['file']}?format=raw", ""), (f"/ipfs/{c['file']}", "application/vnd.ipld.raw")):
        status, h, body = get(server, path, accept)
        assert status == 200
        assert h["Content-Type"] == "application/vnd.ipld.raw"
        assert h["ETag"] == f'"{c["file"]}.raw"'
        assert h["Cache-Control"] == "public, max-age=29030400, immutable"
        assert h["X-Content-Type-Options"] == "nosniff"
        assert int(h["Content-Length"]) == len(body)
        c["file"].verify(body)


def test_head_has_headers_and_no_body(gw: tuple[GatewayServer, dict[str, CID]]) -> None:
    server, c = gw
    status, h, body = get(server, f"/ipfs/{c['file']}?format=raw", method="HEAD")
    assert status == 200 and body == b"" and h["Content-Type"] == "application/vnd.ipld.raw"


def test_car_all_is_dfs_ordered_and_complete(gw: tuple[GatewayServer, dict[str, CID]]) -> None:
    server, c = gw
    status, h, body = get(server, f"/ipfs/{c['node']}", "application/vnd.ipld.car")
    assert status == 200
    assert h["Content-Type"] == "application/vnd.ipld.car; version=1; order=dfs; dups=n"
    roots, cids = car_blocks(body)
    assert roots == [c["node"]]
    store = server.store
    assert cids == [cid for cid, _ in dag.walk(c["node"], store.get)]


def test_dag_scope_block_and_entity(gw: tuple[GatewayServer, dict[str, CID]]) -> None:
    server, c = gw
    _, _, body = get(server, f"/ipfs/{c['dir']}?format=car&dag-scope=block")
    assert car_blocks(body)[1] == [c["dir"]]
    _, _, body = get(server, f"/ipfs/{c['dir']}?format=car&dag-scope=entity")
    assert car_blocks(body)[1] == [c["dir"]]  # a directory entity is its own node, not its children
    _, _, body = get(server, f"/ipfs/{c['file']}?format=car&dag-scope=entity")
    assert len(car_blocks(body)[1]) == 11  # root + 10 leaves of 100 kB


@pytest.mark.parametrize(
    "rng, leaves",
    [("0:99999", [0]), ("100000:100000", [1]), ("99999:100000", [0, 1]), ("-1:*", [9]), ("950000:*", [9]),
     ("0:*", list(range(10))), ("-250000:-150001", [7, 8])],
)
def test_entity_bytes_sends_only_needed_blocks(gw: tuple[GatewayServer, dict[str, CID]], rng: str, leaves: list[int]) -> None:
    server, c = gw
    _, _, body = get(server, f"/ipfs/{c['file']}?format=car&dag-scope=entity&entity-bytes={rng}")
    cids = car_blocks(body)[1]
    all_leaves = dag.links(c["file"], server.store.get(c["file"]))
    assert cids == [c["file"]] + [all_leaves[i] for i in leaves]


def test_path_resolution_includes_path_blocks(gw: tuple[GatewayServer, dict[str, CID]]) -> None:
    server, c = gw
    status, h, body = get(server, f"/ipfs/{c['dir']}/sub/file.bin?format=car&dag-scope=entity")
    assert status == 200
    roots, cids = car_blocks(body)
    assert roots == [c["dir"]]
    assert cids[0] == c["dir"] and len(cids) >= 3
    assert h["X-Ipfs-Path"] == f"/ipfs/{c['dir']}/sub/file.bin"


def test_identity_probe(gw: tuple[GatewayServer, dict[str, CID]]) -> None:
    server, _ = gw
    status, h, body = get(server, "/ipfs/bafkqaaa?format=raw")
    assert (status, body) == (200, b"")


def test_if_none_match(gw: tuple[GatewayServer, dict[str, CID]]) -> None:
    server, c = gw
    req = urllib.request.Request(server.url + f"/ipfs/{c['file']}?format=raw", headers={"If-None-Match": f'"{c["file"]}.raw"'})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 304


@pytest.mark.parametrize(
    "path, accept, status",
    [
        ("/ipfs/notacid?format=raw", "", 400),
        ("/ipfs/bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy?format=raw", "", 404),
        ("/ipfs/{file}", "", 406),
        ("/ipfs/{file}", "text/html", 406),
        ("/ipfs/{file}?format=tar", "", 406),
        ("/ipfs/{file}?format=car&dag-scope=nope", "", 400),
        ("/ipfs/{file}?format=car&entity-bytes=5", "", 400),
        ("/ipfs/{file}?format=car&entity-bytes=9:2", "", 400),
        ("/ipfs/{file}", "application/vnd.ipld.car; version=2", 406),
        ("/ipfs/{dir}/missing?format=raw", "", 404),
        ("/ipfs/{dir}/../x?format=raw", "", 400),
        ("/ipns/example.com", "", 404),
        ("/", "", 404),
    ],
)
def test_bad_requests(gw: tuple[GatewayServer, dict[str, CID]], path: str, accept: str, status: int) -> None:
    server, c = gw
    got, _, body = get(server, path.format(**{k: str(v) for k, v in c.items()}), accept)
    assert got == status, body
    assert body  # every error says why


def test_server_survives_garbage_and_counts(gw: tuple[GatewayServer, dict[str, CID]]) -> None:
    import socket

    server, c = gw
    before = server.metrics.requests
    with socket.create_connection(server.server_address[:2]) as s:  # type: ignore[arg-type]
        s.sendall(b"\x16\x03\x01garbage that is not http\r\n\r\n")
        s.recv(100)
    status, _, _ = get(server, f"/ipfs/{c['file']}?format=raw")
    assert status == 200
    # the counter is bumped just after the response is written: give that thread a moment
    deadline = time.monotonic() + 5
    while server.metrics.requests <= before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.metrics.requests > before


def test_many_clients_at_once(gw: tuple[GatewayServer, dict[str, CID]], tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server, c = gw

    def one(_: int) -> int:
        return len(get(server, f"/ipfs/{c['file']}?format=car")[2])

    with ThreadPoolExecutor(16) as ex:
        sizes = set(ex.map(one, range(32)))
    assert len(sizes) == 1 and sizes.pop() > len(DATA)


def test_a_damaged_block_in_the_store_is_never_served_as_valid(tmp_path: Path) -> None:
    """Verify-on-read on the serving side: the CAR path sends each block as read, without
    copying it, but only after its hash matched. A leaf whose file was damaged on disk cuts the
    CAR stream before that block (no terminating chunk: the client sees a broken stream, never a
    complete CAR) and makes a raw request a 500; the damaged bytes are sent in neither."""
    import http.client

    store = Blockstore(tmp_path / "store")
    data = random.Random(5).randbytes(500_000)
    root = import_bytes(data, store, ImportOptions(cid_version=1, chunk_size=100_000)).cid
    leaves = [cid for cid, _ in dag.walk(root, store.get) if cid != root]
    bad = leaves[2]
    path = store._file(bad)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with running_gateway(store) as server:
        status, _, body = get(server, f"/ipfs/{bad}?format=raw")
        assert status == 500 and bytes(raw) not in body
        conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=10)
        conn.request("GET", f"/ipfs/{root}?format=car")
        resp = conn.getresponse()
        assert resp.status == 200  # the headers went before the damage was found
        with pytest.raises(http.client.IncompleteRead) as cut:
            resp.read()
        got = cut.value.partial
        conn.close()
    assert data[100_000:200_000] in got  # the leaf before it was sent (raw leaves: the bytes as they are)
    assert bytes(raw) not in got  # the damaged one was not


def test_car_read_ahead_keeps_order_errors_and_stops_with_the_sender() -> None:
    """The CAR path's read-ahead thread: blocks come in walk order, an error comes after every
    block before it (never in place of one, never early), and a sender that stops (the client
    went away) stops the thread within a block or two, not after the whole walk."""
    from cidboot.store.gateway.server import CAR_READ_AHEAD, _read_ahead

    cids = [CID.of(bytes([i])) for i in range(10)]

    def walk(fail_at: int | None = None) -> Iterator[tuple[CID, bytes]]:
        for i, c in enumerate(cids):
            if i == fail_at:
                raise VerificationError(f"block {i} damaged")
            read.append(i)
            yield c, bytes([i])

    read: list[int] = []
    assert [c for c, _ in _read_ahead(walk())] == cids
    read.clear()
    got = []
    with pytest.raises(VerificationError, match="block 5"):
        for c, _ in _read_ahead(walk(fail_at=5)):
            got.append(c)
    assert got == cids[:5]
    read.clear()
    ahead = _read_ahead(walk())
    next(ahead)
    ahead.close()
    time.sleep(1.5)  # the thread notices the stop within its 0.5 s put timeout
    assert not [t for t in threading.enumerate() if t.name == "car-read-ahead"]
    assert len(read) <= 1 + CAR_READ_AHEAD + 1  # the one sent, the queue, the one in hand
