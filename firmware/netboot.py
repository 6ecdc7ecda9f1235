"""The firmware's network boot client: NIC + DHCP with PXE options, TFTP (cidboot.netboot.tftp_client,
with RFC 7440 windowsize), and the part of iPXE's script language that boot.ipxe uses, so iPXE
and this firmware boot the same files from one script (docs/boot-chain.md).

Each step is a function of its own, testable on the host in a network namespace against the
real boot server (tests/unit/test_firmware_netboot.py).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cidboot.errors import CidbootError, FormatError
from cidboot.netboot import dhcp, dhcp_client, netif, tftp_client

USER_CLASS = b"cidboot-firmware"  # the boot server answers it with boot.ipxe (bootstrap/server/dhcp_server.py)
VENDOR_CLASS = b"PXEClient:Arch:00007:UNDI:003016"
BLKSIZE = 1468  # fits a 1500-byte MTU: 1468 + 4 (TFTP) + 8 (UDP) + 20 (IP)
WINDOWSIZE = 16  # RFC 7440; under 20 % loss larger windows mostly resend the tail of a broken window


class NetbootError(CidbootError):
    """The network boot could not fetch what it needs (names the step and the file)."""


class ScriptError(FormatError):
    """boot.ipxe uses something this firmware does not interpret (names the line)."""


@dataclass(frozen=True)
class Network:
    """The boot NIC once configured: its name, MAC and the lease it holds."""

    ifname: str
    mac: str
    lease: dhcp_client.Lease


def network_up(ifname: str | None = None, *, log: Callable[[str], None] = lambda _m: None,
               carrier_timeout: float = 15.0, **dhcp_kw: object) -> Network:
    """Bring up the boot NIC, get a lease as a PXE client (user class "cidboot-firmware") and
    configure the address. `dhcp_kw` goes to cidboot.netboot.dhcp_client.acquire (attempts, timeout...)."""
    name, mac = netif.bring_up(ifname, carrier_timeout=carrier_timeout)
    lease = dhcp_client.acquire(name, mac, vendor_class=VENDOR_CLASS, arch=dhcp.ARCH_X86_64_UEFI_BC,
                                user_class=USER_CLASS, log=log, **dhcp_kw)  # type: ignore[arg-type]
    netif.configure(name, lease.ip, lease.prefixlen, router=lease.router)
    _fast_arp(name)
    return Network(name, mac, lease)


ARP_RETRANS_MS = 100


def _fast_arp(ifname: str) -> None:
    """Re-send ARP requests every 100 ms instead of the kernel's 1 s: the first TFTP request waits
    for the server's MAC, and on a lossy boot network a lost ARP packet otherwise costs a second
    (or several) before the first file even starts. Only the boot NIC, only until the hand-off."""
    try:
        with open(f"/proc/sys/net/ipv4/neigh/{ifname}/retrans_time_ms", "w") as f:
            f.write(str(ARP_RETRANS_MS))
    except OSError:
        pass  # no procfs: the kernel default still works, only slower under loss


def tftp_get(server: str, path: str, *, port: int = 69, blksize: int = BLKSIZE, windowsize: int = WINDOWSIZE,
             timeout: float = 0.3, retries: int = 10, attempts: int = 3,
             progress: tftp_client.Progress | None = None, stats: dict[str, int] | None = None) -> bytes:
    """One file over TFTP (RFC 1350 + blksize 2348, tsize 2349, windowsize 7440), in memory.

    cidboot.netboot.tftp_client drives recovery: it ACKs a gap at once so the server restarts its window
    there, and re-sends its last ACK after an adaptive timeout (from `timeout` s, following the
    round trip), `retries` times in a row. A transfer that still times out is started again,
    `attempts` times; a server's ERROR (no such file...) is final.
    """
    name = path.lstrip("/")
    last: Exception | None = None
    for _ in range(attempts):
        try:
            return tftp_client.get(server, name, port=port, blksize=blksize, windowsize=windowsize,
                                   timeout=timeout, retries=retries, progress=progress, stats=stats)
        except tftp_client.TftpServerError as e:
            raise NetbootError(f"TFTP {e}") from e
        except (tftp_client.TftpError, OSError) as e:
            last = e
    raise NetbootError(f"TFTP tftp://{server}/{name}: {last}")


def tftp_url(url: str) -> tuple[str, int, str]:
    """(host, port, path) of a tftp:// URL; anything else is refused (we only boot over TFTP)."""
    u = urlsplit(url)
    if u.scheme != "tftp" or not u.hostname or not u.path.strip("/"):
        raise ScriptError(f"only tftp://HOST/PATH URLs are supported, got {url!r}")
    return u.hostname, u.port or 69, u.path.lstrip("/")


