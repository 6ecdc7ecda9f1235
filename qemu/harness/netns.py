"""A throwaway boot network: one network namespace holding a bridge with the boot server's
address and tap devices for QEMU guests, built with pyroute2 and always torn down.

Everything a test sends stays inside the namespace it created: nothing is routed out, and the
namespace (with every link in it) disappears on exit.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import NetNS, netns

SUBNET_PREFIX = 24
CLONE_NEWNET = 0x40000000


@dataclass
class BootNetwork:
    name: str
    bridge: str
    server_ip: str
    prefixlen: int
    taps: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # client namespaces, removed with the network

    def cmd(self, argv: Sequence[str]) -> list[str]:
        """argv to run a program inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.cmd(argv), **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.cmd(argv), **kw)

    def add_tap(self, ifname: str | None = None, *, bridge: str | None = None) -> str:
        """A tap for one QEMU guest on `bridge` (default: the boot network's own)."""
        ifname = ifname or f"tap{len(self.taps)}"
        with NetNS(self.name) as ns:
            ns.link("add", ifname=ifname, kind="tuntap", mode="tap")
            tap = ns.link_lookup(ifname=ifname)[0]
            ns.link("set", index=tap, master=ns.link_lookup(ifname=bridge or self.bridge)[0])
            ns.link("set", index=tap, state="up")
        self.taps.append(ifname)
        return ifname

    def add_veth_host(self, ifname: str, address: str) -> None:
        """A second host on the bridge: a veth whose far end (with `address`) lives in the same
        namespace, for clients like udhcpc that need their own interface."""
        peer = f"{ifname}p"
        with NetNS(self.name) as ns:
            ns.link("add", ifname=ifname, kind="veth", peer=peer)
            ns.link("set", index=ns.link_lookup(ifname=peer)[0], master=ns.link_lookup(ifname=self.bridge)[0])
            for n in (ifname, peer):
                ns.link("set", index=ns.link_lookup(ifname=n)[0], state="up")
            if address:
                ns.addr("add", index=ns.link_lookup(ifname=ifname)[0], address=address, prefixlen=SUBNET_PREFIX)


    def add_host(self, address: str | None = None) -> str:
        """Another machine on the boot network: its own namespace, linked by a veth to the bridge,
        with `address` (or none, like a PXE client before DHCP). Returns the namespace name."""
        host = f"{self.name}-h{len(self.hosts)}"
        netns.create(host)
        self.hosts.append(host)
        ifname, peer = f"h{len(self.hosts) - 1}", f"h{len(self.hosts) - 1}p"
        with NetNS(self.name) as ns:
            ns.link("add", ifname=peer, kind="veth", peer={"ifname": ifname, "net_ns_fd": host})
            ns.link("set", index=ns.link_lookup(ifname=peer)[0], master=ns.link_lookup(ifname=self.bridge)[0])
            ns.link("set", index=ns.link_lookup(ifname=peer)[0], state="up")
        with NetNS(host) as hs:
            idx = hs.link_lookup(ifname=ifname)[0]
            hs.link("set", index=idx, ifname="eth0")
            hs.link("set", index=idx, state="up")
            hs.link("set", index=hs.link_lookup(ifname="lo")[0], state="up")
            if address:
                hs.addr("add", index=idx, address=address, prefixlen=self.prefixlen)
        return host

    def host_cmd(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", host, *argv]

    def add_site(self, site: int) -> Site:
        """Another site's LAN for a second (third, ...) boot server: a bridge `br{site}` in this
        namespace (10.77.{site}.254/24, the router) and the boot server's own namespace on it
        (eth0 10.77.{site}.1/16), so each server has its own UDP 67/69 and TCP 8080. This
        namespace routes between the sites' /24s and answers ARP for the others (proxy ARP), so
        devices told a /16 reach every site's devices and this namespace's services (the
        cluster's gateways on 10.77.0.1) without a router option."""
        bridge, router = f"br{site}", f"10.77.{site}.254"
        with NetNS(self.name) as ns:
            ns.link("add", ifname=bridge, kind="bridge")
            br = ns.link_lookup(ifname=bridge)[0]
            ns.addr("add", index=br, address=router, prefixlen=SUBNET_PREFIX)
            ns.link("set", index=br, state="up")
        for b in (self.bridge, bridge):
            for key in (f"net.ipv4.conf.{b}.proxy_arp=1", f"net.ipv4.neigh.{b}.proxy_delay=0",
                        f"net.ipv4.conf.{b}.rp_filter=0"):
                subprocess.run(self.cmd(["sysctl", "-qw", key]), check=True)
        subprocess.run(self.cmd(["sysctl", "-qw", "net.ipv4.ip_forward=1"]), check=True)
        host = f"{self.name}-s{site}"
        netns.create(host)
        self.hosts.append(host)
        with NetNS(self.name) as ns:
            ns.link("add", ifname=f"s{site}p", kind="veth", peer={"ifname": f"s{site}", "net_ns_fd": host})
            peer = ns.link_lookup(ifname=f"s{site}p")[0]
            ns.link("set", index=peer, master=ns.link_lookup(ifname=bridge)[0])
            ns.link("set", index=peer, state="up")
        ip = f"10.77.{site}.1"
        with NetNS(host) as hs:
            idx = hs.link_lookup(ifname=f"s{site}")[0]
            hs.link("set", index=idx, ifname="eth0")
            hs.link("set", index=idx, state="up")
            hs.link("set", index=hs.link_lookup(ifname="lo")[0], state="up")
            hs.addr("add", index=idx, address=ip, prefixlen=16)
        return Site(site, bridge, ip, host)


@dataclass(frozen=True)
class Site:
    """One site's LAN in a multi-site lab: its bridge, its boot server's address and namespace."""

    index: int
    bridge: str
    server_ip: str
    namespace: str | None  # None: the boot network's own namespace (site 0)


@contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the calling thread (and the processes it starts) in network namespace `name`, then
    come back: how the harness starts a cluster and talks to its loopback-only APIs inside a
    lab's namespace without opening them to the host."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{name}") as there:
        if libc.setns(there.fileno(), CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns back to the harness's namespace")


def _require_root() -> None:
    if os.geteuid() != 0:
        raise PermissionError("network namespaces need root (CI runs as root)")


@contextmanager
def boot_network(server_ip: str = "10.77.0.1", prefixlen: int = SUBNET_PREFIX, taps: int = 1) -> Iterator[BootNetwork]:
    """Create namespace + bridge (with `server_ip`) + `taps` tap devices; remove all on exit."""
    _require_root()
    name = f"cidboot-{secrets.token_hex(4)}"
    netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("add", ifname="br0", kind="bridge")
            br = ns.link_lookup(ifname="br0")[0]
            ns.addr("add", index=br, address=server_ip, prefixlen=prefixlen)
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.link("set", index=br, state="up")
        net = BootNetwork(name, "br0", server_ip, prefixlen)
        for _ in range(taps):
            net.add_tap()
        yield net
    finally:
        for host in net.hosts if "net" in locals() else []:
            netns.remove(host)
        netns.remove(name)
