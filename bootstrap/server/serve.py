"""`bootstrap serve`: DHCP (or ProxyDHCP), TFTP and the HTTP gateway in one process.

The boot files (`undionly.kpxe`, the bootstrap kernel and initrd, the bootstrap UKI) come as a
map of served name -> file (bootstrap.bootfiles makes or finds them for the manifest's root;
`--tftp-root` overrides any of them and may add others). They are served over TFTP by name and
over HTTP at `/boot/<name>` (UEFI HTTP Boot). Two things are generated per request: `boot.ipxe`
(the iPXE script that boots the bootstrap with this device's config) and `bootconfig/<mac>.json`
(the device's boot config from devices.yaml; its `events` URL is this server's /api/events, where
the stages post their stage events). The gateway serves the block store and adds `/metrics`.
With a key broker (`--key-policy`, docs/privacy.md) its `/keys/*` endpoints are on the same HTTP
port and boot configs name it in `keys`; `--keys URL` names a broker running elsewhere instead.
With upstreams (`--upstream`) the store is a bounded, verifying cache: blocks it lacks are
fetched from the upstream gateways, so a new site's boot server starts empty.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bootstrap.bootfiles import INITRD_NAME, KERNEL_NAME
from bootstrap.server import fleet
from bootstrap.server.devices import Devices
from bootstrap.server.dhcp_server import DEFAULT_BOOT_FILES, HTTP_BOOT_PREFIX, DhcpConfig, DhcpServer, Pool
from bootstrap.server.leases import LeaseDB
from bootstrap.server.metrics import Metrics
from bootstrap.server.tftp_server import TftpServer
from cidboot.errors import CidbootError, FormatError
from cidboot.httpd import Limits
from cidboot.ipld.cid import CID
from cidboot.netboot.bootconfig import BootConfig
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.server import GatewayServer, serve_gateway
from cidboot.store.gateway.upstream import CachingStore

log = logging.getLogger("bootstrap.serve")

IPXE_SCRIPT = """#!ipxe
echo cidboot: booting the bootstrap for ${{mac}}
kernel tftp://{ip}/bootstrap/vmlinuz cidboot.config=tftp://{ip}/bootconfig/${{mac:hexhyp}}.json {cmdline}
initrd tftp://{ip}/bootstrap/initrd.img
boot
"""
#: the bootstrap initrd as two files (split_initrd): its runtime layer, then the other layers; boot.ipxe
#: lists both (iPXE loads and the kernel unpacks them in order: the same root as the one initrd)
RUNTIME_NAME, REST_NAME = "bootstrap/runtime.img", "bootstrap/initrd-rest.img"


@dataclass(frozen=True)
class SplitInitrd:
    """The bootstrap initrd cut after its runtime layer, and that layer's SHA-512 (the hint)."""

    runtime: bytes
    rest: bytes
    runtime_sha512: bytes


def split_initrd(data: bytes) -> SplitInitrd | None:
    """The bootstrap initrd as the initrds boot.ipxe lists (cidboot.trust.measure.served_initrds:
    the runtime layer alone, then the rest), cut where its own /etc/cidboot/runtime.json says the
    runtime layer ends (cidboot.stage.switch_root.runtime_prefix: its size and SHA-256 checked
    against the bytes). None for an initrd without one (made by hand, or an older build): it is
    served whole, as before, and its reference value is the one-initrd code hash."""
    from cidboot.stage.switch_root import runtime_prefix

    n = runtime_prefix(data)
    if n == 0:
        return None
    return SplitInitrd(data[:n], data[n:], hashlib.sha512(memoryview(data)[:n]).digest())


#: the bootstrap's kernel parameters when the server does not know the built ones (a --tftp-root
#: kernel): what boot.ipxe always passed before
DEFAULT_BOOTSTRAP_CMDLINE = "console=ttyS0"


class BadCmdline(FormatError):
    """A kernel command line that cannot go into boot.ipxe as it is."""


