"""DHCP server and ProxyDHCP for PXE clients.

Full mode hands out addresses from the lease pool; proxy mode (next to an existing DHCP
server) only answers PXE clients, with boot information and no address, on port 67 and on
port 4011. PXE ROMs get the boot file for their architecture (RFC 4578 option 93: BIOS chain-loads
iPXE, UEFI loads the bootstrap UKI directly); UEFI HTTP Boot clients (arch 16/19, vendor class
"HTTPClient") get the UKI's http:// URL and "HTTPClient" in option 60; an architecture we have
no file for gets no offer and a log line naming it. iPXE (user class "iPXE") gets its per-device
script instead, so it does not chain-load itself forever; so does the cidboot L0 firmware (user
class "cidboot-firmware"), which interprets the script's kernel/initrd lines. The bootstrap
(user class "cidboot-bootstrap", a UKI has no `cidboot.config=` on its fixed command line) gets
its boot config's TFTP path as boot file (docs/boot-chain.md).

Relays and unicast (RFC 2131 4.1): a relayed request (giaddr set) is answered to giaddr:67, from
the pool whose subnet holds giaddr, with giaddr as the client's router; a client with an address
(ciaddr) that did not ask for broadcast is answered unicast at ciaddr:68. Malformed packets are
logged and counted, never fatal; so is any exception a request raises in the handler (it is
dropped, logged with its traceback and counted in /metrics, and the loop keeps serving).
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import threading
from dataclasses import dataclass, field

from bootstrap.server.devices import Devices
from bootstrap.server.leases import LeaseDB
from bootstrap.server.metrics import Metrics
from cidboot.errors import FormatError
from cidboot.netboot import dhcp

log = logging.getLogger("bootstrap.dhcp")

# client architecture (option 93) -> boot file; for the HTTP Boot arches a path the server
# turns into http://<server>:<port>/<path>
DEFAULT_BOOT_FILES = {
    dhcp.ARCH_X86_BIOS: "undionly.kpxe",
    dhcp.ARCH_X86_64_UEFI_BC: "bootstrap-x86_64.efi",
    dhcp.ARCH_X86_64_UEFI: "bootstrap-x86_64.efi",
    dhcp.ARCH_ARM64_UEFI: "bootstrap-arm64.efi",
    dhcp.ARCH_X86_64_UEFI_HTTP: "bootstrap-x86_64.efi",
    dhcp.ARCH_ARM64_UEFI_HTTP: "bootstrap-arm64.efi",
}
HTTP_ARCHES = frozenset({dhcp.ARCH_X86_64_UEFI_HTTP, dhcp.ARCH_ARM64_UEFI_HTTP})
HTTP_BOOT_PREFIX = "boot/"  # where the HTTP side serves boot files: http://<server>:<port>/boot/<name>
FIRMWARE_USER_CLASS = b"cidboot-firmware"
BOOTSTRAP_USER_CLASS = b"cidboot-bootstrap"


def bootconfig_path(mac: str) -> str:
    """The TFTP path of a device's boot config (generated per request by the boot server)."""
    return f"bootconfig/{mac.lower().replace(':', '-')}.json"


@dataclass
class Pool:
    """The lease pool of one subnet a relay serves (`--dhcp-range` beyond the local one)."""

    network: ipaddress.IPv4Network
    leases: LeaseDB


@dataclass
class DhcpConfig:
    interface: str
    server_ip: str
    netmask: str = "255.255.255.0"
    leases: LeaseDB | None = None  # None: ProxyDHCP
    boot_files: dict[int, str] = field(default_factory=lambda: dict(DEFAULT_BOOT_FILES))
    ipxe_script: str = "boot.ipxe"  # per device: boot.ipxe is rewritten by MAC in the TFTP root
    devices: Devices = field(default_factory=Devices.empty)
    http_url: str | None = None  # http://<server>:<port>, for the HTTP Boot arches; None: no HTTP offers
    relay_pools: list[Pool] = field(default_factory=list)  # by relay subnet (giaddr)


