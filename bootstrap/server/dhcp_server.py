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
import socket
import time
from dataclasses import dataclass, field

from bootstrap.server.devices import Devices
from bootstrap.server.leases import LeaseDB
from bootstrap.server.metrics import Metrics
from cidboot.errors import FormatError
from cidboot.httpd_lite import StopBell
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
BATCH = 64  # datagrams read per socket before the batch's bindings are synced and its replies sent
BOOTSTRAP_USER_CLASS = b"cidboot-bootstrap"


def bootconfig_path(mac: str) -> str:
    """The TFTP path of a device's boot config (generated per request by the boot server)."""
    return f"bootconfig/{mac.lower().replace(':', '-')}.json"


@dataclass
class Pool:
    """The lease pool of one subnet a relay serves (`--dhcp-range` beyond the local one)."""

    network: ipaddress.IPv4Network
    leases: LeaseDB


@dataclass(frozen=True)
class Reply:
    """A reply ready to send: the packet, its destination, the request type (for /metrics) and
    whether it acknowledges a binding (then it is sent only once the lease journal is synced)."""

    packet: bytes
    dest: tuple[str, int]
    request: str
    durable: bool = False


@dataclass(frozen=True)
class _Scope:
    """Where a request is answered from: its lease pool (None: ProxyDHCP), router and netmask."""

    leases: LeaseDB | None
    router: str | None
    netmask: str