@dataclass(frozen=True)
class BootSpec:
    """What boot.ipxe tells us to boot: the kernel URL and its arguments, the initrd URLs in order."""

    kernel: str
    cmdline: str
    initrds: tuple[str, ...] = field(default_factory=tuple)
    #: the server's hint (`#cidboot kernel-sha512=HEX`, a comment iPXE skips): the SHA-512 of the
    #: kernel at `kernel`. Untrusted: it only lets the firmware skip downloading a kernel it is
    #: already running (`reuses_running_kernel`); what is measured is what then runs.
    kernel_sha512: bytes | None = None
    #: the server's hint (`#cidboot runtime-sha512=HEX`): the SHA-512 of the first initrd, the
    #: bootstrap's runtime layer. Untrusted too: it only lets the firmware skip downloading a
    #: runtime layer it is running (`reuses_running_runtime`); what is measured is what then runs.
    runtime_sha512: bytes | None = None

    @property
    def config_url(self) -> str | None:
        """The boot config named on the command line (cidboot.config=URL), if any."""
        for arg in self.cmdline.split():
            if arg.startswith("cidboot.config="):
                return arg.split("=", 1)[1]
        return None


_VAR = re.compile(r"\$\{([^}]*)\}")
HINT_PREFIX = "#cidboot kernel-sha512="  # bootstrap.server.serve.ipxe_script writes it
RUNTIME_HINT_PREFIX = "#cidboot runtime-sha512="  # and this one when it lists the runtime layer as the first initrd


def parse_hint(line: str, prefix: str = HINT_PREFIX) -> bytes | None:
    """The SHA-512 of a `#cidboot kernel-sha512=HEX` comment (`prefix`: or of another hint), or
    None for any other line (a malformed hint is no hint: it can only ever save a download, never
    change a decision)."""
    line = line.strip()
    if not line.startswith(prefix):
        return None
    try:
        value = bytes.fromhex(line[len(prefix):])
    except ValueError:
        return None
    return value if len(value) == 64 else None


