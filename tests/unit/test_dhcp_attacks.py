"""Attacks on the DHCP server (issue 11 #5): one packet must never stop DHCP.

In-process on loopback: the server runs its real `serve_forever` loop on a 127.0.0.1 socket
(no interface binding), in proxy mode so that a unicast REQUEST gets a unicast ACK back.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from bootstrap.server.dhcp_server import DhcpConfig, DhcpServer, Reply
from bootstrap.server.metrics import Metrics
from cidboot.netboot import dhcp
from cidboot.netboot.dhcp import DhcpFormatError

MAC = "52:54:00:12:34:56"
BASE = dhcp.build_request(MAC, dhcp.REQUEST, xid=7)[:240]


def _repeated(code: int, first: bytes, second: bytes, msg_type: int = dhcp.REQUEST) -> bytes:
    return (BASE + bytes([53, 1, msg_type, code, len(first)]) + first + bytes([code, len(second)]) + second
            + b"\x3c\x09PXEClient\xff")


@pytest.fixture()
def server() -> Iterator[tuple[DhcpServer, socket.socket]]:
    srv = DhcpServer(DhcpConfig("lo", "127.0.0.1"), Metrics(), bind=False)  # proxy mode: no lease pool
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    srv.socks = [s]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(3)
    client.bind(("127.0.0.1", 0))
    client.connect(s.getsockname())
    yield srv, client
    srv.shutdown()
    t.join(2)
    client.close()


def _good_request(xid: int) -> bytes:
    return dhcp.encode_request(MAC, dhcp.REQUEST, xid=xid, ciaddr="127.0.0.1", broadcast=False)


def _served(client: socket.socket, xid: int) -> dhcp.DhcpPacket:
    client.send(_good_request(xid))
    reply = dhcp.parse(client.recv(4096))
    assert (reply.xid, reply.msg_type) == (xid, dhcp.ACK)
    return reply


@pytest.mark.parametrize("code", [dhcp.OPT_SERVER_ID, dhcp.OPT_REQUESTED_IP])
def test_repeated_option_54_or_50_is_refused_precisely(code: int) -> None:
    with pytest.raises(DhcpFormatError, match=f"option {code} repeated"):
        dhcp.parse(_repeated(code, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])))
    with pytest.raises(DhcpFormatError, match=f"option {code} must be 4 bytes"):  # split 2+2: still one option
        dhcp.parse(BASE + bytes([53, 1, 3, code, 2, 10, 0]) + b"\xff")


def test_repeated_server_id_option_does_not_stop_dhcp(server: tuple[DhcpServer, socket.socket]) -> None:
    srv, client = server
    _served(client, 1)
    client.send(_repeated(dhcp.OPT_SERVER_ID, bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1])))
    client.send(_repeated(dhcp.OPT_REQUESTED_IP, bytes([127, 0, 0, 9]), bytes([127, 0, 0, 9])))
    _served(client, 2)  # the DHCP thread is still alive
    assert srv.metrics.get("dhcp_errors_total", reason="malformed") == 2


def test_exception_in_one_dhcp_request_is_logged_counted_and_survived(server: tuple[DhcpServer, socket.socket],
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    srv, client = server
    real, calls = srv.respond, []

    def flaky(sock: socket.socket, data: bytes, addr: tuple[str, int]) -> Reply | None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug we have not found yet")
        return real(sock, data, addr)

    srv.respond = flaky  # type: ignore[method-assign]
    client.send(_good_request(3))
    _served(client, 4)
    assert srv.metrics.get("request_exceptions_total", server="dhcp", exception="RuntimeError") == 1
    assert 'cidboot_request_exceptions_total{exception="RuntimeError",server="dhcp"} 1' in srv.metrics.render()
    rec = next(r for r in caplog.records if r.name == "bootstrap.dhcp" and r.levelname == "ERROR")
    assert rec.__dict__["exception"] == "RuntimeError" and rec.__dict__["peer"] == "127.0.0.1" and rec.exc_info
