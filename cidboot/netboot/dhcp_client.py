"""A small DHCP client for the boot stages: DISCOVER -> OFFER -> REQUEST -> ACK with PXE options.

No scapy (its import alone takes seconds under TCG): requests are encoded by
`cidboot.netboot.dhcp.encode_request`, replies parsed strictly by `cidboot.netboot.dhcp.parse`. A UDP socket
bound to 0.0.0.0:68 on the interface (SO_BINDTODEVICE + SO_BROADCAST) is enough on Linux: the
kernel sends from 0.0.0.0 and delivers the server's broadcast replies before the interface has
an address (checked in tests/integration/test_dhcp_client_integration.py against the real boot server).

Every exchange is retransmitted with exponential backoff (RFC 2131 4.1: 4 s doubling to 64 s is
for real networks; boot networks want faster first retries, so `timeout` doubles from 1 s up to
`max_timeout`) and a lost REQUEST/ACK restarts from DISCOVER, so a lease survives heavy packet
loss (20 % netem in the tests).

    lease = acquire("eth0", "52:54:00:12:34:56", user_class=b"cidboot-firmware")
    cidboot.netboot.netif.configure("eth0", lease.ip, lease.prefixlen, router=lease.router)
"""

from __future__ import annotations

import ipaddress
import os
import random
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cidboot.errors import CidbootError, FormatError
from cidboot.netboot import dhcp

PXE_VENDOR_CLASS = b"PXEClient:Arch:00007:UNDI:003016"  # as an x86_64 UEFI PXE ROM sends it
CLIENT_PORT, SERVER_PORT = 68, 67


class DhcpClientError(CidbootError):
    """No usable lease (no answer after every retry, NAK, or an unusable offer)."""


@dataclass(frozen=True)
class Lease:
    """What the ACK gave us. `next_server` is siaddr (or option 66), where TFTP goes;
    `server_ip` is the DHCP server's identifier (option 54)."""

    ip: str
    prefixlen: int
    netmask: str
    server_ip: str
    next_server: str
    boot_file: str
    router: str | None = None
    lease_seconds: int | None = None
    options: dict[int, bytes] = field(default_factory=dict, repr=False, compare=False)