def expand(text: str, variables: dict[str, str]) -> str:
    """iPXE ${...} expansion for the settings we know; an unknown one is an error, never ''."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in variables:
            raise ScriptError(f"unknown iPXE setting ${{{name}}}")
        return variables[name]

    return _VAR.sub(sub, text)


def ipxe_variables(mac: str, ip: str = "", next_server: str = "") -> dict[str, str]:
    mac = mac.lower()
    out = {"mac": mac, "mac:hexhyp": mac.replace(":", "-"), "mac:hex": mac, "ip": ip, "next-server": next_server}
    out.update({f"net0/{k}": v for k, v in list(out.items())})
    return out


def parse_script(script: str, variables: dict[str, str]) -> BootSpec:
    """Interpret boot.ipxe: `kernel URL ARGS...`, `initrd URL` (repeatable), `boot`; `echo`,
    comments and blank lines are skipped. Anything else is refused: a script we would half
    understand could boot something other than what iPXE boots."""
    lines = script.splitlines()
    if not lines or not lines[0].strip().startswith("#!ipxe"):
        raise ScriptError("not an iPXE script (no #!ipxe first line)")
    kernel, cmdline, initrds, hint, runtime_hint = None, "", [], None, None
    for n, line in enumerate(lines[1:], start=2):
        words = line.split(None, 1)
        if words and words[0].startswith("#"):
            hint = parse_hint(line) or hint
            runtime_hint = parse_hint(line, RUNTIME_HINT_PREFIX) or runtime_hint
            continue
        if not words or words[0] in ("echo", "boot"):
            continue
        cmd, rest = words[0], words[1] if len(words) > 1 else ""
        if cmd in ("kernel", "chain", "imgexec"):
            parts = expand(rest, variables).split(None, 1)
            if not parts or parts[0].startswith("-"):
                raise ScriptError(f"line {n}: {cmd} needs a URL (options are not supported)")
            if kernel is not None:
                raise ScriptError(f"line {n}: a second kernel")
            kernel, cmdline = parts[0], parts[1] if len(parts) > 1 else ""
        elif cmd in ("initrd", "module"):
            url = expand(rest, variables).strip()
            if not url or url.startswith("-") or " " in url:
                raise ScriptError(f"line {n}: initrd takes exactly one URL")
            initrds.append(url)
        else:
            raise ScriptError(f"line {n}: unsupported iPXE command {cmd!r}")
    if kernel is None:
        raise ScriptError("the script names no kernel")
    for url in (kernel, *initrds):
        tftp_url(url)
    return BootSpec(kernel, cmdline.strip(), tuple(initrds), hint, runtime_hint)


@dataclass(frozen=True)
class Fetched:
    """Everything fetched for the next stage, as bytes, with the time each took. `kernel` is None
    when it was not fetched because it is the kernel already running (`reuses_running_kernel`):
    `running_kernel` is then that kernel's SHA-512, from this image's own kernel.sha512.
    `initrd` is the script's initrds concatenated, `initrd_sizes` the size of each (empty: one);
    None for the first: the runtime layer, not fetched because it is the one running
    (`reuses_running_runtime`), `running_runtime` then its SHA-512 from this image's runtime.json,
    and `initrd` the others only."""

    script: bytes
    spec: BootSpec
    kernel: bytes | None
    initrd: bytes
    bootconfig: bytes
    timings: dict[str, float] = field(default_factory=dict, compare=False)
    running_kernel: bytes | None = None
    initrd_sizes: tuple[int | None, ...] = ()
    running_runtime: bytes | None = None

    def kernel_sha512(self) -> bytes:
        """The SHA-512 of the kernel the next stage runs on: the fetched bytes', or the running one's."""
        if self.kernel is not None:
            return hashlib.sha512(self.kernel).digest()
        if self.running_kernel is None:
            raise NetbootError("no kernel: neither fetched nor the running one")
        return self.running_kernel

    @property
    def runtime_skipped(self) -> bool:
        return bool(self.initrd_sizes) and self.initrd_sizes[0] is None

    def initrd_sha512s(self) -> list[bytes]:
        """The SHA-512 of each initrd the script lists, in order: of the fetched bytes, or the
        running runtime layer's for one not fetched."""
        sizes = self.initrd_sizes or (len(self.initrd),)
        view, off, out = memoryview(self.initrd), 0, []
        for n in sizes:
            if n is None:
                if self.running_runtime is None:
                    raise NetbootError("no runtime layer: neither fetched nor the running one")
                out.append(self.running_runtime)
                continue
            out.append(hashlib.sha512(view[off:off + n]).digest())
            off += n
        if off != len(self.initrd):
            raise NetbootError(f"initrd sizes {sizes} do not add up to {len(self.initrd)} bytes")
        return out


def reuses_running_kernel(spec: BootSpec, running: bytes | None, running_cmdline: str | None,
                          forced: bool = False) -> bool:
    """True when the next stage will run on the kernel already running, so its bytes need not be
    fetched: the server's hint names this kernel's SHA-512 (`running`, from this image's measured
    kernel.sha512), its parameters are in effect and no kexec is forced: the same-kernel rule of
    cidboot.stage.switch_root.decide, checked on the hint instead of on downloaded bytes. A hint
    that lies only changes which kernel runs: it is this one, and it is what gets measured
    (docs/boot-chain.md, "Not fetching the running kernel")."""
    from cidboot.stage.switch_root import kernel_params

    if forced or running is None or spec.kernel_sha512 is None or running_cmdline is None:
        return False
    if not kernel_params(spec.cmdline) <= kernel_params(running_cmdline):
        return False
    return hmac.compare_digest(spec.kernel_sha512, running)