@dataclass(frozen=True)
class _Ask:
    """A request that passed screening, with what every reply to it carries."""

    req: dhcp.DhcpPacket
    scope: _Scope
    boot_file: str
    netboot: bool
    vendor: bytes


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
        self._bell = StopBell(wait_for_start=False)
        self._gauge_at = -1.0  # when the active-leases gauge was last refreshed (monotonic)
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
        """Answer in batches: read every datagram already queued (up to BATCH), answer each, make
        the batch's bindings durable with one fsync of each lease journal (group commit), then
        send the replies. An ACK is never sent before its binding is on disk, and a burst of
        REQUESTs shares one fsync instead of paying one each."""
        self._bell.serve(self.socks, self._answer_batch)  # asleep until a datagram or `shutdown`

    def _answer_batch(self, ready: list[socket.socket]) -> None:
        outbox: list[tuple[socket.socket, Reply]] = []
        for s in ready:
            self._drain(s, outbox)
        self._commit_and_send(outbox)

    def _drain(self, s: socket.socket, outbox: list[tuple[socket.socket, Reply]]) -> None:
        """Answer up to BATCH datagrams queued on `s` into `outbox`; one failing request is logged,
        counted and skipped."""
        for _ in range(BATCH):
            try:
                data, addr = s.recvfrom(4096, socket.MSG_DONTWAIT)
            except OSError:  # nothing more queued (EAGAIN), or the socket is closed
                return
            try:
                reply = self.respond(s, data, addr)
            except Exception as e:  # one request never stops DHCP for everyone
                self.metrics.request_failed("dhcp", e, addr[0], log)
                continue
            if reply is not None:
                outbox.append((s, reply))

    def shutdown(self) -> None:
        """Stop answering and close the sockets: returns once a running `serve_forever` has
        returned (its last batch answered), at once when none runs (one that starts later
        returns at once)."""
        self._bell.stop()
        for s in self.socks:
            s.close()
        self._bell.close()

    def handle(self, sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
        """Answer one datagram now (its binding durable before the reply goes out)."""
        reply = self.respond(sock, data, addr)
        if reply is not None:
            self._commit_and_send([(sock, reply)])

    def respond(self, sock: socket.socket, data: bytes, addr: tuple[str, int]) -> Reply | None:
        """The reply to one datagram and where it goes, or None (no answer). A binding it makes is
        written to its lease journal but not yet fsynced: the caller syncs before it sends."""
        req = self._screen(data, addr)
        if req is None:
            return None
        scope = self._scope(req)
        if scope is None or not self._admit(req, scope.leases):
            return None
        netboot = req.is_pxe or req.is_http_boot
        boot_file = self._boot_file_or_none(req, netboot)
        if boot_file is None:
            return None
        on_4011 = sock.getsockname()[1] == 4011
        ask = _Ask(req, scope, boot_file, netboot, b"HTTPClient" if req.is_http_boot else b"PXEClient")
        answer = self._answer(ask, on_4011)
        if answer is None:
            return None
        packet, durable = answer
        return Reply(packet, self.destination(req, addr, on_4011), req.msg_name, durable)

    def _screen(self, data: bytes, addr: tuple[str, int]) -> dhcp.DhcpPacket | None:
        """Parse and count a datagram; None for a malformed one (logged) or a reply (op 2)."""
        try:
            req = dhcp.parse(data)
        except FormatError as e:
            self.metrics.inc("dhcp_errors_total", reason="malformed")
            log.warning("dropped malformed DHCP packet from %s: %s", addr[0], e, extra={"peer": addr[0], "error": str(e)})
            return None
        if req.op != 1:
            return None
        self.metrics.inc("dhcp_requests_total", type=req.msg_name)
        return req

    def _scope(self, req: dhcp.DhcpPacket) -> _Scope | None:
        """The pool, router and netmask a request is answered from: a relayed one's from the pool of
        giaddr's subnet (None, logged, when there is none), a local one's from the local range."""
        if req.giaddr == "0.0.0.0" or self.proxy:
            return _Scope(self.cfg.leases, None, self.cfg.netmask)
        pool = self.pool_for(req.giaddr)
        if pool is None:
            self.metrics.inc("dhcp_errors_total", reason="no_range_for_relay")
            log.warning("no --dhcp-range for relay %s's subnet: ignoring %s from %s", req.giaddr, req.msg_name,
                        req.mac, extra={"mac": req.mac, "giaddr": req.giaddr})
            return None
        return _Scope(pool.leases, req.giaddr, str(pool.network.netmask))

    def _admit(self, req: dhcp.DhcpPacket, leases: LeaseDB | None) -> bool:
        """Whether to answer this client at all: its rate limit, the device policy, and (as a
        ProxyDHCP) whether it network-boots; every refusal but the last is logged and counted."""
        if leases is not None and not leases.allow(req.mac):
            self.metrics.inc("dhcp_errors_total", reason="rate_limited")
            log.info("rate limit: ignoring %s from %s", req.msg_name, req.mac, extra={"mac": req.mac})
            return False
        if not self.cfg.devices.lookup(req.mac, req.client_uuid).allow:
            self.metrics.inc("dhcp_errors_total", reason="denied")
            log.info("device %s denied by policy", req.mac, extra={"mac": req.mac})
            return False
        return not (self.proxy and not (req.is_pxe or req.is_http_boot))  # the site's DHCP answers the rest

    def _boot_file_or_none(self, req: dhcp.DhcpPacket, netboot: bool) -> str | None:
        """The boot file to offer ("" for a client that does not network-boot), or None (logged,
        counted) when the client's architecture has none."""
        boot_file = self.boot_file(req) if netboot or self.is_bootstrap(req) else ""
        if boot_file is None:
            arch = req.client_arch
            self.metrics.inc("dhcp_errors_total", reason="no_boot_file")
            log.warning("no offer for %s: client architecture %s (%s) has no boot file%s", req.mac,
                        f"{arch:#x}" if arch is not None else "none",
                        dhcp.ARCH_NAMES.get(arch, "unknown") if arch is not None else "unknown",
                        " (this server does not offer arm64: `bootstrap serve --arch arm64`)"
                        if arch in (dhcp.ARCH_ARM64_UEFI, dhcp.ARCH_ARM64_UEFI_HTTP) else "",
                        extra={"mac": req.mac, "arch": arch})
        return boot_file

    def _answer(self, ask: _Ask, on_4011: bool) -> tuple[bytes, bool] | None:
        """The reply packet for a screened request and whether it needs its binding durable first."""
        t = ask.req.msg_type
        if on_4011:  # PXE boot server discovery (PXE 2.1): boot information only, never an address
            return (self._boot_info(ask, dhcp.ACK), False) if t in (dhcp.REQUEST, dhcp.INFORM) else None
        leases = ask.scope.leases
        if leases is None:
            return self._answer_proxy(ask)
        if t == dhcp.DISCOVER:
            return self._offer(ask, leases)
        if t in (dhcp.REQUEST, dhcp.INFORM):
            return self._ack(ask, leases)
        if t == dhcp.RELEASE:
            leases.release(ask.req.mac, sync=False)
        return None

    def _answer_proxy(self, ask: _Ask) -> tuple[bytes, bool] | None:
        """ProxyDHCP: boot information for a DISCOVER, and for a REQUEST meant for us."""
        t = ask.req.msg_type
        if t == dhcp.DISCOVER:
            return self._boot_info(ask, dhcp.OFFER), False
        if t in (dhcp.REQUEST, dhcp.INFORM) and ask.req.server_id in (None, self.cfg.server_ip):
            return self._boot_info(ask, dhcp.ACK), False
        return None

    def _boot_info(self, ask: _Ask, msg_type: int) -> bytes:
        """A reply with boot information and no address (ProxyDHCP, port 4011)."""
        return dhcp.build_reply(ask.req, msg_type, server_ip=self.cfg.server_ip, siaddr=self.cfg.server_ip,
                                boot_file=ask.boot_file, pxe=True, vendor_class=ask.vendor)

    def _with_address(self, ask: _Ask, msg_type: int, ip: str, leases: LeaseDB) -> bytes:
        """An OFFER or ACK of `ip` with its lease time, netmask, router and boot information."""
        return dhcp.build_reply(ask.req, msg_type, server_ip=self.cfg.server_ip, yiaddr=ip, siaddr=self.cfg.server_ip,
                                boot_file=ask.boot_file, netmask=ask.scope.netmask, lease_seconds=leases.lease_seconds,
                                pxe=ask.netboot, vendor_class=ask.vendor, router=ask.scope.router)

    def _offer(self, ask: _Ask, leases: LeaseDB) -> tuple[bytes, bool] | None:
        ip = leases.offer(ask.req.mac, ask.req.requested_ip)
        if ip is None:
            self.metrics.inc("dhcp_errors_total", reason="pool_exhausted")
            log.warning("no address for %s: pool exhausted or allocation rate exceeded", ask.req.mac)
            return None
        return self._with_address(ask, dhcp.OFFER, ip, leases), False

    def _ack(self, ask: _Ask, leases: LeaseDB) -> tuple[bytes, bool] | None:
        """Bind the address the client asks for (ACK, after the binding is durable) or NAK it; a
        REQUEST for another server releases what we offered."""
        req = ask.req
        if req.server_id not in (None, self.cfg.server_ip):
            leases.release(req.mac, sync=False)  # the client chose another server
            return None
        want = req.requested_ip or req.ciaddr
        if not leases.bind(req.mac, want, sync=False):
            return dhcp.build_reply(req, dhcp.NAK, server_ip=self.cfg.server_ip), False
        self._leases_changed()
        log.info("lease %s -> %s (%s)%s", want, req.mac, "iPXE" if req.is_ipxe else req.vendor_class or "dhcp",
                 f" via relay {req.giaddr}" if ask.scope.router else "",
                 extra={"mac": req.mac, "ip": want, "boot_file": ask.boot_file, "giaddr": req.giaddr})
        return self._with_address(ask, dhcp.ACK, want, leases), True

    def _leases_changed(self) -> None:
        """Refresh the active-leases gauge, at most once a second: counting is O(leases), and
        /metrics (serve.py) counts afresh when it renders."""
        now = time.monotonic()
        if now - self._gauge_at >= 1.0:
            self._gauge_at = now
            self.metrics.gauge("dhcp_leases_active", self.active_leases())

    def _commit_and_send(self, outbox: list[tuple[socket.socket, Reply]]) -> None:
        """Make the batch's bindings durable, then send its replies. If the journal cannot be
        written, the ACKs that needed it are dropped (logged, counted): the clients ask again."""
        durable = self._sync_leases() if any(reply.durable for _, reply in outbox) else True
        for sock, reply in outbox:
            if durable or not reply.durable:
                self._send(sock, reply)

    def _sync_leases(self) -> bool:
        """fsync every lease journal written since the last sync; False (logged, counted) if one fails."""
        try:
            for leases in self._all_leases():
                leases.sync()
        except OSError as e:
            self.metrics.inc("dhcp_errors_total", reason="lease_write")
            log.error("cannot write the lease journal: %s; not acknowledging this batch's bindings", e,
                      extra={"error": str(e)})
            return False
        return True

    def _send(self, sock: socket.socket, reply: Reply) -> None:
        try:
            sock.sendto(reply.packet, reply.dest)
            self.metrics.inc("dhcp_replies_total", request=reply.request)
        except OSError as e:
            self.metrics.inc("dhcp_errors_total", reason="send")
            log.warning("cannot send DHCP reply to %s: %s", reply.dest, e)

    def _all_leases(self) -> list[LeaseDB]:
        return [p.leases for p in self.cfg.relay_pools] + ([self.cfg.leases] if self.cfg.leases else [])

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
        return sum(p.active() for p in self._all_leases())

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
