"""A minimal IPv6 router advertiser for a test boot network, so iPXE does not wait for one.

iPXE configures IPv6 alongside DHCPv4 and reports "Configuring (net0 ...) ok" only when both
are done; with no router on the link it sends Router Solicitations with backoff for about
16 s before giving up (seen on the boot network: DHCPv4 done at +2.4 s, first TFTP at +18 s).
Answering each solicitation with a Router Advertisement that offers nothing (no prefix, router
lifetime 0, neither managed nor other-config) tells iPXE there is no IPv6 to configure, so it
goes on at once. Real sites either have a router or the same wait, so the bench reports both.

Runs inside the namespace (`python -m qemu.harness.ra IFNAME`), stdlib raw ICMPv6 socket:
the kernel fills in the checksum; hop limit 255 as RFC 4861 requires.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from qemu.harness.netns import BootNetwork

ROUTER_SOLICITATION, ROUTER_ADVERTISEMENT = 133, 134
ALL_NODES, ALL_ROUTERS = "ff02::1", "ff02::2"
# type, code, checksum (kernel), cur hop limit, flags (M=0 O=0), router lifetime 0, reachable 0, retrans 0
EMPTY_RA = struct.pack("!BBHBBHII", ROUTER_ADVERTISEMENT, 0, 0, 64, 0, 0, 0, 0)


def serve(ifname: str) -> None:
    """Answer every Router Solicitation on `ifname` with an empty Router Advertisement."""
    idx = socket.if_nametoindex(ifname)
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
    mreq = socket.inet_pton(socket.AF_INET6, ALL_ROUTERS) + struct.pack("@I", idx)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
    print(f"router advertiser on {ifname}", flush=True)
    while True:
        data, _peer = s.recvfrom(2048)
        if data and data[0] == ROUTER_SOLICITATION:
            try:
                s.sendto(EMPTY_RA, (ALL_NODES, 0, 0, idx))
            except OSError as e:  # e.g. our link-local address is still tentative: the client asks again
                print(f"cannot advertise yet: {e}", file=sys.stderr, flush=True)


@contextmanager
def router_advertiser(net: BootNetwork, ifname: str | None = None) -> Iterator[subprocess.Popen[str]]:
    """Run the advertiser in `net`'s namespace on its bridge for the duration of the block."""
    proc = net.popen([sys.executable, "-m", "qemu.harness.ra", ifname or net.bridge], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "router advertiser on" not in line:
            raise RuntimeError(f"router advertiser did not start: {proc.stderr.read() if proc.stderr else ''}")
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    try:
        serve(sys.argv[1])
    except KeyboardInterrupt:
        pass
