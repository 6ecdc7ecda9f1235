"""Fuzzing the trustless gateway's request side: the parser raises only its documented errors,
and a running server answers every mutated request (or closes it) and keeps serving good ones."""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cidboot.errors import FormatError
from cidboot.ipld.cid import RAW
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.request import parse
from cidboot.store.gateway.server import GatewayServer, serve_gateway

GOOD_CID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
PIECES = ["/ipfs/", GOOD_CID, "/", "a", "%2F", "%00", "?", "format=", "car", "raw", "&", "dag-scope=", "entity",
          "block", "all", "entity-bytes=", "0:*", "-1:5", "9:3", "car-version=", "2", "car-order=", "dfs", "unk",
          "car-dups=", "y", "n", "filename=", "x.car", "#", "..", "//", "\u00e9", "%ff"]
ACCEPTS = ["", "application/vnd.ipld.raw", "application/vnd.ipld.car", "application/vnd.ipld.car; version=1; order=dfs; dups=y",
           "application/vnd.ipld.car; version=2", "text/html", "*/*", "application/vnd.ipld.car;order=unk", ";;;=", "\x00"]

targets = st.lists(st.sampled_from(PIECES), max_size=12).map("".join) | st.text(max_size=80)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=targets, accept=st.sampled_from(ACCEPTS) | st.text(max_size=40))
@example(target="//[", accept="")  # urlsplit's "Invalid IPv6 URL" escaped as a ValueError once
def test_request_parser_raises_only_format_errors(target: str, accept: str) -> None:
    try:
        parse(target, accept)
    except FormatError:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayServer, str]]:
    store = Blockstore(tmp_path_factory.mktemp("gwfuzz"))
    cid = store.put_block(b"hello fuzz", RAW)
    srv = serve_gateway(store, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, str(cid)
    srv.shutdown()
    srv.server_close()


def _raw_exchange(addr: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(target=targets, accept=st.sampled_from(ACCEPTS), method=st.sampled_from(["GET", "HEAD", "POST", "BREW", "G\x00T"]))
def test_server_answers_mutated_requests_and_keeps_serving(server: tuple[GatewayServer, str], target: str,
                                                             accept: str, method: str) -> None:
    srv, cid = server
    host, port = str(srv.server_address[0]), int(srv.server_address[1])
    addr = (host, port)
    line = f"{method} {target.replace(' ', '%20').replace(chr(13), '').replace(chr(10), '')} HTTP/1.1\r\n"
    reply = _raw_exchange(addr, (line + f"Host: x\r\nAccept: {accept.replace(chr(13), '').replace(chr(10), '')}\r\n"
                                 "Connection: close\r\n\r\n").encode("utf-8", "surrogateescape"))
    if reply:  # an answer is a status line, never a traceback page
        assert reply.startswith(b"HTTP/1."), reply[:200]
        assert b"Traceback" not in reply
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("GET", f"/ipfs/{cid}?format=raw")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"hello fuzz"
    conn.close()

