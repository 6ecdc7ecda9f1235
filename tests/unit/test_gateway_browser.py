"""The gateway for browsers (issue 16 #6): CORS on every /ipfs/ answer, OPTIONS preflight, 412 for
`Cache-Control: only-if-cached` misses (path gateway spec), and client resets without tracebacks."""

from __future__ import annotations

import http.client
import logging
import socket
import struct
import time
from pathlib import Path

import pytest

from cidboot.ipld.cid import CID, RAW
from cidboot.store.blockstore import Blockstore
from tests.support.gateway_fixtures import running_gateway


def _req(url: str, method: str, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    c.request(method, path, headers=headers or {})
    r = c.getresponse()
    r.read()
    c.close()
    return r


@pytest.fixture
def store(tmp_path: Path) -> Blockstore:
    return Blockstore(tmp_path / "store")


def test_gateway_answers_browsers_with_cors_headers(store: Blockstore) -> None:
    cid = _put(store, b"hello browser")
    with running_gateway(store) as gw:
        r = _req(gw.url, "GET", f"/ipfs/{cid}?format=raw", {"Origin": "http://elsewhere.example"})
        assert r.status == 200
        assert r.getheader("Access-Control-Allow-Origin") == "*"
        assert "X-Ipfs-Roots" in (r.getheader("Access-Control-Expose-Headers") or "")
        missing = CID.of(b"not here", RAW)
        r = _req(gw.url, "GET", f"/ipfs/{missing}?format=raw", {"Origin": "http://elsewhere.example"})
        assert r.status == 404 and r.getheader("Access-Control-Allow-Origin") == "*"  # errors readable too


def test_options_preflight_is_answered_not_501(store: Blockstore) -> None:
    cid = _put(store, b"x")
    with running_gateway(store) as gw:
        r = _req(gw.url, "OPTIONS", f"/ipfs/{cid}", {"Origin": "http://elsewhere.example",
                                                       "Access-Control-Request-Method": "GET",
                                                       "Access-Control-Request-Headers": "range"})
        assert r.status == 204
        assert "GET" in (r.getheader("Access-Control-Allow-Methods") or "")
        assert "Range" in (r.getheader("Access-Control-Allow-Headers") or "")
        assert r.getheader("Access-Control-Allow-Origin") == "*"


def test_only_if_cached_miss_is_412_not_404(store: Blockstore) -> None:
    cid = _put(store, b"cached")
    missing = CID.of(b"not cached", RAW)
    with running_gateway(store) as gw:
        for method in ("GET", "HEAD"):
            r = _req(gw.url, method, f"/ipfs/{missing}?format=raw", {"Cache-Control": "only-if-cached"})
            assert r.status == 412 and r.getheader("Content-Length") == "0"
            r = _req(gw.url, method, f"/ipfs/{cid}?format=raw", {"Cache-Control": "only-if-cached"})
            assert r.status == 200
        assert _req(gw.url, "GET", f"/ipfs/{missing}?format=raw").status == 404  # without the header: 404


def test_client_reset_on_idle_keepalive_connection_logs_no_traceback(store: Blockstore,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    cid = _put(store, b"k" * 5000)
    caplog.set_level(logging.DEBUG)
    with running_gateway(store) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        for mid_request in (False, True):
            s = socket.create_connection((host, int(port)))
            if mid_request:
                s.sendall(f"GET /ipfs/{cid}?format=car HTTP/1.1\r\nHost: x\r\n".encode())  # headers never finished
            else:
                s.sendall(f"GET /ipfs/{cid}?format=raw HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                s.recv(65536)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            s.close()
        time.sleep(0.5)
        assert gw.stats.internal_errors == 0
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]


def _put(store: Blockstore, data: bytes) -> CID:
    cid = CID.of(data, RAW)
    store.put(cid, data)
    return cid
