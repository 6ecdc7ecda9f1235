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

One lease per power-on, not one per stage: a stage puts its lease in the hand-off
(`handoff_record` -> boot.json "lease"), and the next stage, when it runs in the same kernel
(switch_root) and the interface still holds that address with more than half the lease left
(RFC 2131's T1), uses it instead of asking again (`network_up`, `reusable`). After a kexec (a
new kernel: another boot id, an unconfigured NIC) or with anything that does not match, it asks
again as before. The boot server sees the same binding either way: the firmware's ACK bound the
address to the MAC for the whole lease, and the later stages' DHCP only renewed it.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cidboot.errors import CidbootError, FormatError
from cidboot.netboot import ipv4, netif

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; importing `typing` cost the firmware ~9 ms of instructions (TCG)
if TYPE_CHECKING:
    from typing import Any

    from cidboot.netboot import dhcp

# cidboot.netboot.dhcp (the packet codec) is imported where a packet is built or read: a stage that
# reuses the previous stage's lease (`network_up` -> `reusable`) exchanges none and does not load it.
ARCH_X86_64_UEFI_BC = 7  # = dhcp.ARCH_X86_64_UEFI_BC (RFC 4578 option 93), the default arch

PXE_VENDOR_CLASS = b"PXEClient:Arch:00007:UNDI:003016"  # as an x86_64 UEFI PXE ROM sends it
CLIENT_PORT, SERVER_PORT = 68, 67
HANDOFF_KEY = "lease"  # boot.json (cidboot.stage.handoff): the lease a stage passes the next
BOOT_ID = "/proc/sys/kernel/random/boot_id"  # new for every kernel boot, kexec included


def boot_clock() -> float:
    """Seconds on CLOCK_BOOTTIME: one clock for every stage of one kernel (a switch_root keeps
    it; a kexec'ed kernel starts it again, and its boot id differs anyway)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_id(path: str = BOOT_ID) -> str | None:
    """This kernel boot's id, None when it cannot be read (then no lease is reused)."""
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


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
    obtained: float = field(default=0.0, compare=False)  # boot_clock() when the ACK came


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


def lease_from(ack: dhcp.DhcpPacket, obtained: float | None = None) -> Lease:
    """Turn an ACK into a Lease (obtained now unless given); rejects one without an address."""
    from cidboot.netboot import dhcp

    if ack.yiaddr == "0.0.0.0":
        raise DhcpClientError("the ACK assigns no address (a ProxyDHCP-only network?)")
    o = ack.options
    mask_raw = o.get(dhcp.OPT_SUBNET_MASK)
    if mask_raw is not None and len(mask_raw) != 4:
        raise DhcpClientError(f"option 1 (subnet mask) must be 4 bytes, got {len(mask_raw)}")
    netmask = ipv4.text(mask_raw) if mask_raw else "255.255.255.0"
    try:
        prefixlen = ipv4.prefixlen(netmask)
    except ValueError:
        raise DhcpClientError(f"option 1: {netmask} is not a contiguous netmask") from None
    router_raw = o.get(dhcp.OPT_ROUTER)
    router = ipv4.text(router_raw[:4]) if router_raw and len(router_raw) >= 4 else None
    lt = o.get(dhcp.OPT_LEASE_TIME)
    lease_seconds = struct.unpack(">I", lt)[0] if lt and len(lt) == 4 else None
    server_id = ack.server_id or ack.siaddr
    next_server = ack.siaddr
    if next_server == "0.0.0.0":
        tftp = o.get(dhcp.OPT_TFTP_SERVER, b"").decode("ascii", "replace").strip("\0")
        next_server = tftp or server_id
    boot_file = (o.get(dhcp.OPT_BOOTFILE) or ack.file).decode("ascii", "replace").rstrip("\0")
    return Lease(ack.yiaddr, prefixlen, netmask, server_id, next_server, boot_file, router, lease_seconds, dict(o),
                 boot_clock() if obtained is None else obtained)


class _Exchange:
    """One client conversation: a fixed xid, retransmission with backoff, reply matching."""

    def __init__(self, sock: socket.socket, mac: str, *, attempts: int, timeout: float, max_timeout: float,
                 log: Callable[[str], None]) -> None:
        self.sock, self.mac, self.attempts = sock, mac.lower(), attempts
        self.timeout, self.max_timeout, self.log = timeout, max_timeout, log
        self.start = time.monotonic()

    def ask(self, build: Callable[[int], bytes], xid: int, want: set[int]) -> dhcp.DhcpPacket | None:
        """Send build(secs) up to `attempts` times; the first matching reply, or None."""
        from cidboot.netboot import dhcp

        wait = self.timeout
        for attempt in range(self.attempts):
            if attempt:
                self.log(f"dhcp: retransmit {attempt} (xid {xid:08x}) after {wait / 2:.1f} s")
            secs = int(time.monotonic() - self.start)
            try:
                self.sock.sendto(build(secs), ("255.255.255.255", SERVER_PORT))
            except OSError as e:  # e.g. ENETDOWN while the link settles: retry like a lost packet
                self.log(f"dhcp: send failed: {e}")
            deadline = time.monotonic() + wait * jitter()
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


def jitter() -> float:
    """A factor in [0.9, 1.1] for a retransmission timeout (RFC 2131 4.1's +-1 s, relative here), so
    clients powered on together do not retransmit in step. From os.urandom: `random` would be one
    more module to import at start for one number per retransmission."""
    return 0.9 + 0.2 * int.from_bytes(os.urandom(2), "big") / 0xFFFF


