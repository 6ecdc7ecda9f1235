"""The fetch client's own HTTP/1.1 GET (cidboot.store.gateway.wire): bodies de-chunked into the
caller's buffer, framing errors and cut bodies typed (ResponseError, or an OSError for a
connection closed without an answer), bounds as http.client's; and the client's import pulls in
neither http.client, ssl nor logging (a boot stage's start-up under TCG pays for each)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cidboot.store.gateway.wire import MAX_HEADERS, Connection, Response, ResponseError


def answer(raw: bytes) -> Response:
    """The Response a Connection reads when the server sends `raw` and closes."""
    ours, theirs = socket.socketpair()
    conn = Connection("example.org", None, tls=False, timeout=5)
    conn.sock = ours

    def serve() -> None:
        theirs.sendall(raw)
        theirs.close()

    threading.Thread(target=serve, daemon=True).start()
    return conn.getresponse()


def read_all(resp: Response, step: int) -> bytes:
    out = bytearray()
    buf = bytearray(step)
    while n := resp.readinto(buf):
        out += buf[:n]
    return bytes(out)


CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nx-a: 2\r\n\r\n"
           b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nTrailer: x\r\n\r\n")


@pytest.mark.parametrize("step", [1, 4, 100])
def test_chunked_body_is_read_into_the_buffer_across_chunks(step: int) -> None:
    resp = answer(CHUNKED)
    assert resp.status == 200 and resp.getheader("x-a") == "1, 2" and resp.chunked
    assert read_all(resp, step) == b"hello world!"
    assert resp.readinto(bytearray(4)) == 0


def test_read_n_gives_fewer_bytes_only_at_the_end() -> None:
    resp = answer(CHUNKED)
    assert resp.read(3) == b"hel" and resp.read(100) == b"lo world!" and resp.read(5) == b""
    resp = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA")
    assert resp.read(100) == b"hello" and resp.read(1) == b""
    resp = answer(b"HTTP/1.0 200 OK\r\n\r\nto the end")  # no length: the body ends with the connection
    assert read_all(resp, 3) == b"to the end"


def test_one_hundred_continue_is_skipped() -> None:
    resp = answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno")
    assert resp.status == 404 and resp.read(10) == b"no"


@pytest.mark.parametrize("raw, why", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\nshort", "inside a chunk"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", "before its last chunk"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk-size"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
])
def test_a_cut_or_garbled_body_is_a_response_error(raw: bytes, why: str) -> None:
    with pytest.raises(ResponseError, match=why):
        read_all(answer(raw), 64)


@pytest.mark.parametrize("raw, why", [
    (b"SMTP ready\r\n\r\n", "status line"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (MAX_HEADERS + 1) + b"\r\n", "headers"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", "longer than"),
    (b"HTTP/1.1 200 OK\r\nX: y\r\n", "inside its headers"),
])
def test_a_broken_answer_head_is_a_response_error(raw: bytes, why: str) -> None:
    with pytest.raises(ResponseError, match=why):
        answer(raw)


def test_a_connection_closed_without_an_answer_is_a_transport_error() -> None:
    with pytest.raises(ConnectionResetError):
        answer(b"")


def test_the_request_names_host_and_refuses_line_breaks() -> None:
    ours, theirs = socket.socketpair()
    conn = Connection("::1", 8080, tls=False, timeout=5)
    conn.sock = ours
    conn.request("/ipfs/x?format=car", {"Accept": "application/vnd.ipld.car"})
    head = theirs.recv(4096)
    assert head.startswith(b"GET /ipfs/x?format=car HTTP/1.1\r\nHost: [::1]:8080\r\n") and head.endswith(b"\r\n\r\n")
    assert b"\r\nAccept: application/vnd.ipld.car\r\n" in head and b"Connection: close" in head
    with pytest.raises(ResponseError):
        conn.request("/ipfs/x\r\nEvil: 1", {})
    conn.close()
    theirs.close()


def test_the_client_imports_neither_http_client_nor_ssl_nor_logging() -> None:
    code = ("import sys, cidboot.store.gateway.client\n"
            "print(sorted(m for m in ('http.client', 'ssl', 'logging', 'email.parser') if m in sys.modules))")
    repo = Path(__file__).resolve().parents[2]  # this checkout's cidboot (-c puts the cwd first on sys.path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo).stdout
    assert out.strip() == "[]"