def open_socket(ifname: str) -> socket.socket:
    """UDP 0.0.0.0:68 bound to `ifname`, allowed to broadcast."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        s.bind(("0.0.0.0", CLIENT_PORT))
    except OSError as e:
        s.close()
        raise DhcpClientError(f"cannot open the DHCP client socket on {ifname}: {e}") from None
    return s


def lease_from(ack: dhcp.DhcpPacket) -> Lease:
    """Turn an ACK into a Lease; rejects one without an address."""
    if ack.yiaddr == "0.0.0.0":
        raise DhcpClientError("the ACK assigns no address (a ProxyDHCP-only network?)")
    o = ack.options
    mask_raw = o.get(dhcp.OPT_SUBNET_MASK)
    if mask_raw is not None and len(mask_raw) != 4:
        raise DhcpClientError(f"option 1 (subnet mask) must be 4 bytes, got {len(mask_raw)}")
    netmask = str(ipaddress.IPv4Address(mask_raw)) if mask_raw else "255.255.255.0"
    try:
        prefixlen = ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
    except ValueError:
        raise DhcpClientError(f"option 1: {netmask} is not a contiguous netmask") from None
    router_raw = o.get(dhcp.OPT_ROUTER)
    router = str(ipaddress.IPv4Address(router_raw[:4])) if router_raw and len(router_raw) >= 4 else None
    lt = o.get(dhcp.OPT_LEASE_TIME)
    lease_seconds = struct.unpack(">I", lt)[0] if lt and len(lt) == 4 else None
    server_id = ack.server_id or ack.siaddr
    next_server = ack.siaddr
    if next_server == "0.0.0.0":
        tftp = o.get(dhcp.OPT_TFTP_SERVER, b"").decode("ascii", "replace").strip("\0")
        next_server = tftp or server_id
    boot_file = (o.get(dhcp.OPT_BOOTFILE) or ack.file).decode("ascii", "replace").rstrip("\0")
    return Lease(ack.yiaddr, prefixlen, netmask, server_id, next_server, boot_file, router, lease_seconds, dict(o))


class _Exchange:
    """One client conversation: a fixed xid, retransmission with backoff, reply matching."""

    def __init__(self, sock: socket.socket, mac: str, *, attempts: int, timeout: float, max_timeout: float,
                 log: Callable[[str], None]) -> None:
        self.sock, self.mac, self.attempts = sock, mac.lower(), attempts
        self.timeout, self.max_timeout, self.log = timeout, max_timeout, log
        self.start = time.monotonic()

    def ask(self, build: Callable[[int], bytes], xid: int, want: set[int]) -> dhcp.DhcpPacket | None:
        """Send build(secs) up to `attempts` times; the first matching reply, or None."""
        wait = self.timeout
        for attempt in range(self.attempts):
            if attempt:
                self.log(f"dhcp: retransmit {attempt} (xid {xid:08x}) after {wait / 2:.1f} s")
            secs = int(time.monotonic() - self.start)
            try:
                self.sock.sendto(build(secs), ("255.255.255.255", SERVER_PORT))
            except OSError as e:  # e.g. ENETDOWN while the link settles: retry like a lost packet
                self.log(f"dhcp: send failed: {e}")
            deadline = time.monotonic() + wait * random.uniform(0.9, 1.1)
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([self.sock], [], [], left)
                if not ready:
                    break
                data = self.sock.recv(4096)
                try:
                    rep = dhcp.parse(data)
                except FormatError as e:
                    self.log(f"dhcp: ignored malformed reply: {e}")
                    continue
                if rep.op == 2 and rep.xid == xid and rep.mac == self.mac and rep.msg_type in want:
                    return rep
            wait = min(wait * 2, self.max_timeout)
        return None


def acquire(ifname: str, mac: str, *, vendor_class: bytes | None = PXE_VENDOR_CLASS,
            arch: int | None = dhcp.ARCH_X86_64_UEFI_BC, user_class: bytes | None = None, attempts: int = 6,
            timeout: float = 1.0, max_timeout: float = 8.0, rounds: int = 4,
            log: Callable[[str], None] = lambda _m: None) -> Lease:
    """DISCOVER/OFFER/REQUEST/ACK on `ifname` (link up, no address needed) for `mac`.

    Each message is sent up to `attempts` times, waiting `timeout` s then doubling up to
    `max_timeout`; a NAK or an unanswered REQUEST starts over with a new DISCOVER, `rounds` times.
    Raises DhcpClientError when no lease could be had.
    """
    with open_socket(ifname) as sock:
        ex = _Exchange(sock, mac, attempts=attempts, timeout=timeout, max_timeout=max_timeout, log=log)

        def discover(xid: int) -> Callable[[int], bytes]:
            return lambda secs: dhcp.encode_request(mac, dhcp.DISCOVER, xid=xid, secs=secs, vendor_class=vendor_class,
                                                    arch=arch, user_class=user_class)

        def request(xid: int, ip: str, server_id: str) -> Callable[[int], bytes]:
            return lambda secs: dhcp.encode_request(mac, dhcp.REQUEST, xid=xid, secs=secs, requested_ip=ip,
                                                    server_id=server_id, vendor_class=vendor_class, arch=arch,
                                                    user_class=user_class)

        why = "no OFFER"
        for _ in range(rounds):
            xid = int.from_bytes(os.urandom(4), "big")
            offer = ex.ask(discover(xid), xid, {dhcp.OFFER})
            if offer is None:
                why = f"no OFFER after {attempts} DISCOVERs"
                continue
            if offer.yiaddr == "0.0.0.0":
                why = f"the OFFER from {offer.server_id or offer.siaddr} has no address (ProxyDHCP only?)"
                continue
            server_id = offer.server_id or offer.siaddr
            log(f"dhcp: offer {offer.yiaddr} from {server_id}")
            ack = ex.ask(request(xid, offer.yiaddr, server_id), xid, {dhcp.ACK, dhcp.NAK})
            if ack is None:
                why = f"no ACK for {offer.yiaddr} after {attempts} REQUESTs"
                continue
            if ack.msg_type == dhcp.NAK:
                why = f"NAK for {offer.yiaddr} from {server_id}"
                log(f"dhcp: {why}")
                continue
            return lease_from(ack)
        raise DhcpClientError(f"DHCP on {ifname} failed after {rounds} rounds: {why}")
