"""Hypothesis fuzzers for the boot server's request handlers (issue 11): DHCP `handle()` and
TFTP `handle_request()` get mutated and random packets; no exception may escape, nothing may be
counted as an unexpected exception, and a good client is still served afterwards."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootstrap.server.dhcp_server import DhcpConfig, DhcpServer
from bootstrap.server.leases import LeaseDB
from bootstrap.server.metrics import Metrics
from bootstrap.server.tftp_server import TftpServer
from cidboot.netboot import dhcp
from tests.unit.test_tftp_server import fetch

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FakeSock:
    """Stands in for the DHCP server's socket: records what would be sent."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def getsockname(self) -> tuple[str, int]:
        return ("0.0.0.0", self.port)

    def sendto(self, data: bytes, dest: tuple[str, int]) -> int:
        self.sent.append((data, dest))
        return len(data)


def _dhcp_server(proxy: bool) -> DhcpServer:
    leases = None if proxy else LeaseDB("10.0.0.1", "10.0.3.254", new_per_second=1e9, per_mac_per_second=1e9)
    return DhcpServer(DhcpConfig("lo", "10.0.0.254", leases=leases), Metrics(), bind=False)


DHCP_SERVERS = {False: _dhcp_server(False), True: _dhcp_server(True)}
GOOD_MAC = "52:54:00:00:00:01"

_option = st.tuples(st.integers(0, 255), st.binary(max_size=20)).map(lambda t: bytes([t[0], len(t[1])]) + t[1])
_ip = st.sampled_from([None, "10.0.0.254", "10.0.0.7", "0.0.0.0", "255.255.255.255"])
_seed = st.builds(
    lambda mac, t, xid, rip, sid, uc, arch, uuid, ciaddr: dhcp.encode_request(
        mac, t, xid=xid, requested_ip=rip, server_id=sid, user_class=uc, arch=arch, uuid=uuid, ciaddr=ciaddr),
    st.binary(min_size=6, max_size=6).map(lambda b: b.hex(":")), st.sampled_from([1, 3, 3, 8, 7, 2, 4, 5, 6]), st.integers(0, 2**32 - 1), _ip, _ip,
    st.sampled_from([None, b"iPXE", b"cidboot-firmware"]), st.sampled_from([None, 0, 7, 9, 11, 0xFFFF]),
    st.sampled_from([None, bytes(16)]), st.sampled_from(["0.0.0.0", "10.0.0.7"]))


def _tlvs(opts: bytes) -> list[tuple[int, int]]:
    """(code, length) of the options in a well-formed options field."""
    out, i = [], 0
    while i + 1 < len(opts) and opts[i] not in (0, 255):
        out.append((opts[i], opts[i + 1]))
        i += 2 + opts[i + 1]
    return out


@st.composite
def dhcp_packets(draw: st.DrawFn) -> bytes:
    """A valid client packet, then a few mutations: bytes flipped, options inserted or
    repeated, truncation, garbage appended; or plain random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=600))
    pkt = bytearray(draw(_seed))
    end = pkt.index(b"\xff", 240)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["repeat", "repeat", "repeat", "flip", "insert", "truncate", "append"]))
        if kind == "flip" and pkt:
            i = draw(st.integers(0, len(pkt) - 1))
            pkt[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            pkt[end:end] = draw(_option)
        elif kind == "repeat":  # a second copy of an option the packet has, same length, any value
            code, length = draw(st.sampled_from(_tlvs(bytes(pkt[240:end])) or [(12, 4)]))
            pkt[end:end] = bytes([code, length]) + draw(st.binary(min_size=length, max_size=length))
        elif kind == "truncate":
            del pkt[draw(st.integers(0, len(pkt))) :]
        else:
            pkt += draw(st.binary(max_size=40))
        end = min(end, len(pkt))
    return bytes(pkt)


def _good_client_is_served(srv: DhcpServer) -> None:
    sock = FakeSock(67)
    srv.handle(sock, dhcp.encode_request(GOOD_MAC, dhcp.DISCOVER, xid=99), ("0.0.0.0", 68))  # type: ignore[arg-type]
    assert sock.sent and dhcp.parse(sock.sent[-1][0]).msg_type == dhcp.OFFER


@FUZZ
@given(pkt=dhcp_packets(), proxy=st.booleans(), port=st.sampled_from([67, 4011]))
def test_fuzzed_dhcp_packets_never_escape_handle(pkt: bytes, proxy: bool, port: int) -> None:
    srv = DHCP_SERVERS[proxy]
    sock = FakeSock(port)
    srv.handle(sock, pkt, ("10.0.0.7", 68))  # type: ignore[arg-type]
    for reply, _ in sock.sent:
        assert dhcp.parse(reply).op == 2  # whatever we send parses with our own strict parser
    _good_client_is_served(srv)


_OPT_NAMES = st.sampled_from(["blksize", "windowsize", "timeout", "tsize", "BlkSize", "x", ""]) | st.text(max_size=8)
_OPT_VALUES = st.integers(-10, 70000).map(str) | st.sampled_from(["", "0", "255", "65535", "1e3", " 8"]) | st.text(max_size=8)


@st.composite
def tftp_packets(draw: st.DrawFn) -> bytes:
    """RRQ/WRQ with odd names, modes and options; other opcodes; random bytes; truncations."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=600))
    opcode = draw(st.sampled_from([1, 1, 1, 2, 3, 4, 5, 6, 0, 9, 0xFFFF]))
    name = draw(st.sampled_from([b"f.bin", b"gen", b"/f.bin", b"../etc/passwd", b"a/../../x", b"nope", b"", b"\xc3\xa9"])
                | st.binary(max_size=30))
    mode = draw(st.sampled_from([b"octet", b"netascii", b"OCTET", b"mail", b""]) | st.binary(max_size=8))
    body = name + b"\0" + mode + b"\0"
    for k, v in draw(st.lists(st.tuples(_OPT_NAMES, _OPT_VALUES), max_size=5)):
        body += k.encode("utf-8", "replace") + b"\0" + v.encode("utf-8", "replace") + b"\0"
    pkt = struct.pack(">H", opcode) + body
    if draw(st.booleans()):
        pkt = pkt[: draw(st.integers(0, len(pkt)))]
    return pkt


def test_fuzzed_tftp_requests_never_escape_the_handler(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "f.bin").write_bytes(b"x" * 3000)
    srv = TftpServer(tmp_path / "root", "127.0.0.1", 0, generator=lambda n, p: b"generated" if n == "gen" else None)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.3", 0))
    peer = closed.getsockname()
    closed.close()  # transfers to it end at once (port unreachable)

    @FUZZ
    @given(pkt=tftp_packets())
    def one(pkt: bytes) -> None:
        srv.handle_request(pkt, peer)

    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        one()
        deadline = time.monotonic() + 30
        while srv.active and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.active == 0  # every transfer ended and gave its slot back
        assert not [k for k in srv.metrics._c if k[0] == "request_exceptions_total"]  # none in transfer threads either
        assert fetch(srv, "f.bin")[0] == b"x" * 3000  # a good client is still served
    finally:
        srv.shutdown()
        t.join(2)
