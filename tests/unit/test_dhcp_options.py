"""DHCP/PXE option parsing: good packets from every client kind, and precise refusals."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from bootstrap.server.devices import Devices, DevicesFileError
from bootstrap.server.leases import LeaseDB, LeaseError
from cidboot.netboot import dhcp
from cidboot.netboot.dhcp import DhcpFormatError

MAC = "52:54:00:12:34:56"
GOOD = dhcp.build_request(MAC, dhcp.DISCOVER, xid=42, arch=dhcp.ARCH_X86_64_UEFI)
BASE = GOOD[:240]


def test_pxe_and_ipxe_detection() -> None:
    p = dhcp.parse(GOOD)
    assert (p.mac, p.xid, p.msg_name, p.is_pxe, p.is_ipxe, p.client_arch) == (MAC, 42, "DISCOVER", True, False, 9)
    q = dhcp.parse(dhcp.build_request(MAC, dhcp.REQUEST, xid=1, user_class=b"iPXE", requested_ip="10.0.0.5"))
    assert q.is_ipxe and q.requested_ip == "10.0.0.5"


def test_uuid_option() -> None:
    uuid = bytes(range(16))
    p = dhcp.parse(BASE + b"\x35\x01\x01\x61\x11\x00" + uuid + b"\xff")
    assert p.client_uuid == "00010203-0405-0607-0809-0a0b0c0d0e0f"


def test_reply_round_trip() -> None:
    req = dhcp.parse(GOOD)
    r = dhcp.parse(dhcp.build_reply(req, dhcp.OFFER, server_ip="10.0.0.1", yiaddr="10.0.0.9", siaddr="10.0.0.1",
                                    boot_file="ipxe.efi", netmask="255.255.255.0", lease_seconds=60, pxe=True))
    assert (r.op, r.yiaddr, r.siaddr, r.file, r.vendor_class, r.xid) == (2, "10.0.0.9", "10.0.0.1", b"ipxe.efi", "PXEClient", 42)


@pytest.mark.parametrize(
    "raw, why",
    [
        (GOOD[:200], "truncated"),
        (b"\x05" + GOOD[1:], "op 5"),
        (GOOD[:1] + b"\x06" + GOOD[2:], "only Ethernet"),
        (GOOD[:236] + b"XXXX" + GOOD[240:], "magic cookie"),
        (BASE + b"\x35\x01\x01\x5d\x03\x00\x00\x00\xff", "option 93"),
        (BASE + b"\x35\x02\x01\x01\xff", "option 53 must be 1 bytes"),
        (BASE + b"\x35\x01\x09\xff", "unknown message type 9"),
        (BASE + b"\x35\x01\x01\x3c\x50abc", "runs past the end"),
        (BASE + b"\x35\x01\x01\x3c", "before its length"),
        (BASE + b"\x35\x01\x01" + b"\x0c\x01x" * 200 + b"\xff", "more than 96"),
        (BASE + b"\x35\x01\x01", "not terminated"),
        (BASE + b"\x3c\x04PXEC\xff", "no option 53"),
        (BASE + b"\x35\x01\x01\x61\x11\x01" + bytes(16) + b"\xff", "UUID type"),
        (BASE + b"\x35\x01\x01\x34\x01\x03\xff", "overload"),
        (BASE + b"\x35\x01\x01\x32\x03\x0a\x00\x00\xff", "option 50 must be 4"),
    ],
)
def test_malformed_packets(raw: bytes, why: str) -> None:
    with pytest.raises(DhcpFormatError, match=why):
        dhcp.parse(raw)


def test_repeated_option_concatenates() -> None:
    p = dhcp.parse(BASE + b"\x35\x01\x01\x3c\x03PXE\x3c\x06Client\xff")
    assert p.vendor_class == "PXEClient"


def test_lease_pool_is_bounded_and_rate_limited() -> None:
    db = LeaseDB("10.0.0.10", "10.0.0.14", new_per_second=1000, per_mac_per_second=2)
    ips = [db.offer(f"02:00:00:00:00:{i:02x}") for i in range(10)]
    assert ips[:5] == [f"10.0.0.{i}" for i in range(10, 15)] and ips[5:] == [None] * 5
    assert db.offer("02:00:00:00:00:00") == "10.0.0.10"  # a known client keeps its address
    assert [db.allow("aa") for _ in range(6)].count(False) >= 1
    slow = LeaseDB("10.0.1.1", "10.0.1.100", new_per_second=3)
    assert sum(slow.offer(f"02:00:00:00:01:{i:02x}") is not None for i in range(20)) <= 4


def test_lease_persistence(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "leases.json"
    db = LeaseDB("10.0.0.10", "10.0.0.20", path=path)
    ip = db.offer(MAC)
    assert ip and db.bind(MAC, ip)
    assert LeaseDB("10.0.0.10", "10.0.0.20", path=path).by_mac[MAC].ip == ip


def test_devices_policy(tmp_path: object) -> None:
    from pathlib import Path

    p = Path(str(tmp_path)) / "devices.yaml"
    p.write_text("deny_unknown: true\ndevices:\n  - {mac: '52:54:00:12:34:56', role: worker}\n  - {uuid: 'ABC', allow: false}\n")
    d = Devices.load(p)
    assert d.lookup(MAC, None).role == "worker" and d.lookup(MAC.upper(), None).allow
    assert not d.lookup("02:00:00:00:00:01", None).allow
    assert not d.lookup("02:00:00:00:00:02", "abc").allow
    p.write_text("devices:\n  - {role: x}\n")
    with pytest.raises(DevicesFileError, match="needs a mac or a uuid"):
        Devices.load(p)


def test_arch_field_layout() -> None:
    raw = dhcp.build_request(MAC, dhcp.DISCOVER, xid=1, arch=dhcp.ARCH_ARM64_UEFI)
    i = raw.index(b"\x5d\x02")
    assert struct.unpack(">H", raw[i + 2 : i + 4])[0] == 11


def test_reserved_address_goes_to_its_mac_only(tmp_path: Path) -> None:
    p = tmp_path / "devices.yaml"
    p.write_text('devices:\n  - {mac: "52:54:00:00:00:aa", role: sensor, ip: 10.0.0.12}\n'
                 '  - {mac: "52:54:00:00:00:bb", role: aggregator}\n')
    devices = Devices.load(p)
    assert devices.lookup("52:54:00:00:00:AA", None).ip == "10.0.0.12"
    db = LeaseDB("10.0.0.10", "10.0.0.14", reservations=devices.reservations())
    others = [db.offer(f"52:54:00:00:01:{i:02x}") for i in range(5)]
    assert "10.0.0.12" not in others and None in others  # the pool minus the reservation
    assert db.offer("52:54:00:00:00:aa") == "10.0.0.12"
    assert db.bind("52:54:00:00:00:aa", "10.0.0.12")
    p.write_text('devices:\n  - {uuid: "4c4c4544-0000-1000-8000-000000000001", ip: 10.0.0.12}\n')
    with pytest.raises(DevicesFileError, match="a fixed ip needs a mac"):
        Devices.load(p)
    with pytest.raises(LeaseError, match="not-an-ip"):
        LeaseDB("10.0.0.10", "10.0.0.14", reservations={"52:54:00:00:00:aa": "not-an-ip"})


def test_boot_config_names_the_peers_with_fixed_addresses(tmp_path: Path) -> None:
    from bootstrap.server.serve import BootServer
    from cidboot.ipld.cid import CID
    from cidboot.netboot.bootconfig import BootConfig

    p = tmp_path / "devices.yaml"
    p.write_text('devices:\n  - {mac: "52:54:00:00:00:aa", role: sensor, ip: 10.0.0.12}\n'
                 '  - {mac: "52:54:00:00:00:bb", role: aggregator, ip: 10.0.0.13}\n'
                 '  - {mac: "52:54:00:00:00:cc", role: aggregator}\n')
    server = BootServer.__new__(BootServer)  # only the boot-config generator, no sockets
    server.devices = Devices.load(p)

    class Cfg:
        agent_port = 8000
    server.cfg = Cfg()  # type: ignore[assignment]
    assert server.peers("52:54:00:00:00:aa") == {"aggregator": ("http://10.0.0.13:8000",)}
    assert server.peers("52:54:00:00:00:cc") == {"aggregator": ("http://10.0.0.13:8000",),
                                                 "sensor": ("http://10.0.0.12:8000",)}
    cid = CID.parse("bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy")
    raw = BootConfig(cid, ("http://10.0.0.1:8080",), peers=server.peers("52:54:00:00:00:aa")).encode()
    assert BootConfig.decode(raw).peers == {"aggregator": ("http://10.0.0.13:8000",)}


def _scapy_reply(req: dhcp.DhcpPacket, msg_type: int, **kw: object) -> bytes:
    """The same reply built by scapy's BOOTP/DHCP layers: an independent encoder to compare ours with."""
    from scapy.layers.dhcp import BOOTP, DHCP

    opts: list[object] = [("message-type", msg_type), ("server_id", kw["server_ip"])]
    if kw.get("lease_seconds") is not None:
        opts.append(("lease_time", kw["lease_seconds"]))
    if kw.get("netmask"):
        opts.append(("subnet_mask", kw["netmask"]))
    if kw.get("pxe"):
        opts.append(("vendor_class_id", b"PXEClient"))
        if dhcp.OPT_CLIENT_UUID in req.options:
            opts.append((dhcp.OPT_CLIENT_UUID, req.options[dhcp.OPT_CLIENT_UUID]))
    if kw.get("boot_file"):
        opts.append(("boot-file-name", str(kw["boot_file"]).encode()))
    opts.append("end")
    pkt = BOOTP(op=2, xid=req.xid, flags=req.flags, ciaddr=req.ciaddr if msg_type == dhcp.ACK else "0.0.0.0",
                yiaddr=kw.get("yiaddr", "0.0.0.0"), siaddr=kw.get("siaddr") or "0.0.0.0", giaddr=req.giaddr,
                chaddr=bytes.fromhex(req.mac.replace(":", "")) + b"\0" * 10,
                file=str(kw.get("boot_file", "")).encode()) / DHCP(options=opts)
    return bytes(pkt)