def ipxe_script(ip: str, cmdline: str = DEFAULT_BOOTSTRAP_CMDLINE, kernel_sha512: bytes | None = None,
                runtime_sha512: bytes | None = None) -> str:
    """boot.ipxe: the bootstrap's kernel and initrd with this device's config URL and the
    bootstrap's own kernel parameters (`cmdline`, its manifest's). They must be the bootstrap
    manifest's: the bootstrap keeps the running kernel for the next stage only if every parameter
    that stage asks for is already in effect (cidboot.stage.switch_root.decide), so parameters
    missing here send every BIOS iPXE boot to kexec. Refuses what iPXE would read as more than
    arguments: a line break (a new script command) or `$` (an iPXE setting expanded in place).
    `kernel_sha512` (the served kernel's) goes in as a comment iPXE skips, `#cidboot
    kernel-sha512=HEX`: our firmware then need not download a kernel it is already running
    (firmware.netboot.reuses_running_kernel; a wrong hint fails appraisal, never passes it).
    `runtime_sha512` (the initrd split after its runtime layer, split_initrd): two initrd lines,
    the runtime layer's first, and `#cidboot runtime-sha512=HEX`: our firmware then need not
    download a runtime layer it is running (firmware.netboot.reuses_running_runtime)."""
    if any(c in cmdline for c in "\r\n$") or any(w.startswith("cidboot.config=") for w in cmdline.split()):
        raise BadCmdline(f"bootstrap command line {cmdline!r} cannot go into boot.ipxe: no line breaks, "
                         "no '$', no cidboot.config= of its own (the server adds the device's)")
    script = IPXE_SCRIPT.format(ip=ip, cmdline=" ".join(cmdline.split()))
    hints = []
    if kernel_sha512 is not None:
        hints.append(f"#cidboot kernel-sha512={kernel_sha512.hex()}\n")
    if runtime_sha512 is not None:
        hints.append(f"#cidboot runtime-sha512={runtime_sha512.hex()}\n")
        script = script.replace(f"initrd tftp://{ip}/bootstrap/initrd.img\n",
                                f"initrd tftp://{ip}/{RUNTIME_NAME}\ninitrd tftp://{ip}/{REST_NAME}\n")
    head, rest = script.split("\n", 1)
    return f"{head}\n{''.join(hints)}{rest}"


def _stat_key(path: Path | None) -> tuple[int, int, int] | None:
    """What identifies a served file's version (inode, size, mtime), or None when it is not there."""
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class ServeConfig:
    interface: str
    server_ip: str
    store: Path
    manifest: CID
    tftp_root: Path | None
    dhcp_range: tuple[str, str] | None = None  # None: ProxyDHCP
    http_port: int = 8080
    tftp_port: int = 69
    devices: Devices | None = None
    trust_anchor: dict[str, Any] | None = None
    state_dir: Path | None = None
    agent_port: int = 8000
    device_registry: CID | None = None
    gateways: tuple[str, ...] = ()  # what boot configs list; empty: this server's own ("self")
    boot_files: dict[str, Path] = field(default_factory=dict)  # served name -> file (bootstrap.bootfiles)
    relay_ranges: tuple[tuple[str, str, int], ...] = ()  # (first, last, prefix) of subnets behind relays
    netmask: str = "255.255.255.0"  # of the local range's subnet
    upstreams: tuple[str, ...] = ()  # gateways missing blocks are fetched from (verified, cached)
    cache_max: int | None = None  # bound on unpinned cached bytes with upstreams (None: unbounded)
    upstream_timeout: float = 10.0  # per upstream block request
    pin_manifest: bool = False  # fetch the manifest's whole DAG at start and pin it (boots survive the uplink)
    publish: str | None = None  # where agents publish results ("cluster=URL[,replication=..]"): into boot configs
    bootstrap_cmdline: str = DEFAULT_BOOTSTRAP_CMDLINE  # the bootstrap manifest's kernel parameters, into boot.ipxe
    key_broker: Any = None  # a cidboot.trust.private.broker.KeyBroker mounted at /keys/* (bootstrap serve --key-policy)
    keys_url: str | None = None  # a key broker elsewhere (bootstrap serve --keys), put into boot configs


