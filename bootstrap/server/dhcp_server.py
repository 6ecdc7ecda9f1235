"""DHCP server and ProxyDHCP for PXE clients.

Full mode hands out addresses from the lease pool; proxy mode (next to an existing DHCP
server) only answers PXE clients, with boot information and no address, on port 67 and on
port 4011. PXE ROMs get the boot file for their architecture; iPXE (user class "iPXE") gets
its per-device script instead, so it does not chain-load itself forever; so does the cidboot L0
firmware (user class "cidboot-firmware"), which interprets the script's kernel/initrd lines. Malformed packets are
logged and counted, never fatal; so is any exception a request raises in the handler (it is
dropped, logged with its traceback and counted in /metrics, and the loop keeps serving).
"""

from __future__ import annotations

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

DEFAULT_BOOT_FILES = {
    dhcp.ARCH_X86_BIOS: "undionly.kpxe",
    dhcp.ARCH_X86_64_UEFI_BC: "ipxe.efi",
    dhcp.ARCH_X86_64_UEFI: "ipxe.efi",
    dhcp.ARCH_ARM64_UEFI: "ipxe-arm64.efi",
}
FIRMWARE_USER_CLASS = b"cidboot-firmware"


@dataclass
class DhcpConfig:
    interface: str
    server_ip: str
    netmask: str = "255.255.255.0"
    leases: LeaseDB | None = None  # None: ProxyDHCP
    boot_files: dict[int, str] = field(default_factory=lambda: dict(DEFAULT_BOOT_FILES))
    ipxe_script: str = "boot.ipxe"  # per device: boot.ipxe is rewritten by MAC in the TFTP root
    devices: Devices = field(default_factory=Devices.empty)


class DhcpServer:
    def __init__(self, cfg: DhcpConfig, metrics: Metrics, *, bind: bool = True) -> None:
        """`bind=False` opens no sockets: tests and fuzzers drive `handle()` (or set `socks`)."""
        self.cfg, self.metrics = cfg, metrics
        self.socks: list[socket.socket] = []
        self._stop = threading.Event()
        ports = ([67] if cfg.leases is not None else [67, 4011]) if bind else []
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
        leases = self.cfg.leases
        if leases is not None and not leases.allow(req.mac):
            self.metrics.inc("dhcp_errors_total", reason="rate_limited")
            log.info("rate limit: ignoring %s from %s", req.msg_name, req.mac, extra={"mac": req.mac})
            return
        policy = self.cfg.devices.lookup(req.mac, req.client_uuid)
        if not policy.allow:
            self.metrics.inc("dhcp_errors_total", reason="denied")
            log.info("device %s denied by policy", req.mac, extra={"mac": req.mac})
            return
        if self.proxy and not req.is_pxe:
            return  # the site's DHCP server answers everyone else
        boot_file = self.boot_file(req)
        on_4011 = sock.getsockname()[1] == 4011
        if req.msg_type == dhcp.DISCOVER and not on_4011:
            if leases is None:
                reply = dhcp.build_reply(req, dhcp.OFFER, server_ip=self.cfg.server_ip, siaddr=self.cfg.server_ip,
                                         boot_file=boot_file, pxe=True)
            else:
                ip = leases.offer(req.mac, req.requested_ip)
                if ip is None:
                    self.metrics.inc("dhcp_errors_total", reason="pool_exhausted")
                    log.warning("no address for %s: pool exhausted or allocation rate exceeded", req.mac)
                    return
                reply = dhcp.build_reply(req, dhcp.OFFER, server_ip=self.cfg.server_ip, yiaddr=ip, siaddr=self.cfg.server_ip,
                                         boot_file=boot_file if req.is_pxe else "", netmask=self.cfg.netmask,
                                         lease_seconds=leases.lease_seconds, pxe=req.is_pxe)
        elif req.msg_type in (dhcp.REQUEST, dhcp.INFORM):
            if leases is None:
                if req.server_id not in (None, self.cfg.server_ip) and not on_4011:
                    return
                reply = dhcp.build_reply(req, dhcp.ACK, server_ip=self.cfg.server_ip, siaddr=self.cfg.server_ip,
                                         boot_file=boot_file, pxe=True)
            else:
                if req.server_id not in (None, self.cfg.server_ip):
                    leases.release(req.mac)  # the client chose another server
                    return
                want = req.requested_ip or req.ciaddr
                if leases.bind(req.mac, want):
                    reply = dhcp.build_reply(req, dhcp.ACK, server_ip=self.cfg.server_ip, yiaddr=want, siaddr=self.cfg.server_ip,
                                             boot_file=boot_file if req.is_pxe else "", netmask=self.cfg.netmask,
                                             lease_seconds=leases.lease_seconds, pxe=req.is_pxe)
                    self.metrics.gauge("dhcp_leases_active", leases.active())
                    log.info("lease %s -> %s (%s)", want, req.mac, "iPXE" if req.is_ipxe else req.vendor_class or "dhcp",
                             extra={"mac": req.mac, "ip": want, "boot_file": boot_file})
                else:
                    reply = dhcp.build_reply(req, dhcp.NAK, server_ip=self.cfg.server_ip)
        elif req.msg_type == dhcp.RELEASE and leases is not None:
            leases.release(req.mac)
            return
        else:
            return
        dest = (addr[0], addr[1]) if on_4011 or (req.ciaddr != "0.0.0.0" and not req.flags & 0x8000) else ("255.255.255.255", 68)
        try:
            sock.sendto(reply, dest)
            self.metrics.inc("dhcp_replies_total", request=req.msg_name)
        except OSError as e:
            self.metrics.inc("dhcp_errors_total", reason="send")
            log.warning("cannot send DHCP reply to %s: %s", dest, e)

    def boot_file(self, req: dhcp.DhcpPacket) -> str:
        # iPXE and the cidboot L0 firmware (user class "cidboot-firmware") both read the script:
        # the firmware interprets its kernel/initrd lines itself (docs/boot-chain.md)
        if req.is_ipxe or req.options.get(dhcp.OPT_USER_CLASS) == FIRMWARE_USER_CLASS:
            return self.cfg.ipxe_script
        arch = req.client_arch if req.client_arch is not None else dhcp.ARCH_X86_BIOS
        return self.cfg.boot_files.get(arch, self.cfg.boot_files.get(dhcp.ARCH_X86_BIOS, ""))
