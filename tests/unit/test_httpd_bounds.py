"""fail-closed #9: the HTTP servers (gateway, boot server, agent) under bursts, idle and slow
clients, large bodies, keep-alive and handler bugs. Loopback only."""

from __future__ import annotations

import http.client
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.server import GatewayServer, serve_gateway


def _boom() -> tuple[int, str, bytes]:
    raise RuntimeError("a bug in a route")


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[tuple[GatewayServer, CID]]:
    store = Blockstore(tmp_path / "store")
    cid = store.put_block(b"hello, block\n")
    srv = serve_gateway(store, "127.0.0.1", 0, extra_routes={"/boom": _boom})
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv, cid
    finally:
        srv.shutdown()
        srv.server_close()


def _get(port: int, path: str, timeout: float = 10.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def test_burst_of_200_concurrent_gets_all_answered(gw: tuple[GatewayServer, CID]) -> None:
    srv, cid = gw
    port = srv.server_address[1]
    n = 200
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = _get(port, f"/ipfs/{cid}?format=raw", timeout=5.0)
        except OSError as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [r for r in results if r != 200]
    assert not failed, f"{len(failed)} of {n} lost: {failed[:3]}"
    assert time.monotonic() - t0 < 10


def test_256_idle_connections_do_not_stop_a_real_request_and_are_closed(gw: tuple[GatewayServer, CID]) -> None:
    srv, cid = gw
    port = srv.server_address[1]
    idle = []
    for i in range(256):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % 2:
            s.sendall(b"GET /ipfs/")  # slowloris: a request line that never ends
        idle.append(s)
    try:
        t0 = time.monotonic()
        assert _get(port, f"/ipfs/{cid}?format=raw", timeout=5.0) == 200
        assert time.monotonic() - t0 < 2
        # and the server does not hold them forever: the header deadline closes them
        deadline = time.monotonic() + 10.0 + 5  # cidboot.httpd.Limits.header_timeout + slack
        open_ = list(idle)
        while open_ and time.monotonic() < deadline:
            for s in list(open_):
                s.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    if s.recv(1024) == b"":
                        open_.remove(s)
                except TimeoutError:
                    break
                except OSError:
                    open_.remove(s)
        assert not open_, f"{len(open_)} idle connections still held after the header timeout"
    finally:
        for s in idle:
            s.close()


def test_slow_drip_headers_are_cut_at_the_deadline_not_per_read(tmp_path: Path) -> None:
    from cidboot.httpd import Limits

    store = Blockstore(tmp_path / "s")
    srv = serve_gateway(store, "127.0.0.1", 0, limits=Limits(header_timeout=1.0))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        s = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=5)
        t0 = time.monotonic()
        closed = False
        for ch in b"GET /ipfs/bafy HTTP/1.1\r\nX: " + b"a" * 100:
            try:
                s.sendall(bytes([ch]))
            except OSError:
                closed = True
                break
            time.sleep(0.2)  # each byte well inside any per-read timeout
            if time.monotonic() - t0 > 4:
                break
        s.settimeout(3)
        try:
            closed = closed or s.recv(100) == b""
        except ConnectionResetError:
            closed = True
        assert closed and time.monotonic() - t0 < 4
    finally:
        srv.shutdown()
        srv.server_close()


def test_handler_exception_is_500_counted_and_server_keeps_serving(gw: tuple[GatewayServer, CID]) -> None:
    srv, cid = gw
    port = srv.server_address[1]
    assert _get(port, "/boom") == 500
    assert srv.stats.internal_errors == 1
    assert _get(port, f"/ipfs/{cid}?format=raw") == 200


def test_keep_alive_request_latency_is_not_nagle_delayed_ack(gw: tuple[GatewayServer, CID]) -> None:
    srv, cid = gw
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=5)
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        conn.request("GET", f"/ipfs/{cid}?format=raw")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b"hello, block\n"
        times.append(time.perf_counter() - t0)
    conn.close()
    assert statistics.median(times) < 0.020, f"p50 {statistics.median(times) * 1000:.1f} ms per keep-alive request"


class _SpySocket(socket.socket):
    """The server side of a connection, recording each send."""

    sends: list[bytes] = []

    def sendall(self, data: Any, *a: Any) -> None:
        _SpySocket.sends.append(bytes(data))
        super().sendall(data, *a)

    def send(self, data: Any, *a: Any) -> int:
        _SpySocket.sends.append(bytes(data))
        return super().send(data, *a)

    def sendmsg(self, buffers: Any, *a: Any) -> int:  # a gathering send is one send
        _SpySocket.sends.append(b"".join(bytes(b) for b in buffers))
        return super().sendmsg(buffers, *a)


def test_small_response_is_one_send_headers_and_body(gw: tuple[GatewayServer, CID]) -> None:
    srv, cid = gw

    def spy_accept() -> tuple[socket.socket, object]:
        s, addr = srv.socket.accept()
        return _SpySocket(s.family, s.type, s.proto, s.detach()), addr

    srv.get_request = spy_accept  # type: ignore[method-assign]
    _SpySocket.sends.clear()
    assert _get(srv.server_address[1], f"/ipfs/{cid}?format=raw") == 200
    assert len(_SpySocket.sends) == 1, [len(b) for b in _SpySocket.sends]
    assert _SpySocket.sends[0].endswith(b"\r\n\r\nhello, block\n")


_AGENT = """
import sys
from agent.attestation_api import serve_api
srv = serve_api(None, "127.0.0.1", 0)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(key)


def test_body_over_limit_is_413_and_30_large_posts_keep_rss_bounded() -> None:
    from agent.attestation_api import MAX_BODY

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = subprocess.Popen([sys.executable, "-c", _AGENT], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert p.stdout is not None
        port = int(p.stdout.readline())
        # over the limit: refused before a byte of the body is read
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(f"POST /results HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 413")
        s.close()
        before = _vm(p.pid, "VmRSS")
        chunk = b"\0" * (1 << 20)  # one buffer shared by the 30 senders

        def post() -> None:
            # the whole body, at a pace that keeps all 30 requests in flight at once
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
                    c.sendall(f"POST /results HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY}\r\n\r\n".encode())
                    for _ in range(MAX_BODY // len(chunk)):
                        c.sendall(chunk)
                        time.sleep(0.05)
                    c.recv(100)
            except OSError:
                pass  # a 503 closes the connection while we still send: that is the bound working

        threads = [threading.Thread(target=post) for _ in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        grew = _vm(p.pid, "VmHWM") - before
        assert grew < 64 * 1024 * 1024, f"agent grew {grew >> 20} MiB for 30 x {MAX_BODY >> 20} MiB bodies"
        assert _get(port, "/results") == 200  # and it still serves
    finally:
        p.kill()
        p.wait()
