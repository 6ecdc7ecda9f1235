"""cidboot.netboot.dhcp_client + cidboot.netboot.netif against the real boot server in a network namespace, with
and without 20 % packet loss both ways (qemu/harness/netloss.py); plus the scapy-free request encoder."""

from __future__ import annotations

import pytest

from cidboot.netboot import dhcp
from cidboot.netboot.dhcp_client import DhcpClientError, Lease, lease_from


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




# -- one lease per power-on: the previous stage's lease after a same-kernel hand-over ------------

BOOT = "6f1c0f4e-0000-4000-8000-000000000001"
MAC = "52:54:00:12:34:56"


def _lease(obtained: float = 100.0) -> Lease:
    return Lease("10.77.0.100", 24, "255.255.255.0", "10.77.0.1", "10.77.0.1", "boot.ipxe", "10.77.0.1", 3600,
                 {}, obtained)


def _record(monkeypatch: pytest.MonkeyPatch, **changes: object) -> dict[str, object]:
    """What the firmware writes to boot.json, through the hand-off's canonical JSON and back."""
    import json

    from cidboot.netboot import dhcp_client
    from cidboot.stage.handoff import canonical_json

    monkeypatch.setattr(dhcp_client, "boot_id", lambda path=dhcp_client.BOOT_ID: BOOT)
    rec = json.loads(canonical_json({"lease": dhcp_client.handoff_record(_lease(), "eth0", MAC.upper())}))["lease"]
    rec.update(changes)
    return rec


def _facts(**over: object) -> dict[str, object]:
    facts: dict[str, object] = {"this_boot": BOOT, "now": 130.0, "interfaces": lambda: [("eth0", MAC)],
                                "address_of": lambda name: ("10.77.0.100", 24), "carrier": lambda name: True}
    facts.update(over)
    return facts


def test_a_lease_from_this_kernel_with_its_address_still_configured_is_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    from cidboot.netboot.dhcp_client import reusable

    ifname, mac, lease = reusable(_record(monkeypatch), **_facts())  # type: ignore[arg-type]
    assert (ifname, mac) == ("eth0", MAC) and lease == _lease()
    assert lease.obtained == 100.0  # the original time: the bootstrap passes on the firmware's lease unchanged


@pytest.mark.parametrize(("changes", "facts", "why"), [
    ({}, {"this_boot": "another-boot"}, "another kernel boot"),  # kexec: a new kernel, a new boot id
    ({"boot_id": None}, {}, "boot_id is None"),
    ({}, {"now": 100.0 + 1800}, "past T1"),  # half the lease gone: a client renews then
    ({}, {"now": 50.0}, "not from this clock"),  # obtained "in the future"
    ({}, {"interfaces": lambda: [("eth1", MAC)]}, "no interface eth0"),
    ({}, {"interfaces": lambda: [("eth0", "52:54:00:00:00:01")]}, "with MAC"),
    ({}, {"carrier": lambda name: False}, "no carrier"),
    ({}, {"address_of": lambda name: None}, "holds no address"),  # after kexec the NIC is unconfigured
    ({}, {"address_of": lambda name: ("10.77.0.101", 24)}, "holds 10.77.0.101/24"),
    ({}, {"address_of": lambda name: ("10.77.0.100", 16)}, "holds 10.77.0.100/16"),
    ({"lease_seconds": None}, {}, "lease_seconds is None"),  # no lease time: nothing to check it against
    ({"prefixlen": True}, {}, "prefixlen is True"),
    ({"ip": "10.77.0.300"}, {}, "not an IPv4 lease"),
    ({"prefixlen": 33}, {}, "not an IPv4 lease"),
    ({"obtained": "100"}, {}, "obtained is '100'"),
])
def test_a_lease_that_does_not_match_this_kernel_is_not_reused(monkeypatch: pytest.MonkeyPatch, changes: dict[str, object],
                                                               facts: dict[str, object], why: str) -> None:
    from cidboot.netboot.dhcp_client import LeaseNotReusable, reusable

    with pytest.raises(LeaseNotReusable, match=why):
        reusable(_record(monkeypatch, **changes), **_facts(**facts))  # type: ignore[arg-type]