def mount(*apps: Any) -> Callable[[Any], bool]:
    """One gateway app from several (cidboot.store.gateway.server.App): each is asked in turn,
    the first that answers (True) wins."""
    def app(h: Any) -> bool:
        return any(a(h) for a in apps)
    return app


def open_store(cfg: ServeConfig) -> Blockstore:
    """The store the gateway serves: the local one, or with `--upstream` a bounded verifying
    cache in front of the upstream gateways (cidboot.store.gateway.upstream)."""
    if not cfg.upstreams:
        return Blockstore(cfg.store)
    return CachingStore(cfg.store, cfg.upstreams, max_bytes=cfg.cache_max, timeout=cfg.upstream_timeout)


def boot_gateways(listed: tuple[str, ...], own_url: str) -> tuple[str, ...]:
    """The gateways a boot config lists, in the order devices try them: `--gateway` as given
    ("self" is this server), or this server alone. For fail-over put the site's boot server
    first (`--gateway self --gateway http://peer:8080 ...`): the bootstrap asks in order and
    marks a dead one down for the rest of a fetch. Without "self" the server is not listed at
    all (a deliberate choice, e.g. to send devices to a gateway under test)."""
    return tuple(own_url if g == "self" else g for g in listed) or (own_url,)


def pin_dag(store: Blockstore, root: CID) -> bool:
    """Fetch `root`'s whole DAG into `store` (through its upstreams when it is a cache) and pin
    it, so the site can boot it with its uplink down and the cache never evicts it. Logs and
    returns False on failure: the server keeps serving (devices then pull through the cache)."""
    t0 = time.monotonic()
    try:
        store.pin(root)
    except CidbootError as e:
        log.error("could not pin the manifest %s: %s", root, e, extra={"cid": str(root), "error": str(e)})
        return False
    log.info("manifest %s pinned in %.1f s", root, time.monotonic() - t0, extra={"cid": str(root)})
    return True


def cache_gauges(store: Blockstore) -> list[tuple[str, float]]:
    """The /metrics gauges of a caching store (none for a plain one): upstream_bytes_total is
    what the site pulled over its uplink, each block once however many devices asked."""
    if not isinstance(store, CachingStore):
        return []
    u = store.stats
    return [("upstream_blocks_total", u.blocks), ("upstream_bytes_total", u.bytes),
            ("upstream_failures_total", u.failures), ("upstream_rejected_total", u.rejected),
            ("upstream_coalesced_total", u.coalesced), ("upstream_marked_down_total", u.marked_down),
            ("cache_evictions_total", u.evictions), ("cache_evicted_bytes_total", u.evicted_bytes),
            ("cache_bytes", store.cached_bytes)]