class DhcpServer:
    def __init__(self, cfg: DhcpConfig, metrics: Metrics, *, bind: bool = True) -> None:
        """`bind=False` opens no sockets: tests and fuzzers drive `handle()` (or set `socks`)."""
        self.cfg, self.metrics = cfg, metrics
        self.socks: list[socket.socket] = []
        self._stop = threading.Event()
        # 4011 in both modes: a UEFI PXE client (edk2's PxeBcDxe) given a full DHCP offer with
        # "PXEClient" and a boot file (a "BINL" offer) asks the server again on port 4011 for the
        # boot file, and reports "PXE-E16: No valid offer received" when nobody answers there
        ports = [67, 4011] if bind else []
        for port in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, cfg.interface.encode())
            s.bind(("0.0.0.0", port))
            self.socks.append(s)

    @property
    def proxy(self) -> bool:
        return self.cfg.leases is None

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select(self.socks, [], [], 0.5)
            for s in ready:
                try:
                    data, addr = s.recvfrom(4096)
                except OSError:
                    continue
                try:
                    self.handle(s, data, addr)
                except Exception as e:  # one request never stops DHCP for everyone
                    self.metrics.request_failed("dhcp", e, addr[0], log)

    def shutdown(self) -> None:
        self._stop.set()
        for s in self.socks:
            s.close()

    def handle(self, sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
        try:
            req = dhcp.parse(data)
        except FormatError as e:
            self.metrics.inc("dhcp_errors_total", reason="malformed")
            log.warning("dropped malformed DHCP packet from %s: %s", addr[0], e, extra={"peer": addr[0], "error": str(e)})
            return
        if req.op != 1:
            return
        self.metrics.inc("dhcp_requests_total", type=req.msg_name)
        relayed = req.giaddr != "0.0.0.0"
        leases = self.cfg.leases
        router = None
        if relayed and not self.proxy:
            pool = self.pool_for(req.giaddr)
            if pool is None:
                self.metrics.inc("dhcp_errors_total", reason="no_range_for_relay")
                log.warning("no --dhcp-range for relay %s's subnet: ignoring %s from %s", req.giaddr, req.msg_name,
                         req.mac, extra={"mac": req.mac, "giaddr": req.giaddr})
                return
            leases, router, netmask = pool.leases, req.giaddr, str(pool.network.netmask)
        else:
            netmask = self.cfg.netmask
        if leases is not None and not leases.allow(req.mac):
            self.metrics.inc("dhcp_errors_total", reason="rate_limited")
            log.info("rate limit: ignoring %s from %s", req.msg_name, req.mac, extra={"mac": req.mac})
            return
        policy = self.cfg.devices.lookup(req.mac, req.client_uuid)
        if not policy.allow:
            self.metrics.inc("dhcp_errors_total", reason="denied")
            log.info("device %s denied by policy", req.mac, extra={"mac": req.mac})
            return
        netboot = req.is_pxe or req.is_http_boot
        if self.proxy and not netboot:
            return  # the site's DHCP server answers everyone else
        boot_file = self.boot_file(req) if netboot or self.is_bootstrap(req) else ""
        if boot_file is None:
            arch = req.client_arch
            self.metrics.inc("dhcp_errors_total", reason="no_boot_file")
            log.warning("no offer for %s: client architecture %s (%s) has no boot file%s", req.mac,
                        f"{arch:#x}" if arch is not None else "none",
                        dhcp.ARCH_NAMES.get(arch, "unknown") if arch is not None else "unknown",
                        " (arm64 images are not built yet)" if arch in (dhcp.ARCH_ARM64_UEFI, dhcp.ARCH_ARM64_UEFI_HTTP)
                        else "", extra={"mac": req.mac, "arch": arch})
            return
        vendor = b"HTTPClient" if req.is_http_boot else b"PXEClient"
        on_4011 = sock.getsockname()[1] == 4011
        if on_4011:  # PXE boot server discovery (PXE 2.1): boot information only, never an address
            if req.msg_type not in (dhcp.REQUEST, dhcp.INFORM):
                return
            reply = dhcp.build_reply(req, dhcp.ACK, server_ip=self.cfg.server_ip, siaddr=self.cfg.server_ip,
                                     boot_file=boot_file, pxe=True, vendor_class=vendor)
        elif req.msg_type == dhcp.DISCOVER:
            if leases is None:
                reply = dhcp.build_reply(req, dhcp.OFFER, server_ip=self.cfg.server_ip, siaddr=self.cfg.server_ip,
                                         boot_file=boot_file, pxe=True, vendor_class=vendor)
            else:
                ip = leases.offer(req.mac, req.requested_ip)
                if ip is None:
                    self.metrics.inc("dhcp_errors_total", reason="pool_exhausted")
                    log.warning("no address for %s: pool exhausted or allocation rate exceeded", req.mac)
                    return
                reply = dhcp.build_reply(req, dhcp.OFFER, server_ip=self.cfg.server_ip, yiaddr=ip, siaddr=self.cfg.server_ip,
                                         boot_file=boot_file, netmask=netmask, lease_seconds=leases.lease_seconds,
                                         pxe=netboot, vendor_class=vendor, router=router)
        elif req.msg_type in (dhcp.REQUEST, dhcp.INFORM):
            if leases is None:
                if req.server_id not in (None, self.cfg.server_ip):
                    return
                reply = dhcp.build_reply(req, dhcp.ACK, server_ip=self.cfg.server_ip, siaddr=self.cfg.server_ip,
                                         boot_file=boot_file, pxe=True, vendor_class=vendor)
            else:
                if req.server_id not in (None, self.cfg.server_ip):
                    leases.release(req.mac)  # the client chose another server
                    return
                want = req.requested_ip or req.ciaddr
                if leases.bind(req.mac, want):
                    reply = dhcp.build_reply(req, dhcp.ACK, server_ip=self.cfg.server_ip, yiaddr=want, siaddr=self.cfg.server_ip,
                                             boot_file=boot_file, netmask=netmask, lease_seconds=leases.lease_seconds,
                                             pxe=netboot, vendor_class=vendor, router=router)
                    self.metrics.gauge("dhcp_leases_active", self.active_leases())
                    log.info("lease %s -> %s (%s)%s", want, req.mac,
                             "iPXE" if req.is_ipxe else req.vendor_class or "dhcp",
                             f" via relay {req.giaddr}" if relayed else "",
                             extra={"mac": req.mac, "ip": want, "boot_file": boot_file, "giaddr": req.giaddr})
                else:
                    reply = dhcp.build_reply(req, dhcp.NAK, server_ip=self.cfg.server_ip)
        elif req.msg_type == dhcp.RELEASE and leases is not None:
            leases.release(req.mac)
            return
        else:
            return
        dest = self.destination(req, addr, on_4011)
        try:
            sock.sendto(reply, dest)
            self.metrics.inc("dhcp_replies_total", request=req.msg_name)
        except OSError as e:
            self.metrics.inc("dhcp_errors_total", reason="send")
            log.warning("cannot send DHCP reply to %s: %s", dest, e)

    @staticmethod
    def destination(req: dhcp.DhcpPacket, addr: tuple[str, int], on_4011: bool) -> tuple[str, int]:
        """RFC 2131 4.1: relayed -> the relay (giaddr:67); port 4011 -> back to the sender; a client
        with an address that did not ask for broadcast -> unicast to ciaddr (at port 68, or at the port
        it sent from when it sent from ciaddr: a real client sends from 68); else broadcast."""
        if req.giaddr != "0.0.0.0":
            return req.giaddr, 67
        if on_4011:
            return addr[0], addr[1]
        if req.ciaddr != "0.0.0.0" and not req.flags & 0x8000:
            return req.ciaddr, addr[1] if addr[0] == req.ciaddr else 68
        return "255.255.255.255", 68

    def pool_for(self, giaddr: str) -> Pool | None:
        """The pool of the subnet that holds the relay's address (the local one included)."""
        ip = ipaddress.IPv4Address(giaddr)
        for pool in self.cfg.relay_pools:
            if ip in pool.network:
                return pool
        return None

    def active_leases(self) -> int:
        pools = [p.leases for p in self.cfg.relay_pools] + ([self.cfg.leases] if self.cfg.leases else [])
        return sum(p.active() for p in pools)

    @staticmethod
    def is_bootstrap(req: dhcp.DhcpPacket) -> bool:
        return req.options.get(dhcp.OPT_USER_CLASS) == BOOTSTRAP_USER_CLASS

    def boot_file(self, req: dhcp.DhcpPacket) -> str | None:
        """The boot file for this client, or None (no offer): the architecture is unknown, or we
        have no file for it."""
        # the bootstrap (a UKI has no cidboot.config= on its command line) gets its boot config's path
        if DhcpServer.is_bootstrap(req):
            return bootconfig_path(req.mac)
        # iPXE and the cidboot L0 firmware (user class "cidboot-firmware") both read the script:
        # the firmware interprets its kernel/initrd lines itself (docs/boot-chain.md)
        if req.is_ipxe or req.options.get(dhcp.OPT_USER_CLASS) == FIRMWARE_USER_CLASS:
            return self.cfg.ipxe_script
        arch = req.client_arch if req.client_arch is not None else dhcp.ARCH_X86_BIOS
        name = self.cfg.boot_files.get(arch)
        if name is None:
            return None
        if arch in HTTP_ARCHES or req.is_http_boot:
            if self.cfg.http_url is None:
                return None
            return f"{self.cfg.http_url}/{HTTP_BOOT_PREFIX}{name}"
        return name