@pytest.mark.parametrize("msg_type, kw", [
    (dhcp.OFFER, {"yiaddr": "10.0.0.9", "siaddr": "10.0.0.1", "boot_file": "ipxe.efi", "netmask": "255.255.255.0",
                  "lease_seconds": 60, "pxe": True}),
    (dhcp.ACK, {"yiaddr": "10.0.0.9", "siaddr": "10.0.0.1", "boot_file": "boot.ipxe", "lease_seconds": 3600}),
    (dhcp.ACK, {"siaddr": "10.0.0.1", "boot_file": "x", "pxe": True}),
    (dhcp.NAK, {}),
])
def test_our_reply_encoder_agrees_with_scapys(msg_type: int, kw: dict[str, object]) -> None:
    uuid = bytes(range(16))
    req = dhcp.parse(dhcp.encode_request("52:54:00:12:34:56", dhcp.REQUEST, xid=77, uuid=uuid, ciaddr="10.0.0.9"))
    ours = dhcp.parse(dhcp.build_reply(req, msg_type, server_ip="10.0.0.1", **kw))  # type: ignore[arg-type]
    theirs = dhcp.parse(_scapy_reply(req, msg_type, server_ip="10.0.0.1", **kw))
    assert ours == theirs


def test_reply_echoes_the_relay_agents_option_82_and_giaddr() -> None:
    raw = bytearray(dhcp.encode_request("52:54:00:12:34:56", dhcp.DISCOVER, xid=5))
    raw[24:28] = bytes([10, 88, 0, 1])  # giaddr: a relay on another subnet
    end = raw.index(b"\xff", 240)
    agent_info = b"\x01\x04eth1\x02\x03abc"  # circuit id, remote id (RFC 3046)
    raw[end:end + 1] = bytes([82, len(agent_info)]) + agent_info + b"\xff"
    req = dhcp.parse(bytes(raw))
    r = dhcp.parse(dhcp.build_reply(req, dhcp.OFFER, server_ip="10.0.0.1", yiaddr="10.88.0.50"))
    assert r.giaddr == "10.88.0.1" and r.options[82] == agent_info


def test_reply_with_a_boot_file_too_long_for_bootp_is_refused() -> None:
    req = dhcp.parse(GOOD)
    with pytest.raises(dhcp.DhcpFormatError, match="does not fit the BOOTP file field"):
        dhcp.build_reply(req, dhcp.OFFER, server_ip="10.0.0.1", boot_file="x" * 200)
