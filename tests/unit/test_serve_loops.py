"""The serve loops of every cidboot server (the agent's API, the bounded HTTP server of the
gateway, boot server and key broker, TFTP and DHCP) sleep until there is work or a shutdown
(cidboot.httpd_lite.StopBell): an idle server makes no wake-ups, and `shutdown` returns as soon
as its loop has returned. They used to poll a stop flag every 0.5 s: two wake-ups a second for
nothing, and up to 0.5 s per shutdown, paid by every test that starts and stops a server.

Each test runs on every server, after a real exchange with it (so its loop is running and has
gone back to sleep: the old loop had then most of a poll interval ahead of it)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.attestation_api import AgentServer
from bootstrap.server.dhcp_server import DhcpConfig, DhcpServer
from bootstrap.server.metrics import Metrics
from bootstrap.server.tftp_server import TftpServer
from cidboot.httpd import BoundedHandler, BoundedHTTPServer
from cidboot.netboot import dhcp

PROMPT = 0.2  # seconds a shutdown may take here; the polling loops took up to 0.5 (~0.5 right after a request)
KINDS = ["lite", "bounded", "tftp", "dhcp"]


class _NoContent(BoundedHandler):
    def do_GET(self) -> None:
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def _http_exchange(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as c:
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = b""
        while data := c.recv(4096):
            head += data
    assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 204")), head[:80]


@dataclass
class Served:
    """A server, one real exchange with it, and how to close it for good."""

    server: Any
    exchange: Callable[[], None]
    close: Callable[[], None]


def _make(kind: str, tmp_path: Path) -> Served:
    if kind == "lite":
        lite = AgentServer(("127.0.0.1", 0), attester=None)
        return Served(lite, lambda: _http_exchange(lite.server_address[1]), lite.server_close)
    if kind == "bounded":
        bounded = BoundedHTTPServer(("127.0.0.1", 0), _NoContent)
        return Served(bounded, lambda: _http_exchange(bounded.server_address[1]), bounded.server_close)
    if kind == "tftp":
        tftp = TftpServer(tmp_path, "127.0.0.1", 0)

        def missing() -> None:  # answered by the request loop itself (ERROR 1), no transfer thread
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(3)
                c.sendto(b"\x00\x01missing\x00octet\x00", ("127.0.0.1", tftp.port))
                assert c.recv(1024)[:4] == b"\x00\x05\x00\x01"

        return Served(tftp, missing, lambda: None)  # shutdown closes the port
    assert kind == "dhcp"
    srv = DhcpServer(DhcpConfig("lo", "127.0.0.1"), Metrics(), bind=False)  # ProxyDHCP: a unicast REQUEST gets an ACK
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    srv.socks = [s]

    def request() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(3)
            c.bind(("127.0.0.1", 0))
            c.sendto(dhcp.encode_request("52:54:00:12:34:56", dhcp.REQUEST, xid=7, ciaddr="127.0.0.1", broadcast=False),
                     s.getsockname())
            assert dhcp.parse(c.recv(4096)).msg_type == dhcp.ACK

    return Served(srv, request, lambda: None)


class Loop:
    """`serve_forever` on a thread whose kernel thread id is known (to read its context switches)."""

    def __init__(self, server: Any) -> None:
        self.tid = 0
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(server,), daemon=True)
        self.thread.start()
        assert self._started.wait(3)

    def _run(self, server: Any) -> None:
        self.tid = threading.get_native_id()
        self._started.set()
        server.serve_forever()

    def switches(self) -> int:
        """Times the thread has gone to sleep (voluntary) or been preempted (involuntary)."""
        with open(f"/proc/self/task/{self.tid}/status") as f:
            return sum(int(line.split()[1]) for line in f
                       if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")))


@pytest.fixture(params=KINDS)
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    s = _make(request.param, tmp_path)
    yield s
    s.close()


def _returns_within(fn: Callable[[], None], seconds: float) -> bool:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def test_shutdown_returns_at_once_and_the_loop_has_returned(served: Served) -> None:
    loop = Loop(served.server)
    served.exchange()
    time.sleep(0.05)  # back asleep after the exchange (a shutdown racing the old loop's return to its poll was quick)
    t0 = time.monotonic()
    served.server.shutdown()
    loop.thread.join(2)
    took = time.monotonic() - t0
    assert not loop.thread.is_alive()
    assert took < PROMPT, f"shutdown took {took:.3f} s"


def test_shutdown_before_serve_forever_started(served: Served) -> None:
    """The HTTP servers' shutdown waits for the serving thread to get there (socketserver's);
    TFTP's and DHCP's return at once (their callers may never serve). Either way the loop that
    starts afterwards returns at once, and neither waits for a poll."""
    stopper = threading.Thread(target=served.server.shutdown, daemon=True)
    stopper.start()
    time.sleep(0.05)  # the shutdown is in before the loop
    t0 = time.monotonic()
    assert _returns_within(served.server.serve_forever, 2)
    stopper.join(2)
    assert not stopper.is_alive()
    assert time.monotonic() - t0 < PROMPT


def test_a_second_shutdown_returns_at_once(served: Served) -> None:
    loop = Loop(served.server)
    served.exchange()
    served.server.shutdown()
    loop.thread.join(2)
    t0 = time.monotonic()
    assert _returns_within(served.server.shutdown, 2)
    assert time.monotonic() - t0 < PROMPT


@pytest.mark.parametrize("kind", ["lite", "bounded"])
def test_an_http_server_serves_again_after_a_shutdown(kind: str, tmp_path: Path) -> None:
    """As socketserver's: the stop is spent by the loop it stopped."""
    s = _make(kind, tmp_path)
    try:
        for _ in range(2):
            loop = Loop(s.server)
            s.exchange()
            s.server.shutdown()
            loop.thread.join(2)
            assert not loop.thread.is_alive()
    finally:
        s.close()