def reuses_running_runtime(spec: BootSpec, running_runtime: bytes | None, kernel_reused: bool) -> bool:
    """True when the script's first initrd is the runtime layer this image runs, so it need not be
    fetched: the server's hint (`#cidboot runtime-sha512=`) names the SHA-512 in this image's
    measured runtime.json (`running_runtime`), the script lists more initrds after it, and the
    next stage runs on this kernel (`kernel_reused`: reuses_running_kernel held), so the hand-over
    keeps the running runtime's files. A lying hint only changes what runs (this runtime), and
    that is what is measured (docs/boot-chain.md, "Not fetching the running runtime")."""
    if not kernel_reused or running_runtime is None or spec.runtime_sha512 is None or len(spec.initrds) < 2:
        return False
    return hmac.compare_digest(spec.runtime_sha512, running_runtime)


def fetch_boot(net: Network, *, boot_file: str | None = None, running: bytes | None = None,
               running_cmdline: str | None = None, forced: bool = False, running_runtime: bytes | None = None,
               **tftp_kw: object) -> Fetched:
    """Fetch the script the DHCP server named, then its kernel, initrds and boot config. The
    kernel is not fetched when reuses_running_kernel(spec, running, running_cmdline, forced); then
    neither is the first initrd when reuses_running_runtime(spec, running_runtime, True)
    (`running_runtime`: the SHA-512 in this image's runtime.json)."""
    server = net.lease.next_server
    name = boot_file or net.lease.boot_file
    if not name:
        raise NetbootError("the DHCP server named no boot file")
    if not name.endswith(".ipxe"):
        raise NetbootError(f"boot file {name!r} is not an iPXE script: the server does not know the firmware's "
                           f"user class {USER_CLASS.decode()!r}")
    t: dict[str, float] = {}
    srtt: dict[tuple[str, int], float] = {}  # round trip measured per server, seconds

    def get(what: str, url_or_path: str) -> bytes:
        host, port, path = tftp_url(url_or_path) if "://" in url_or_path else (server, 69, url_or_path)
        kw = dict(tftp_kw)
        if "timeout" not in kw and (host, port) in srtt:
            # the first timeout of a later file follows the round trip measured on earlier ones: under
            # loss a lost request then costs milliseconds, not the 0.3 s the first one allows
            kw["timeout"] = min(0.3, max(0.02, 4 * srtt[host, port]))
        stats: dict[str, int] = {}
        t0 = time.monotonic()
        data = tftp_get(host, path, port=port, stats=stats, **kw)  # type: ignore[arg-type]
        t[what] = t.get(what, 0.0) + time.monotonic() - t0
        if stats.get("srtt_us"):
            srtt[host, port] = stats["srtt_us"] / 1e6
        return data

    script = get("script", name)
    try:
        text = script.decode("utf-8")
    except UnicodeDecodeError:
        raise ScriptError(f"{name}: not UTF-8 text") from None
    spec = parse_script(text, ipxe_variables(net.mac, net.lease.ip, server))
    reuse = reuses_running_kernel(spec, running, running_cmdline, forced)
    kernel = None if reuse else get("kernel", spec.kernel)
    skip = reuses_running_runtime(spec, running_runtime, reuse)
    parts = [None if skip and i == 0 else get("initrd", u) for i, u in enumerate(spec.initrds)]
    initrd = b"".join(p for p in parts if p is not None)
    if spec.config_url is None:
        raise NetbootError("the kernel command line names no boot config (cidboot.config=tftp://...)")
    bootconfig = get("bootconfig", spec.config_url)
    sizes = tuple(None if p is None else len(p) for p in parts) if len(parts) > 1 else ()
    return Fetched(script, spec, kernel, initrd, bootconfig, t, running if reuse else None, sizes,
                   running_runtime if skip else None)
