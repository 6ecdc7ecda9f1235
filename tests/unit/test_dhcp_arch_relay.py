"""The boot server's DHCP side without sockets: which boot file each client architecture gets
(RFC 4578), HTTP Boot replies, relayed (giaddr) and unicast (ciaddr) replies, lease pools by relay
subnet, and the bootstrap's boot-config discovery (a UKI has no cidboot.config= on its cmdline)."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path
from typing import Any

import pytest

from bootstrap.server.dhcp_server import DEFAULT_BOOT_FILES, DhcpConfig, DhcpServer, Pool
from bootstrap.server.leases import LeaseDB
from bootstrap.server.metrics import Metrics
from bootstrap.stage.main import dhcp_config_url, fetch_bootconfig
from cidboot.netboot import dhcp

MAC = "52:54:00:ab:cd:01"
HTTP_URL = "http://10.77.0.1:8080"
ALL_BUT_ARM64 = {a: n for a, n in DEFAULT_BOOT_FILES.items() if "arm64" not in n}


class FakeSock:
    def __init__(self, port: int = 67) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.port = port

    def getsockname(self) -> tuple[str, int]:
        return ("0.0.0.0", self.port)

    def sendto(self, data: bytes, dest: tuple[str, int]) -> int:
        self.sent.append((data, dest))
        return len(data)


def _server(*, proxy: bool = False, relay: bool = False) -> DhcpServer:
    leases = None if proxy else LeaseDB("10.77.0.100", "10.77.0.199")
    pools = [Pool(ipaddress.IPv4Network("10.88.0.0/24"), LeaseDB("10.88.0.100", "10.88.0.149"))] if relay else []
    return DhcpServer(DhcpConfig("br0", "10.77.0.1", leases=leases, boot_files=dict(ALL_BUT_ARM64),
                                 http_url=HTTP_URL, relay_pools=pools), Metrics(), bind=False)


def _ask(srv: DhcpServer, raw: bytes, src: tuple[str, int] = ("0.0.0.0", 68)) -> tuple[dhcp.DhcpPacket, tuple[str, int]] | None:
    sock = FakeSock()
    srv.handle(sock, raw, src)  # type: ignore[arg-type]
    if not sock.sent:
        return None
    data, dest = sock.sent[0]
    return dhcp.parse(data), dest


def _discover(arch: int | None, *, vendor: bytes | None = None, giaddr: str | None = None, **kw: Any) -> bytes:
    if vendor is None:
        vendor = f"{'HTTPClient' if arch in (16, 19) else 'PXEClient'}:Arch:{arch or 0:05d}:UNDI:003001".encode()
    raw = dhcp.encode_request(MAC, dhcp.DISCOVER, xid=5, arch=arch, vendor_class=vendor, **kw)
    if giaddr:
        raw = raw[:24] + ipaddress.IPv4Address(giaddr).packed + raw[28:]
    return raw


@pytest.mark.parametrize(("arch", "want"), [(0, "undionly.kpxe"), (7, "bootstrap-x86_64.efi"), (9, "bootstrap-x86_64.efi"),
                                            (16, f"{HTTP_URL}/boot/bootstrap-x86_64.efi")])
def test_each_client_architecture_gets_its_boot_file(arch: int, want: str) -> None:
    got = _ask(_server(), _discover(arch))
    assert got is not None
    rep, dest = got
    assert (rep.msg_type, rep.file.decode(), dest) == (dhcp.OFFER, want, ("255.255.255.255", 68))
    assert rep.vendor_class == ("HTTPClient" if arch == 16 else "PXEClient")  # HTTP Boot needs option 60 HTTPClient


@pytest.mark.parametrize("arch", [11, 19, 0x1234])
def test_architecture_without_a_boot_file_gets_no_offer_and_a_log_line(arch: int, caplog: pytest.LogCaptureFixture) -> None:
    srv = _server()
    assert _ask(srv, _discover(arch)) is None
    assert f"client architecture {arch:#x}" in caplog.text
    if arch in (11, 19):
        assert "this server does not offer arm64: `bootstrap serve --arch arm64`" in caplog.text
    assert srv.metrics.get("dhcp_errors_total", reason="no_boot_file") == 1


def test_proxy_dhcp_answers_http_boot_clients_with_the_url() -> None:
    got = _ask(_server(proxy=True), _discover(16))
    assert got is not None and got[0].file.decode() == f"{HTTP_URL}/boot/bootstrap-x86_64.efi"
    assert got[0].yiaddr == "0.0.0.0" and got[0].vendor_class == "HTTPClient"


def test_relayed_discover_is_answered_to_the_relay_from_its_subnets_pool() -> None:
    srv = _server(relay=True)
    raw = _discover(7, giaddr="10.88.0.1") + b""
    raw = raw[:240] + bytes([82, 6, 1, 4, 0, 0, 0, 7]) + raw[240:]  # option 82 first: the relay adds it
    got = _ask(srv, raw, ("10.77.0.254", 67))
    assert got is not None
    rep, dest = got
    assert dest == ("10.88.0.1", 67)  # RFC 2131 4.1: to the relay's server port
    assert ipaddress.IPv4Address(rep.yiaddr) in ipaddress.IPv4Network("10.88.0.0/24")
    assert rep.options[dhcp.OPT_ROUTER] == ipaddress.IPv4Address("10.88.0.1").packed  # the way back to us
    assert rep.options[dhcp.OPT_SUBNET_MASK] == bytes([255, 255, 255, 0])
    assert rep.options[82] == bytes([1, 4, 0, 0, 0, 7])  # echoed


def test_relayed_request_from_a_subnet_without_a_range_is_not_answered(caplog: pytest.LogCaptureFixture) -> None:
    assert _ask(_server(relay=True), _discover(7, giaddr="10.99.0.1"), ("10.77.0.254", 67)) is None
    assert "no --dhcp-range for relay 10.99.0.1" in caplog.text


def test_client_with_an_address_is_answered_unicast() -> None:
    srv = _server()
    offer = _ask(srv, _discover(7))
    assert offer is not None
    ip = offer[0].yiaddr
    raw = dhcp.encode_request(MAC, dhcp.REQUEST, xid=6, arch=7, requested_ip=ip, ciaddr=ip, broadcast=False)
    got = _ask(srv, raw, (ip, 68))
    assert got is not None and got[1] == (ip, 68) and got[0].msg_type == dhcp.ACK


def test_bootstrap_user_class_gets_its_boot_config_path() -> None:
    raw = dhcp.encode_request(MAC, dhcp.DISCOVER, xid=9, vendor_class=None, arch=None, user_class=b"cidboot-bootstrap")
    got = _ask(_server(), raw)
    assert got is not None and got[0].file.decode() == "bootconfig/52-54-00-ab-cd-01.json"
    assert got[0].siaddr == "10.77.0.1"


def test_uki_bootstrap_finds_its_boot_config_from_the_dhcp_reply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert dhcp_config_url("10.77.0.1", "bootconfig/52-54-00-ab-cd-01.json", MAC) == \
        "tftp://10.77.0.1/bootconfig/52-54-00-ab-cd-01.json"
    # another server's boot file (not a boot config): the well-known path on siaddr
    assert dhcp_config_url("10.77.0.1", "pxelinux.0", MAC) == "tftp://10.77.0.1/bootconfig/52-54-00-ab-cd-01.json"
    assert dhcp_config_url("10.77.0.1", "bootconfig/../../etc/x.json", MAC) == \
        "tftp://10.77.0.1/bootconfig/52-54-00-ab-cd-01.json"
    assert dhcp_config_url("0.0.0.0", "", MAC) is None
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 quiet panic=-1\n")  # a UKI's fixed command line
    import cidboot.netboot.tftp_client as tc

    asked: list[str] = []

    def fake_get(url: str, max_size: int) -> bytes:
        asked.append(url)
        return b"{}"

    monkeypatch.setattr(tc, "get_url", fake_get)
    fetch_bootconfig(cmdline, "tftp://10.77.0.1/bootconfig/52-54-00-ab-cd-01.json")
    cmdline.write_text("console=ttyS0 cidboot.config=tftp://10.0.0.9/bootconfig/x.json\n")  # iPXE's: it wins
    fetch_bootconfig(cmdline, "tftp://10.77.0.1/bootconfig/52-54-00-ab-cd-01.json")
    assert asked == ["tftp://10.77.0.1/bootconfig/52-54-00-ab-cd-01.json", "tftp://10.0.0.9/bootconfig/x.json"]


def test_relay_option_82_survives_a_reply_with_http_vendor_class() -> None:
    req = dhcp.parse(_discover(16)[:240] + bytes([82, 3, 1, 1, 9]) + _discover(16)[240:])
    rep = dhcp.parse(dhcp.build_reply(req, dhcp.OFFER, server_ip="10.77.0.1", boot_file="http://x/y", pxe=True,
                                      vendor_class=b"HTTPClient"))
    assert rep.options[82] == bytes([1, 1, 9]) and rep.vendor_class == "HTTPClient"
    assert struct.unpack(">H", req.options[dhcp.OPT_CLIENT_ARCH])[0] == 16


def test_uefi_pxe_binl_request_on_port_4011_is_answered_in_full_dhcp_mode() -> None:
    """edk2's PXE takes a full offer with PXEClient + boot file as a "BINL" offer and asks again on
    port 4011; unanswered, OVMF says "PXE-E16: No valid offer received" (seen under OVMF)."""
    srv = _server()
    raw = dhcp.encode_request(MAC, dhcp.REQUEST, xid=11, arch=7, ciaddr="10.77.0.105", broadcast=False,
                              vendor_class=b"PXEClient:Arch:00007:UNDI:003000")
    sock = FakeSock(port=4011)
    srv.handle(sock, raw, ("10.77.0.105", 4011))  # type: ignore[arg-type]
    [(data, dest)] = sock.sent
    rep = dhcp.parse(data)
    assert (rep.msg_type, rep.yiaddr, rep.siaddr, rep.file.decode(), rep.vendor_class) == (
        dhcp.ACK, "0.0.0.0", "10.77.0.1", "bootstrap-x86_64.efi", "PXEClient")
    assert dest == ("10.77.0.105", 4011)
    assert srv.active_leases() == 0  # boot information only: no lease bound on 4011
