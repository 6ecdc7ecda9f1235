"""Bring up the boot NIC inside a stage (no ip(8), no busybox), with the stdlib only: sysfs to
find interfaces and read carrier, the classic SIOC* ioctls to set flags, address and route.

Why not pyroute2: every pyroute2 release imports modules the images never ship (`code` through
pyroute2.cli in 0.7-0.9.1, `unittest.mock` in iprsocket from 0.8.2), and its package __init__
imports nearly all of it (NDB pulls sqlite3): seconds of import time under TCG and megabytes in
the image for four ioctls. The host-side harness (qemu/harness) keeps using pyroute2.

The stages boot on a machine with one wired NIC (virtio-net under QEMU); the first Ethernet
interface that is not loopback is the one PXE used. Carrier matters: DHCP sent before the link
is up is lost, and under TCG virtio-net takes a moment to report it.

    ifname, mac = bring_up()               # first Ethernet NIC, link up, carrier
    lease = cidboot.netboot.dhcp_client.acquire(ifname, mac)
    configure(ifname, lease.ip, lease.prefixlen, router=lease.router)
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import socket
import struct
import time
from pathlib import Path

from cidboot.errors import CidbootError, NotFoundError
from cidboot.netboot import ipv4

ARPHRD_ETHER = 1
SYS_NET = Path("/sys/class/net")
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFADDR, SIOCSIFNETMASK, SIOCADDRT = 0x8913, 0x8914, 0x8916, 0x891C, 0x890B
SIOCGIFADDR, SIOCGIFNETMASK = 0x8915, 0x891B
IFF_UP = 0x1
RTF_UP, RTF_GATEWAY = 0x1, 0x2


class NetifError(CidbootError):
    """An interface cannot be found, brought up or configured."""


class NoInterface(NotFoundError):
    """No Ethernet interface (is the NIC's kernel module loaded?)."""


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:  # e.g. carrier reads EINVAL while the link is down
        return ""


def ethernet_interfaces(sys_net: Path = SYS_NET) -> list[tuple[str, str]]:
    """(ifname, mac) of every Ethernet interface except loopback, bridges and bonds, by ifindex."""
    found = []
    for d in sys_net.iterdir() if sys_net.is_dir() else []:
        if d.name == "lo" or _read(d / "type") != str(ARPHRD_ETHER):
            continue
        if (d / "bridge").exists() or (d / "bonding").exists():
            continue  # virtual links a stage never boots from
        mac = _read(d / "address")
        if not mac or mac == "00:00:00:00:00:00":
            continue
        found.append((int(_read(d / "ifindex") or 0), d.name, mac))
    return [(name, mac) for _, name, mac in sorted(found)]


def first_ethernet() -> tuple[str, str]:
    """(ifname, mac) of the boot NIC: the first Ethernet interface that is not loopback."""
    found = ethernet_interfaces()
    if not found:
        raise NoInterface("no Ethernet interface: is the NIC's driver (e.g. virtio_net) loaded?")
    return found[0]


def _ifreq(ifname: str, payload: bytes = b"") -> bytes:
    name = ifname.encode()
    if len(name) >= 16:
        raise NetifError(f"interface name too long: {ifname}")
    return struct.pack("16s", name) + payload.ljust(24, b"\0")


def _ioctl(req: int, arg: bytes, what: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            return fcntl.ioctl(s.fileno(), req, arg)
        except OSError as e:
            if e.errno == errno.ENODEV:
                raise NoInterface(f"{what}: no such interface") from None
            raise NetifError(f"{what}: {e.strerror}") from None


def _set_up(ifname: str) -> None:
    got = _ioctl(SIOCGIFFLAGS, _ifreq(ifname), f"{ifname}: get flags")
    flags = struct.unpack_from("H", got, 16)[0]
    if not flags & IFF_UP:
        _ioctl(SIOCSIFFLAGS, _ifreq(ifname, struct.pack("H", flags | IFF_UP)), f"{ifname}: set up")


def link_up(ifname: str) -> None:
    """Set the link (and loopback) administratively up."""
    _set_up(ifname)
    try:
        _set_up("lo")
    except NoInterface:
        pass


def has_carrier(ifname: str, sys_net: Path = SYS_NET) -> bool:
    d = sys_net / ifname
    if not d.exists():
        raise NoInterface(f"no interface {ifname}")
    return _read(d / "carrier") == "1" or _read(d / "operstate") == "up"


def wait_carrier(ifname: str, timeout: float = 10.0) -> float:
    """Wait until the link reports carrier; returns the seconds waited. Raises NetifError on timeout."""
    start = time.monotonic()
    while True:
        if has_carrier(ifname):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise NetifError(f"{ifname}: no carrier after {timeout:.0f} s (cable, switch port, or the NIC model?)")
        time.sleep(0.05)


def _sockaddr_in(ip: str) -> bytes:
    return struct.pack("<H2s4s8s", socket.AF_INET, b"\0\0", ipv4.packed(ip), b"")


class _RtEntry(ctypes.Structure):
    """struct rtentry (linux/route.h), for SIOCADDRT."""

    _fields_ = [("rt_pad1", ctypes.c_ulong), ("rt_dst", ctypes.c_ubyte * 16), ("rt_gateway", ctypes.c_ubyte * 16),
                ("rt_genmask", ctypes.c_ubyte * 16), ("rt_flags", ctypes.c_ushort), ("rt_pad2", ctypes.c_short),
                ("rt_pad3", ctypes.c_ulong), ("rt_pad4", ctypes.c_void_p), ("rt_metric", ctypes.c_short),
                ("rt_dev", ctypes.c_char_p), ("rt_mtu", ctypes.c_ulong), ("rt_window", ctypes.c_ulong),
                ("rt_irtt", ctypes.c_ushort)]


def configure(ifname: str, address: str, prefixlen: int, *, router: str | None = None) -> None:
    """Set `address/prefixlen` as the interface's address (the kernel adds the subnet route) and,
    if given, a default route via `router` (an existing one is fine)."""
    netmask = ipv4.netmask(prefixlen)
    _ioctl(SIOCSIFADDR, _ifreq(ifname, _sockaddr_in(address)), f"{ifname}: set address {address}")
    _ioctl(SIOCSIFNETMASK, _ifreq(ifname, _sockaddr_in(netmask)), f"{ifname}: set netmask {netmask}")
    if router:
        add_default_route(ifname, router)


def address(ifname: str) -> tuple[str, int] | None:
    """The interface's IPv4 address and prefix length, None when it has none (how a stage started
    by switch_root sees what the previous stage configured: the kernel kept it)."""
    try:
        got = _ioctl(SIOCGIFADDR, _ifreq(ifname), f"{ifname}: get address")
        mask = _ioctl(SIOCGIFNETMASK, _ifreq(ifname), f"{ifname}: get netmask")
    except NetifError:  # EADDRNOTAVAIL: no address configured
        return None
    ip = ipv4.text(got[20:24])
    try:
        prefixlen = ipv4.prefixlen(mask[20:24])
    except ValueError:  # a non-contiguous mask: not one this code set
        return None
    return ip, prefixlen


def add_default_route(ifname: str, router: str) -> None:
    """A default route via `router` on `ifname` (an existing one is fine)."""
    rt = _RtEntry()
    sockaddr = ctypes.c_ubyte * 16  # not c_char: its setter stops at the first NUL
    rt.rt_dst = sockaddr.from_buffer_copy(_sockaddr_in("0.0.0.0"))
    rt.rt_gateway = sockaddr.from_buffer_copy(_sockaddr_in(router))
    rt.rt_genmask = sockaddr.from_buffer_copy(_sockaddr_in("0.0.0.0"))
    rt.rt_flags = RTF_UP | RTF_GATEWAY
    rt.rt_dev = ifname.encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), SIOCADDRT, bytes(rt))
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise NetifError(f"{ifname}: default route via {router}: {e.strerror}") from None


def bring_up(ifname: str | None = None, *, carrier_timeout: float = 10.0) -> tuple[str, str]:
    """The usual sequence: pick the NIC (or use `ifname`), link up, wait for carrier; returns (ifname, mac)."""
    deadline = time.monotonic() + carrier_timeout
    while True:  # a driver loaded a moment ago may not have registered its netdev yet
        found = ethernet_interfaces()
        if ifname is not None:
            found = [f for f in found if f[0] == ifname]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not found:
        raise NoInterface(f"no Ethernet interface {ifname}" if ifname else
                          "no Ethernet interface: is the NIC's driver (e.g. virtio_net + virtio_pci) loaded?")
    ifname, mac = found[0]
    link_up(ifname)
    wait_carrier(ifname, carrier_timeout)
    return ifname, mac
