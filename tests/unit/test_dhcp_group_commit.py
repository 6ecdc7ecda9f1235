"""The DHCP server's group commit (issue 13): the bindings of a batch of packets share one fsync
of the lease journal, and no ACK leaves before its binding is durable."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from bootstrap.server.dhcp_server import DhcpConfig, DhcpServer, Reply
from bootstrap.server.leases import LeaseDB, parse_lease_file
from bootstrap.server.metrics import Metrics
from cidboot.netboot import dhcp

SERVER = "127.0.0.1"
MACS = [f"52:54:00:00:00:{i:02x}" for i in range(1, 6)]


class Sock:
    """Records what is sent, in one event list with the fsyncs."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def getsockname(self) -> tuple[str, int]:
        return ("0.0.0.0", 67)

    def sendto(self, data: bytes, dest: tuple[str, int]) -> int:
        self.events.append(f"send {dhcp.parse(data).msg_name}")
        return len(data)


def _server(path: Path) -> DhcpServer:
    leases = LeaseDB("10.0.0.10", "10.0.0.20", path=path, new_per_second=1e9, per_mac_per_second=1e9)
    return DhcpServer(DhcpConfig("lo", SERVER, leases=leases), Metrics(), bind=False)


def _requests(srv: DhcpServer, sock: Sock) -> list[bytes]:
    """Offer each MAC an address (answered at once) and return the REQUESTs for them."""
    out = []
    for i, mac in enumerate(MACS):
        offer = srv.respond(sock, dhcp.encode_request(mac, dhcp.DISCOVER, xid=i + 1), ("0.0.0.0", 68))  # type: ignore[arg-type]
        assert offer is not None and not offer.durable
        ip = dhcp.parse(offer.packet).yiaddr
        out.append(dhcp.encode_request(mac, dhcp.REQUEST, xid=i + 1, requested_ip=ip, server_id=SERVER))
    return out


def _watch_fsync(monkeypatch: pytest.MonkeyPatch, events: list[str], fail: bool = False) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        events.append("fsync")
        if fail:
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_batch_of_bindings_shares_one_fsync_before_any_ack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "leases.json"
    srv, events = _server(path), list[str]()
    sock = Sock(events)
    srv.handle(sock, _requests(srv, sock)[0], ("0.0.0.0", 68))  # type: ignore[arg-type]  # creates the journal
    _watch_fsync(monkeypatch, events)
    events.clear()
    outbox = []
    for raw in _requests(srv, sock)[1:]:
        reply = srv.respond(sock, raw, ("0.0.0.0", 68))  # type: ignore[arg-type]
        assert reply is not None and reply.durable
        outbox.append((sock, reply))
    bound = [r for r in parse_lease_file(path.read_bytes()) if not isinstance(r, str) and r.bound]
    assert events == [] and len(bound) == 5  # written, not yet synced, nothing sent
    srv._commit_and_send(outbox)  # type: ignore[arg-type]
    assert events == ["fsync"] + ["send ACK"] * 4


def test_an_ack_whose_binding_cannot_be_synced_is_not_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    srv, events = _server(tmp_path / "leases.json"), list[str]()
    sock = Sock(events)
    srv.handle(sock, _requests(srv, sock)[0], ("0.0.0.0", 68))  # type: ignore[arg-type]
    raw = _requests(srv, sock)[1]
    offer = srv.respond(sock, dhcp.encode_request("52:54:00:00:00:99", dhcp.DISCOVER, xid=99), ("0.0.0.0", 68))  # type: ignore[arg-type]
    _watch_fsync(monkeypatch, events, fail=True)
    events.clear()
    ack = srv.respond(sock, raw, ("0.0.0.0", 68))  # type: ignore[arg-type]
    assert isinstance(ack, Reply) and isinstance(offer, Reply)
    srv._commit_and_send([(sock, ack), (sock, offer)])  # type: ignore[list-item]
    assert events == ["fsync", "send OFFER"]  # the offer needs no disk; the ACK is dropped
    assert srv.metrics.get("dhcp_errors_total", reason="lease_write") == 1 and "cannot write the lease journal" in caplog.text


def test_serve_forever_answers_queued_requests_as_one_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "leases.json"
    srv, events = _server(path), list[str]()
    requests = _requests(srv, Sock(events))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(5)
    srv.socks = [s]
    srv.destination = lambda req, addr, on_4011: addr  # type: ignore[method-assign]  # answer the test client
    srv.handle(Sock(events), requests[0], ("0.0.0.0", 68))  # type: ignore[arg-type]  # creates the journal
    _watch_fsync(monkeypatch, events)
    events.clear()
    for raw in requests[1:]:  # queued before the loop starts: one batch
        client.sendto(raw, s.getsockname())
    time.sleep(0.2)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        acks = [dhcp.parse(client.recv(4096)) for _ in requests[1:]]
    finally:
        srv.shutdown()
        t.join(3)
        client.close()
    assert [a.msg_type for a in acks] == [dhcp.ACK] * 4
    assert events == ["fsync"]  # four bindings, one fsync
    assert {lease.mac for lease in LeaseDB("10.0.0.10", "10.0.0.20", path=path).by_mac.values() if lease.bound} == set(MACS)