def acquire(ifname: str, mac: str, *, vendor_class: bytes | None = PXE_VENDOR_CLASS,
            arch: int | None = ARCH_X86_64_UEFI_BC, user_class: bytes | None = None, attempts: int = 6,
            timeout: float = 1.0, max_timeout: float = 8.0, rounds: int = 4,
            log: Callable[[str], None] = lambda _m: None) -> Lease:
    """DISCOVER/OFFER/REQUEST/ACK on `ifname` (link up, no address needed) for `mac`.

    Each message is sent up to `attempts` times, waiting `timeout` s then doubling up to
    `max_timeout`; a NAK or an unanswered REQUEST starts over with a new DISCOVER, `rounds` times.
    Raises DhcpClientError when no lease could be had.
    """
    from cidboot.netboot import dhcp

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


# -- one lease per power-on: passing it on at a same-kernel hand-over ------------------------------

class LeaseNotReusable(DhcpClientError):
    """The previous stage's lease cannot be used here (the message says why); the stage asks again."""


def handoff_record(lease: Lease, ifname: str, mac: str) -> dict[str, Any]:
    """The lease as boot.json carries it: where it is configured, what it is, when it was
    obtained (boot_clock) and in which kernel boot (boot id)."""
    return {"ifname": ifname, "mac": mac.lower(), "ip": lease.ip, "prefixlen": lease.prefixlen,
            "router": lease.router, "server": lease.server_ip, "next_server": lease.next_server,
            "boot_file": lease.boot_file, "lease_seconds": lease.lease_seconds, "obtained": lease.obtained,
            "boot_id": boot_id()}


def _field(rec: dict[str, Any], key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    v = rec.get(key)
    if (v is None and optional) or (isinstance(v, kind) and not isinstance(v, bool)):
        return v
    raise LeaseNotReusable(f"{key} is {v!r}")


def reusable(record: Any, *, this_boot: str | None = None, now: float | None = None,
             interfaces: Callable[[], list[tuple[str, str]]] | None = None,
             address_of: Callable[[str], tuple[str, int] | None] | None = None,
             carrier: Callable[[str], bool] | None = None) -> tuple[str, str, Lease]:
    """(ifname, mac, lease) of the hand-off's lease record when every check holds: same kernel
    boot (boot id), the lease obtained in it and not yet at T1 (half its time), the interface
    there with the same MAC, carrier, and exactly that address and prefix configured. Raises
    LeaseNotReusable naming the first check that failed. The keyword arguments are this
    kernel's facts (tests give their own)."""
    if not isinstance(record, dict):
        raise LeaseNotReusable("no lease in the hand-off" if record is None else "the lease record is not an object")
    ifname, mac, ip = _field(record, "ifname", str), _field(record, "mac", str).lower(), _field(record, "ip", str)
    prefixlen, seconds = _field(record, "prefixlen", int), _field(record, "lease_seconds", int)
    obtained, rec_boot = _field(record, "obtained", (int, float)), _field(record, "boot_id", str)
    router = _field(record, "router", str, optional=True)
    server, next_server = _field(record, "server", str), _field(record, "next_server", str)
    boot_file = _field(record, "boot_file", str)
    try:
        netmask = ipv4.netmask(prefixlen)
        for a in (ip, server, next_server, *([router] if router else [])):
            ipv4.packed(a)
    except ValueError as e:
        raise LeaseNotReusable(f"not an IPv4 lease: {e}") from None
    this_boot = boot_id() if this_boot is None else this_boot
    if this_boot is None or rec_boot != this_boot:
        raise LeaseNotReusable("obtained in another kernel boot (kexec)")
    now = boot_clock() if now is None else now
    if not 0 <= now - obtained < seconds / 2:
        raise LeaseNotReusable(f"obtained {now - obtained:.0f} s ago, of {seconds} s: past T1 (or not from this clock)")
    found = dict((interfaces or netif.ethernet_interfaces)())
    if found.get(ifname, "").lower() != mac:
        raise LeaseNotReusable(f"no interface {ifname} with MAC {mac}")
    if not (carrier or netif.has_carrier)(ifname):
        raise LeaseNotReusable(f"{ifname} has no carrier")
    have = (address_of or netif.address)(ifname)
    if have != (ip, prefixlen):
        raise LeaseNotReusable(f"{ifname} holds {'/'.join(map(str, have)) if have else 'no address'}, not {ip}/{prefixlen}")
    return ifname, mac, Lease(ip, prefixlen, netmask, server, next_server, boot_file, router, seconds, {}, obtained)


def network_up(*, user_class: bytes, handed: Any = None, log: Callable[[str], None] = lambda _m: None,
               carrier_timeout: float = 15.0) -> tuple[str, str, Lease]:
    """The boot NIC with an address for a stage after the firmware: the lease `handed` (the
    hand-off's boot.json "lease") when `reusable`, else NIC up, DHCP (`user_class`, no PXE
    vendor class or arch) and the address configured. Returns (ifname, mac, lease)."""
    if handed is not None:
        try:
            ifname, mac, lease = reusable(handed)
        except LeaseNotReusable as e:
            log(f"dhcp: not reusing the previous stage's lease: {e}")
        else:
            if lease.router:
                netif.add_default_route(ifname, lease.router)  # kept by the kernel; re-added if it was not
            log(f"dhcp: {lease.ip}/{lease.prefixlen} from the previous stage's lease (same kernel, "
                f"{(lease.lease_seconds or 0) - (boot_clock() - lease.obtained):.0f} s left)")
            return ifname, mac, lease
    ifname, mac = netif.bring_up(carrier_timeout=carrier_timeout)
    lease = acquire(ifname, mac, vendor_class=None, arch=None, user_class=user_class, log=log)
    netif.configure(ifname, lease.ip, lease.prefixlen, router=lease.router)
    return ifname, mac, lease