def test_no_boot_id_no_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without /proc's boot id this stage cannot tell it runs in the same kernel: it asks again."""
    from cidboot.netboot import dhcp_client

    rec = _record(monkeypatch)
    monkeypatch.setattr(dhcp_client, "boot_id", lambda path=dhcp_client.BOOT_ID: None)
    facts = _facts()
    del facts["this_boot"]
    with pytest.raises(dhcp_client.LeaseNotReusable, match="another kernel boot"):
        dhcp_client.reusable(rec, **facts)  # type: ignore[arg-type]


@pytest.mark.parametrize("record", [None, [], "lease"])
def test_no_or_a_malformed_lease_record_is_not_reused(record: object) -> None:
    from cidboot.netboot.dhcp_client import LeaseNotReusable, reusable

    with pytest.raises(LeaseNotReusable):
        reusable(record, **_facts())  # type: ignore[arg-type]


def test_network_up_reuses_or_asks_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a reusable lease: no DHCP, the default route re-added; with one from another kernel
    boot (after kexec): NIC up, DHCP, address configured, as before."""
    from cidboot.netboot import dhcp_client, netif

    calls: list[str] = []
    monkeypatch.setattr(netif, "ethernet_interfaces", lambda sys_net=None: [("eth0", MAC)])
    monkeypatch.setattr(netif, "has_carrier", lambda name, sys_net=None: True)
    monkeypatch.setattr(netif, "address", lambda name: ("10.77.0.100", 24))
    monkeypatch.setattr(netif, "add_default_route", lambda name, router: calls.append(f"route {router}"))

    def bring_up(**kw: object) -> tuple[str, str]:
        calls.append("bring_up")
        return "eth0", MAC

    def acquire(*a: object, **kw: object) -> Lease:
        calls.append(f"dhcp {kw['user_class']!r}")
        return _lease(200.0)

    monkeypatch.setattr(netif, "bring_up", bring_up)
    monkeypatch.setattr(netif, "configure", lambda name, ip, plen, router=None: calls.append(f"configure {ip}"))
    monkeypatch.setattr(dhcp_client, "acquire", acquire)
    monkeypatch.setattr(dhcp_client, "boot_clock", lambda: 130.0)
    rec = _record(monkeypatch)
    logs: list[str] = []
    name, mac, lease = dhcp_client.network_up(user_class=b"cidboot-agent", handed=rec, log=logs.append)
    assert (name, lease.ip, calls) == ("eth0", "10.77.0.100", ["route 10.77.0.1"])
    assert "previous stage's lease" in logs[-1] and "3570 s left" in logs[-1]
    calls.clear()
    monkeypatch.setattr(dhcp_client, "boot_id", lambda path=dhcp_client.BOOT_ID: "after-kexec")
    name, mac, lease = dhcp_client.network_up(user_class=b"cidboot-agent", handed=rec, log=logs.append)
    assert calls == ["bring_up", "dhcp b'cidboot-agent'", "configure 10.77.0.100"] and lease.obtained == 200.0
    assert "not reusing the previous stage's lease: obtained in another kernel boot" in logs[-1]
    calls.clear()
    dhcp_client.network_up(user_class=b"cidboot-bootstrap", handed=None, log=logs.append)  # no hand-off: DHCP
    assert calls[:2] == ["bring_up", "dhcp b'cidboot-bootstrap'"]


def test_netif_reads_an_interface_address() -> None:
    """The real ioctls on loopback (no root needed): how the next stage sees what the kernel kept."""
    from cidboot.netboot import netif

    assert netif.address("lo") == ("127.0.0.1", 8)
    with pytest.raises(netif.NoInterface):
        netif.address("nonexistent0")


def test_lease_records_when_it_was_obtained() -> None:
    from cidboot.netboot import dhcp_client

    req = dhcp.parse(dhcp.encode_request(MAC, dhcp.REQUEST, xid=5))
    ack = dhcp.parse(dhcp.build_reply(req, dhcp.ACK, server_ip="10.77.0.1", yiaddr="10.77.0.100", siaddr="10.77.0.1",
                                      boot_file="boot.ipxe", netmask="255.255.255.0", lease_seconds=3600, pxe=True))
    before = dhcp_client.boot_clock()
    assert before <= lease_from(ack).obtained <= dhcp_client.boot_clock()
    assert dhcp_client.boot_id() == open(dhcp_client.BOOT_ID).read().strip()
