"""cidboot.netboot.dhcp_client + cidboot.netboot.netif against the real boot server in a network namespace, with
and without 20 % packet loss both ways (qemu/harness/netloss.py); plus the scapy-free request encoder."""

from __future__ import annotations

import pytest

from cidboot.netboot import dhcp
from cidboot.netboot.dhcp_client import DhcpClientError, lease_from


def test_encode_request_roundtrips_through_the_strict_parser() -> None:
    raw = dhcp.encode_request("52:54:00:12:34:56", dhcp.REQUEST, xid=0xDEADBEEF, requested_ip="10.0.0.5",
                              server_id="10.0.0.1", user_class=b"cidboot-firmware", arch=dhcp.ARCH_X86_64_UEFI_BC,
                              vendor_class=b"PXEClient:Arch:00007:UNDI:003016", uuid=bytes(range(16)))
    p = dhcp.parse(raw)
    assert len(raw) >= 300 and p.op == 1 and p.xid == 0xDEADBEEF and p.flags == 0x8000
    assert p.mac == "52:54:00:12:34:56" and p.msg_type == dhcp.REQUEST
    assert p.requested_ip == "10.0.0.5" and p.server_id == "10.0.0.1"
    assert p.is_pxe and p.client_arch == 7 and not p.is_ipxe
    assert p.options[dhcp.OPT_USER_CLASS] == b"cidboot-firmware"
    assert p.client_uuid == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    with pytest.raises(dhcp.DhcpFormatError, match="not a MAC"):
        dhcp.encode_request("52:54:00", dhcp.DISCOVER, xid=1)


def test_lease_from_ack_and_proxy_only_ack_is_refused() -> None:
    req = dhcp.parse(dhcp.encode_request("52:54:00:12:34:56", dhcp.REQUEST, xid=5))
    ack = dhcp.parse(dhcp.build_reply(req, dhcp.ACK, server_ip="10.77.0.1", yiaddr="10.77.0.100", siaddr="10.77.0.1",
                                      boot_file="boot.ipxe", netmask="255.255.255.0", lease_seconds=3600, pxe=True))
    lease = lease_from(ack)
    assert (lease.ip, lease.prefixlen, lease.server_ip, lease.next_server, lease.boot_file, lease.lease_seconds) == (
        "10.77.0.100", 24, "10.77.0.1", "10.77.0.1", "boot.ipxe", 3600)
    proxy = dhcp.parse(dhcp.build_reply(req, dhcp.ACK, server_ip="10.77.0.1", siaddr="10.77.0.1", boot_file="x", pxe=True))
    with pytest.raises(DhcpClientError, match="no address"):
        lease_from(proxy)