@pytest.mark.parametrize("kind", ["lite", "bounded"])
def test_server_close_before_shutdown_leaves_the_shutdown_working(kind: str, tmp_path: Path) -> None:
    s = _make(kind, tmp_path)
    loop = Loop(s.server)
    s.exchange()
    s.server.server_close()
    t0 = time.monotonic()
    assert _returns_within(s.server.shutdown, 2)
    loop.thread.join(2)
    assert not loop.thread.is_alive() and time.monotonic() - t0 < PROMPT


def test_a_failing_process_request_does_not_stop_the_accept_loop(tmp_path: Path) -> None:
    s = _make("lite", tmp_path)
    real = s.server.process_request
    calls: list[int] = []

    def once_broken(conn: socket.socket, addr: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("broken once")
        real(conn, addr)

    s.server.process_request = once_broken
    loop = Loop(s.server)
    try:
        with socket.create_connection(s.server.server_address, timeout=3) as c:
            assert c.recv(1) == b""  # closed, unanswered
        s.exchange()
        assert s.server.stats.internal_errors == 1
    finally:
        s.server.shutdown()
        loop.thread.join(2)
        s.close()


def test_idle_servers_never_wake_up(tmp_path: Path) -> None:
    """Over 1.5 s idle each serving thread sleeps through (the polling loops woke 3 times). One
    switch is tolerated (a signal delivered to that thread); the bound still fails a poller."""
    all_served = [_make(kind, tmp_path) for kind in KINDS]
    loops = [Loop(s.server) for s in all_served]
    try:
        for s in all_served:
            s.exchange()
        time.sleep(0.1)  # let the loops go back to sleep after their exchange
        before = [loop.switches() for loop in loops]
        time.sleep(1.5)
        woke = {kind: loop.switches() - b for kind, loop, b in zip(KINDS, loops, before, strict=True)}
        assert all(n <= 1 for n in woke.values()), woke
    finally:
        for s, loop in zip(all_served, loops, strict=True):
            s.server.shutdown()
            loop.thread.join(2)
            s.close()


def test_a_tftp_transfer_in_flight_outlives_the_shutdown(tmp_path: Path, tftp_native: bool) -> None:
    """Shutdown closes the request port only: a transfer goes on, on its own socket and thread."""
    data = bytes(range(256)) * 8  # 2048 bytes: 4 full blocks and an empty last one
    (tmp_path / "f.bin").write_bytes(data)
    srv = TftpServer(tmp_path, "127.0.0.1", 0, native=tftp_native)
    loop = Loop(srv)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(3)
        c.sendto(b"\x00\x01f.bin\x00octet\x00", ("127.0.0.1", srv.port))
        pkt, peer = c.recvfrom(1024)
        srv.shutdown()
        loop.thread.join(2)
        assert not loop.thread.is_alive()
        got = b""
        while True:
            op, block = struct.unpack(">HH", pkt[:4])
            assert op == 3, pkt[:40]
            got += pkt[4:]
            c.sendto(struct.pack(">HH", 4, block), peer)
            if len(pkt) - 4 < 512:
                break
            pkt = c.recv(1024)
    assert got == data
