"""The agent API's own front door (cidboot.httpd_lite via agent.attestation_api.AgentServer):
the same bounds as cidboot.httpd's, refusals with a precise status, keep-alive, and the hand-over
of a connection to the gateway's handler at its first `/ipfs/` request."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.attestation_api import AgentServer, serve_api
from cidboot.httpd_lite import HttpRefusal, Limits, parse_head
from cidboot.store.blockstore import Blockstore
from tests.unit.test_agent_attest import make_device


def start(servers: list[AgentServer], srv: AgentServer) -> AgentServer:
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    servers.append(srv)
    return srv


_PENDING: dict[int, bytes] = {}  # bytes read past a response, per socket


def read_response(s: socket.socket, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One response off a keep-alive connection (Content-Length framed; none for a HEAD)."""
    buf = _PENDING.pop(s.fileno(), b"")
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise EOFError(buf)
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    n = 0 if head_only else int(headers.get("content-length", "0"))
    while len(rest) < n:
        rest += s.recv(65536)
    if rest[n:]:
        _PENDING[s.fileno()] = rest[n:]
    return int(lines[0].split()[1]), headers, rest[:n]


def raw(srv: AgentServer, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(srv.server_address, timeout=10) as s:
        s.sendall(data)
        return read_response(s)


def test_one_keep_alive_connection_api_then_ipfs_then_api(servers: list[AgentServer], tmp_path: Path) -> None:
    """The connection is handed to the gateway's handler at its first /ipfs/ request (with the
    bytes already read) and the agent's routes still answer on it afterwards."""
    store = Blockstore(tmp_path)
    cid = store.put_block(b"hello block")
    srv = start(servers, serve_api(make_device().attester, "127.0.0.1", 0, store=store))
    with socket.create_connection(srv.server_address, timeout=10) as s:
        s.sendall(b"GET /results HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(s)
        assert status == 200 and b'"results": []' in body and headers["server"] == "cidboot-agent" and "date" in headers
        # two requests in one send: the second is already buffered when the first is handed over
        s.sendall(f"GET /ipfs/{cid}?format=raw HTTP/1.1\r\nHost: x\r\n\r\n"
                  f"GET /attestation?nonce={'00' * 8} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, body = read_response(s)
        assert status == 200 and body == b"hello block"
        status, headers, _ = read_response(s)
        assert status == 200 and headers["content-type"] == "application/eat+cwt"
    assert srv.metrics.by_status[200] == 3


@pytest.mark.parametrize("request_bytes,status,reason", [
    (b"GET /results\r\n\r\n", 400, b"HTTP/0.9"),
    (b"GET /results HTTP/2.0\r\n\r\n", 505, b"not supported"),
    (b"GET /results HTTX/1.1\r\n\r\n", 400, b"bad request version"),
    (b"BREW /results HTTP/1.1\r\nHost: x\r\n\r\n", 501, b"unsupported method"),
    (b"POST /results HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, b"chunked"),
    (b"POST /results HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, b"bad Content-Length"),
    (b"POST /results HTTP/1.1\r\nHost: x\r\n\r\n", 411, b"Content-Length required"),
    (b"GET /results HTTP/1.1\r\nno colon here\r\n\r\n", 400, b"malformed header"),
    (b"POST /results HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 2\r\n\r\nab", 400, b"more than once"),
    (b"GET /results HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431, b"header lines"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, b"too long"),
    (b"GET /results?a=1&" + b"&".join(b"k%d=v" % i for i in range(40)) + b" HTTP/1.1\r\n\r\n", 400, b"bad query string"),
])
def test_refusals_name_the_reason_and_the_server_keeps_serving(servers: list[AgentServer], request_bytes: bytes,
                                                                 status: int, reason: bytes) -> None:
    srv = start(servers, serve_api(None, "127.0.0.1", 0))
    got, _, body = raw(srv, request_bytes)
    assert got == status and reason in body, body
    assert raw(srv, b"GET /results HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200


def test_expect_100_continue_then_the_answer(servers: list[AgentServer]) -> None:
    srv = start(servers, serve_api(None, "127.0.0.1", 0))
    with socket.create_connection(srv.server_address, timeout=10) as s:
        s.sendall(b"POST /results HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"abc")
        assert read_response(s)[0] == 405  # /results is GET only: the body was read, the route answered


def test_slow_drip_headers_are_cut_at_the_deadline(servers: list[AgentServer]) -> None:
    srv = start(servers, AgentServer(("127.0.0.1", 0), attester=None, limits=Limits(header_timeout=0.5)))
    with socket.create_connection(srv.server_address, timeout=10) as s:
        t0 = time.monotonic()
        try:
            for ch in b"GET /results HTTP/1.1\r\nHost: x\r\n":
                s.sendall(bytes([ch]))
                time.sleep(0.1)
        except OSError:
            pass
        assert s.recv(100) == b""  # closed: the whole head did not arrive within 0.5 s
        assert time.monotonic() - t0 < 5
    assert srv.stats.timeouts == 1
    assert raw(srv, b"GET /results HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200


def test_connections_beyond_the_workers_get_503(servers: list[AgentServer]) -> None:
    srv = start(servers, AgentServer(("127.0.0.1", 0), attester=None,
                                     limits=Limits(max_workers=1, queue_wait=0.2, header_timeout=3)))
    with socket.create_connection(srv.server_address, timeout=10) as idle:
        time.sleep(0.2)  # holds the only worker
        got = raw(srv, b"GET /results HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got[0] == 503
        idle.close()
    time.sleep(0.3)
    assert raw(srv, b"GET /results HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
    assert srv.stats.busy_rejected == 1


def test_http_1_0_closes_and_head_has_no_body(servers: list[AgentServer]) -> None:
    srv = start(servers, serve_api(None, "127.0.0.1", 0))
    with socket.create_connection(srv.server_address, timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        status, headers, body = read_response(s)
        assert status == 200 and headers["connection"] == "close" and b"cidboot_agent_requests_total" in body
        assert s.recv(100) == b""
    with socket.create_connection(srv.server_address, timeout=10) as s:
        s.sendall(b"HEAD /results HTTP/1.1\r\nHost: x\r\n\r\nGET /results HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = read_response(s, head_only=True)  # HEAD on a GET route: 405, no body sent
        assert status == 405 and int(headers["content-length"]) > 0
        status, _, body = read_response(s)
        assert status == 200 and body.startswith(b"{")


HEAD_PIECES = [b"GET", b"POST", b" ", b"/results", b"//x", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/", b"HTTP/2", b"1.",
               b"\r\n", b":", b"Host", b"Content-Length", b"content-length", b"Transfer-Encoding", b"Connection",
               b"close", b"keep-alive", b"\t", b"-1", b"\xff", b"\x00", b"_", b"+"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(HEAD_PIECES), max_size=30).map(b"".join) | st.binary(max_size=200))
@example(b"GET / HTTP/1.1\r\n folded\r\n")  # a continuation line with no header before it
@example(b"GET / HTTP/1.-1\r\n")
def test_the_head_parser_refuses_with_an_http_status_or_parses(head: bytes) -> None:
    """Whatever bytes end in the blank line, parse_head gives a request or an HttpRefusal with a
    4xx/5xx status: never another exception (which would be an internal error, not an answer)."""
    try:
        req = parse_head(head + b"\r\n\r\n", 8192)
    except HttpRefusal as e:
        assert 400 <= e.status < 600
    else:
        assert req.version.startswith("HTTP/1.") and len(req.target) > 0