class BootServer:
    def __init__(self, cfg: ServeConfig, store: Blockstore | None = None) -> None:
        self.cfg = cfg
        self._ipxe_script = ipxe_script(cfg.server_ip, cfg.bootstrap_cmdline).encode()  # bad: refused before any bind
        self._ipxe_hinted: tuple[object, bytes] | None = None  # (kernel and initrd file stats, script)
        self._split: tuple[object, SplitInitrd | None] | None = None  # (initrd file stat, its split)
        self.metrics = Metrics()
        self.devices = cfg.devices or Devices.empty()
        leases = None
        if cfg.dhcp_range:
            lease_file = (cfg.state_dir / "leases.json") if cfg.state_dir else None
            leases = LeaseDB(*cfg.dhcp_range, path=lease_file, reservations=self.devices.reservations())
        self.leases = leases
        pools = []
        for first, last, prefix in cfg.relay_ranges:
            net = ipaddress.IPv4Network(f"{first}/{prefix}", strict=False)
            lease_file = (cfg.state_dir / f"leases-{net.network_address}-{prefix}.json") if cfg.state_dir else None
            res = {m: ip for m, ip in self.devices.reservations().items() if ipaddress.IPv4Address(ip) in net}
            pools.append(Pool(net, LeaseDB(first, last, path=lease_file, reservations=res)))
        routes = {"/metrics": self.render_metrics}
        for name, path in cfg.boot_files.items():
            routes[f"/{HTTP_BOOT_PREFIX}{name}"] = self._file_route(path)
        store = store if store is not None else open_store(cfg)  # the one the boot files were built from
        self.store = store
        self.fleet = fleet.from_serve_config(cfg, store, self.devices)  # the web view and /api/ (docs/boot-server.md)
        app: Any = self.fleet
        limits = None
        if cfg.key_broker is not None:  # the key broker beside the fleet view, on the same port
            from bootstrap.server.keys import LIMITS as KEY_LIMITS
            from bootstrap.server.keys import KeyService

            app = mount(self.fleet, KeyService(cfg.key_broker))
            limits = replace(Limits(), max_body=KEY_LIMITS.max_body)  # a key request carries evidence
        self.gateway: GatewayServer = serve_gateway(store, "0.0.0.0", cfg.http_port, extra_routes=routes, app=app,
                                                    limits=limits)
        # offer a boot file only for the architectures whose file exists (`serve --arch` names those made at start)
        offers = {arch: name for arch, name in DEFAULT_BOOT_FILES.items() if self._has_file(name)}
        for arch, name in sorted(DEFAULT_BOOT_FILES.items()):
            if arch not in offers:
                log.warning("no offers for client architecture %d: no %s (not among `serve --arch`, "
                            "nor in --tftp-root)", arch, name, extra={"arch": arch, "file": name})
        self.dhcp = DhcpServer(DhcpConfig(cfg.interface, cfg.server_ip, netmask=cfg.netmask, leases=leases,
                                          devices=self.devices, boot_files=offers, relay_pools=pools,
                                          http_url=f"http://{cfg.server_ip}:{self.gateway.server_address[1]}"),
                               self.metrics)
        self.tftp = TftpServer(cfg.tftp_root or Path("/nonexistent"), "0.0.0.0", cfg.tftp_port, metrics=self.metrics,
                               generator=self.generate)
        self._threads: list[threading.Thread] = []

    def _has_file(self, name: str) -> bool:
        return name in self.cfg.boot_files or (self.cfg.tftp_root is not None and (self.cfg.tftp_root / name).is_file())

    @staticmethod
    def _file_route(path: Path) -> Callable[[], tuple[int, str, bytes]]:
        def route() -> tuple[int, str, bytes]:
            return 200, "application/efi" if path.suffix == ".efi" else "application/octet-stream", path.read_bytes()
        return route

    @property
    def gateway_url(self) -> str:
        return f"http://{self.cfg.server_ip}:{self.gateway.server_address[1]}"

    def render_metrics(self) -> tuple[int, str, bytes]:
        g = self.gateway.metrics
        self.metrics.gauge("http_requests_total", g.requests)
        self.metrics.gauge("http_bytes_total", g.bytes_sent)
        self.metrics.gauge("http_errors_total", g.errors)
        st = self.gateway.stats  # the bounded HTTP front (cidboot.httpd)
        for name in ("connections", "busy_rejected", "timeouts", "bodies_refused", "internal_errors", "client_gone"):
            self.metrics.gauge(f"http_{name}_total", getattr(st, name))
        for name, value in cache_gauges(self.store):
            self.metrics.gauge(name, value)
        if self.leases is not None or self.dhcp.cfg.relay_pools:
            self.metrics.gauge("dhcp_leases_active", self.dhcp.active_leases())
        return 200, "text/plain; version=0.0.4", self.metrics.render().encode()

    def initrd_split(self) -> SplitInitrd | None:
        """The served bootstrap initrd split after its runtime layer (split_initrd), redone when
        the file changes; None when it has no runtime layer to split off."""
        initrd = self.cfg.boot_files.get(INITRD_NAME)
        key = _stat_key(initrd)
        if key is None or initrd is None:
            return None
        cached = self._split
        if cached is None or cached[0] != key:
            cached = self._split = (key, split_initrd(initrd.read_bytes()))
        return cached[1]

    def ipxe_script(self) -> bytes:
        """boot.ipxe with the SHA-512 of the kernel served now (bootstrap/vmlinuz) and, for an initrd
        that splits after its runtime layer, the two initrds and that layer's SHA-512; redone when a
        file changes (a stale hint would only make firmware boots fail appraisal)."""
        kernel = self.cfg.boot_files.get(KERNEL_NAME)
        kkey = _stat_key(kernel)
        split = self.initrd_split()
        if kkey is None and split is None:
            return self._ipxe_script
        key = (kkey, self._split[0] if self._split is not None and split is not None else None)
        cached = self._ipxe_hinted
        if cached is None or cached[0] != key:
            digest = None
            if kernel is not None and kkey is not None:
                with open(kernel, "rb") as f:
                    digest = hashlib.file_digest(f, "sha512").digest()
            cached = self._ipxe_hinted = (key, ipxe_script(self.cfg.server_ip, self.cfg.bootstrap_cmdline, digest,
                                                           split.runtime_sha512 if split else None).encode())
        return cached[1]

    def generate(self, name: str, peer: tuple[str, int]) -> bytes | Path | None:
        if name in self.cfg.boot_files:  # resolved already: a --tftp-root file overrides the built one
            return self.cfg.boot_files[name]
        if name == "boot.ipxe":
            return self.ipxe_script()
        if name in (RUNTIME_NAME, REST_NAME):
            split = self.initrd_split()
            if split is None:
                return None
            return split.runtime if name == RUNTIME_NAME else split.rest
        if name.startswith("bootconfig/") and name.endswith(".json"):
            mac = name[len("bootconfig/") : -len(".json")].replace("-", ":").lower()
            pol = self.devices.lookup(mac, None)
            if not pol.allow:
                return None
            manifest = CID.parse(pol.manifest) if pol.manifest else self.cfg.manifest
            gateways = boot_gateways(self.cfg.gateways, self.gateway_url)
            return BootConfig(manifest, gateways, self.cfg.trust_anchor or {}, pol.role,
                              peers=self.peers(mac), device_registry=self.cfg.device_registry,
                              publish=self.cfg.publish, events=f"{self.gateway_url}{fleet.EVENTS_PATH}",
                              keys=self.keys_url).encode()
        return None

    @property
    def keys_url(self) -> str | None:
        """The key broker devices ask (boot config `keys`): this server when it runs one, else
        `--keys`, else none (an encrypted manifest then cannot boot, and the bootstrap says so)."""
        return self.gateway_url if self.cfg.key_broker is not None else self.cfg.keys_url

    def peers(self, mac: str) -> dict[str, tuple[str, ...]]:
        """role -> agent URLs of the other devices with fixed addresses in devices.yaml: where an
        agent sends the inputs its flow hands to another role (it attests them before sending)."""
        out: dict[str, list[str]] = {}
        for other, pol in sorted(self.devices.by_mac.items()):
            if other != mac and pol.ip and pol.allow:
                out.setdefault(pol.role, []).append(f"http://{pol.ip}:{self.cfg.agent_port}")
        return {role: tuple(urls) for role, urls in out.items()}

    def start(self) -> None:
        # boot.ipxe's hints now (the kernel's SHA-512, the initrd's split: decompressing it takes a
        # fraction of a second), not while the first device waits for its script
        self.ipxe_script()
        for target in (self.dhcp.serve_forever, self.tftp.serve_forever, self.gateway.serve_forever):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        self.fleet.start()
        if self.cfg.pin_manifest:  # in the background: devices may boot (through the cache) meanwhile
            t = threading.Thread(target=pin_dag, args=(self.store, self.cfg.manifest), name="pin-manifest", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("boot server up", extra={"interface": self.cfg.interface, "ip": self.cfg.server_ip,
                                          "mode": "dhcp" if self.cfg.dhcp_range else "proxydhcp",
                                          "tftp_port": self.tftp.port, "http": self.gateway_url})

    def stop(self) -> None:
        self.fleet.stop()
        self.dhcp.shutdown()
        self.tftp.shutdown()
        self.gateway.shutdown()
        self.gateway.server_close()
