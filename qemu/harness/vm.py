"""One QEMU guest: started paused, powered on over QMP, its serial console timestamped.

The guest starts with `-S` and the harness sends QMP `cont`: that instant is power-on, so every
console line's timestamp ("[  3.214] ...") is seconds since power-on, which is what the boot
benchmark and report need. QMP (python-qemu-qmp, asyncio) runs on a private event loop in a
thread so tests and the CLI can stay synchronous. Guests run inside the boot network's
namespace, on a tap of its bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from cidboot.errors import CidbootError
from qemu.harness.netns import BootNetwork

QEMU = "qemu-system-x86_64"
ARCHES = ("x86_64", "arm64")
# arm64: QEMU's `virt` machine (Debian's qemu-system-arm) with AAVMF, Debian's qemu-efi-aarch64
# (EDK2's ArmVirtQemu: the same network stack as OVMF, VirtioNetDxe + PXE + HTTP Boot)
QEMU_ARM64 = "qemu-system-aarch64"
AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
# `-cpu max` under TCG with the cheap QEMU-defined pointer-authentication algorithm: the
# architected one (QARMA) costs a large share of TCG's time in a pointer-authenticating kernel
ARM64_TCG_CPU = "max,pauth-impdef=on"
# x86_64 under TCG: QEMU's default model with RDRAND, which TCG emulates and every x86 board since
# ~2012 (and `-cpu host` under KVM) has. Without it the kernel's RNG is not ready when the first
# stage's Python reads /dev/urandom for its hash seed, and Linux 6.1 then runs its jitter-entropy
# loop: ~1.2 s of the emulated CPU at every power-on (docs/qemu-harness.md, "Boot benchmark")
X86_TCG_CPU = "qemu64,+rdrand"
# firmware="uefi": Debian's ovmf (x86_64, no Secure Boot enforcement); the code is read-only, the
# variable store a per-guest copy of the template (a guest may write boot entries into it)
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
FIRMWARES = ("bios", "uefi")
# OVMF's fw_cfg knobs (OvmfPkg/RUNTIME_CONFIG.md): with PXE off, the NIC's boot options left are
# UEFI HTTP Boot's, so `uefi_http=True` makes OVMF boot by HTTP as a machine set to HTTP Boot does
OVMF_NO_PXE = {"opt/org.tianocore/IPv4PXESupport": "no", "opt/org.tianocore/IPv6PXESupport": "no"}


class GuestError(CidbootError):
    """QEMU could not start, or a wait ran out (the message says which and why)."""


@dataclass
class GuestSpec:
    name: str
    kernel: Path | None = None  # None with network_boot: the NIC's iPXE ROM boots it
    initrd: Path | None = None
    append: str = "console=ttyS0"
    fw_cfg: dict[str, Path] = field(default_factory=dict)
    tap: str | None = None
    mac: str = "52:54:00:12:34:56"
    network_boot: bool = False
    disk: Path | None = None  # raw file as virtio-blk (the bootstrap's NVRAM)
    memory_mib: int = 1024
    accel: str = "tcg"
    cpu: str | None = None  # default: "host" under KVM (what the accel probe tries), X86_TCG_CPU / ARM64_TCG_CPU under TCG
    # A guest reset ends QEMU instead of rebooting: our stages reset only when they die (panic=-1),
    # and a dead guest must end the wait rather than loop. kexec is not a reset (the kernel jumps
    # to the next one in place), so hand-overs are unaffected; tests/e2e/test_firmware_qemu.py kexecs
    # under -no-reboot.
    no_reboot: bool = True
    # "bios": QEMU's SeaBIOS (with the NIC's iPXE ROM for network boot); "uefi": OVMF, whose own
    # network stack (VirtioNetDxe, PXE, HTTP Boot) boots the NIC: no iPXE option ROM is loaded.
    firmware: str = "bios"
    uefi_vars: Path | None = None  # the writable OVMF_VARS copy (Guest.start makes one in its state dir)
    uefi_http: bool = False  # UEFI network boot by HTTP Boot only (OVMF's PXE switched off through fw_cfg)
    # A user-mode NIC instead of a tap: QEMU's own DHCP and TFTP (`tftp=DIR,bootfile=NAME`), no
    # namespace needed; for firmware boots that need nothing but a file.
    user_tftp: Path | None = None
    bootfile: str | None = None
    # A TPM 2.0: the control socket of an swtpm started with `--ctrl type=unixio,path=...` (QEMU's
    # emulator backend passes it the data channel); a TIS device, which OVMF/AAVMF find and measure
    # into: `tpm-tis` (ISA, x86_64) or `tpm-tis-device` (MMIO on arm64 `virt`, which describes it in
    # ACPI as MSFT0101 and in its device tree as "tcg,tpm-tis-mmio")
    tpm: Path | None = None
    arch: str = "x86_64"  # one of ARCHES; arm64 is UEFI only (AAVMF on `-machine virt`)
    # TCG only, for measuring: `-icount shift=N`: the guest's clock counts executed instructions
    # (2**N ns each), so in-guest timings (e.g. `-X importtime`) do not move with the host's load
    icount: int | None = None

    def firmware_files(self) -> tuple[Path, Path, str]:
        """(code, variables template, Debian package) of the UEFI firmware for this arch."""
        if self.arch == "arm64":
            return AAVMF_CODE, AAVMF_VARS, "qemu-efi-aarch64"
        return OVMF_CODE, OVMF_VARS, "ovmf"

    def argv(self, qmp_socket: Path) -> list[str]:
        if self.arch not in ARCHES:
            raise GuestError(f"{self.name}: arch {self.arch!r} is not one of {', '.join(ARCHES)}")
        arm64 = self.arch == "arm64"
        if arm64 and (self.firmware != "uefi" or self.kernel is not None):
            raise GuestError(f"{self.name}: arm64 guests boot AAVMF (firmware uefi) from the network or a disk: "
                             "no -kernel, no BIOS")
        a = [QEMU_ARM64 if arm64 else QEMU, "-machine", "virt" if arm64 else "q35", "-accel", self.accel,
             "-m", str(self.memory_mib), "-smp", "1",
             "-nographic", "-serial", "stdio", "-monitor", "none", "-S",
             "-qmp", f"unix:{qmp_socket},server=on,wait=off", "-name", self.name]
        if self.no_reboot:
            a.append("-no-reboot")
        if self.icount is not None:
            a += ["-icount", f"shift={self.icount},sleep=on"]
        if self.firmware not in FIRMWARES:
            raise GuestError(f"{self.name}: firmware {self.firmware!r} is not one of {', '.join(FIRMWARES)}")
        uefi = self.firmware == "uefi"
        if uefi:
            if self.uefi_vars is None:
                raise GuestError(f"{self.name}: firmware uefi needs its OVMF_VARS copy (uefi_vars)")
            a += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={self.firmware_files()[0]}",
                  "-drive", f"if=pflash,format=raw,unit=1,file={self.uefi_vars}"]
        cpu = self.cpu or ("host" if self.accel == "kvm" else ARM64_TCG_CPU if arm64 else X86_TCG_CPU)
        if cpu:
            a += ["-cpu", cpu]
        if self.kernel is not None:
            a += ["-kernel", str(self.kernel), "-append", self.append]
            if self.initrd is not None:
                a += ["-initrd", str(self.initrd)]
        for name, path in sorted(self.fw_cfg.items()):
            a += ["-fw_cfg", f"name={name},file={path}"]
        if uefi and self.uefi_http:
            for name, value in sorted(OVMF_NO_PXE.items()):
                a += ["-fw_cfg", f"name={name},string={value}"]
        # under UEFI the NIC is the first boot entry (bootindex) and carries no iPXE ROM (romfile=)
        nic_opts = f",mac={self.mac}"
        if uefi:
            nic_opts += ",romfile=" + (",bootindex=0" if self.network_boot else "")
        if self.tap and self.user_tftp:
            raise GuestError(f"{self.name}: a tap NIC and a user-mode TFTP NIC are exclusive")
        if self.tap:
            a += ["-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
                  "-device", f"virtio-net-pci,netdev=n0{nic_opts}"]
        elif self.user_tftp:
            user = f"user,id=n0,tftp={self.user_tftp}" + (f",bootfile={self.bootfile}" if self.bootfile else "")
            a += ["-netdev", user, "-device", f"virtio-net-pci,netdev=n0{nic_opts}"]
        else:
            a += ["-nic", "none"]
        if self.network_boot and not uefi:
            a += ["-boot", "n"]
        if self.disk is not None:
            a += ["-drive", f"file={self.disk},format=raw,if=virtio"]
        if self.tpm is not None:
            a += ["-chardev", f"socket,id=chrtpm,path={self.tpm}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                  "-device", f"{'tpm-tis-device' if arm64 else 'tpm-tis'},tpmdev=tpm0"]
        return a


@dataclass
class ConsoleLine:
    t: float  # seconds since power-on
    text: str


class Console:
    """Collects a guest's serial output into timestamped lines, a log file and a raw copy."""

    def __init__(self, log: Path, raw: Path) -> None:
        self.lines: list[ConsoleLine] = []
        self.t0: float | None = None
        self._log, self._raw = open(log, "w"), open(raw, "wb")
        self._partial = b""
        self._cond = threading.Condition()

    def now(self) -> float:
        return 0.0 if self.t0 is None else time.monotonic() - self.t0

    def feed(self, chunk: bytes) -> None:
        self._raw.write(chunk)
        self._raw.flush()
        data = self._partial + chunk.replace(b"\r", b"")
        *done, self._partial = data.split(b"\n")
        with self._cond:
            for raw_line in done:
                line = ConsoleLine(round(self.now(), 3), raw_line.decode(errors="replace"))
                self.lines.append(line)
                self._log.write(f"[{line.t:8.3f}] {line.text}\n")
            self._log.flush()
            self._cond.notify_all()

    def close(self) -> None:
        if self._partial:
            self.feed(b"\n")
        self._log.close()
        self._raw.close()

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float, *, start: int = 0,
                 alive: Any = None) -> tuple[ConsoleLine, re.Match[str]]:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i].text)
                    if m:
                        return self.lines[i], m
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestError(f"no console line matching {rx.pattern!r} within {timeout:.0f} s")
                if alive is not None and not alive():
                    raise GuestError(f"guest stopped before a console line matched {rx.pattern!r}")
                self._cond.wait(min(left, 0.5))

    def text(self) -> str:
        with self._cond:
            return "\n".join(f"[{ln.t:8.3f}] {ln.text}" for ln in self.lines)


class _Loop:
    """A private asyncio loop in a daemon thread, for the asyncio-only QMP client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Guest:
    """A running guest. Use as a context manager: the QEMU process never outlives it."""

    @classmethod
    def create(cls, name: str, state_dir: Path, *, kernel: Path | None = None, initrd: Path | None = None,
               append: str = "console=ttyS0", fw_cfg: dict[str, Path] | None = None,
               nic: tuple[str, str] | None = None, boot_from_network: bool = False, disk: Path | None = None,
               memory_mib: int = 1024, accel: str = "tcg", cpu: str | None = None, no_reboot: bool = True,
               net: BootNetwork | None = None, firmware: str = "bios", user_tftp: Path | None = None,
               bootfile: str | None = None, tpm: Path | None = None, arch: str = "x86_64",
               icount: int | None = None) -> Guest:
        """Keyword form: `nic` is (tap ifname, MAC); with `net` QEMU runs inside that namespace;
        `firmware` "bios" or "uefi" (OVMF); `user_tftp` + `bootfile`: a user-mode NIC whose
        DHCP offers `bootfile` from QEMU's TFTP server serving that directory; `tpm`: an swtpm's
        control socket, exposed as a tpm-tis TPM 2.0; `arch` "arm64": AAVMF on `-machine virt`;
        `icount`: GuestSpec.icount."""
        spec = GuestSpec(name, kernel=kernel, initrd=initrd, append=append, fw_cfg=dict(fw_cfg or {}),
                         tap=nic[0] if nic else None, mac=nic[1] if nic else GuestSpec.mac,
                         network_boot=boot_from_network, disk=disk, memory_mib=memory_mib, accel=accel, cpu=cpu,
                         no_reboot=no_reboot, firmware=firmware, user_tftp=user_tftp, bootfile=bootfile, tpm=tpm,
                         arch=arch, icount=icount)
        return cls(spec, state_dir, net)

    def __init__(self, spec: GuestSpec, state_dir: Path, net: BootNetwork | None = None) -> None:
        self.spec, self.dir, self.net = spec, state_dir, net
        state_dir.mkdir(parents=True, exist_ok=True)
        self.qmp_socket = state_dir / "qmp.sock"
        self.console = Console(state_dir / "console.log", state_dir / "console.raw")
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._loop: _Loop | None = None
        self._qmp: QMPClient | None = None
        self._reader: threading.Thread | None = None
        self._events_task: asyncio.Task[None] | None = None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> Guest:
        """Start QEMU paused, connect QMP, then power on (`cont`)."""
        self.qmp_socket.unlink(missing_ok=True)
        if self.spec.firmware == "uefi" and self.spec.uefi_vars is None:
            code, template, package = self.spec.firmware_files()
            if not code.is_file() or not template.is_file():
                raise GuestError(f"{self.spec.name}: {code} / {template} missing: install Debian's {package} package")
            self.spec.uefi_vars = self.dir / template.name
            shutil.copyfile(template, self.spec.uefi_vars)  # fresh variables: every boot starts from power-on state
        argv = self.spec.argv(self.qmp_socket)
        (self.dir / "qemu.argv.json").write_text(json.dumps(argv) + "\n")
        cmd: Sequence[str] = self.net.cmd(argv) if self.net else argv
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=open(self.dir / "qemu.stderr", "wb"))
        self._reader = threading.Thread(target=self._read_console, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 20
        while not self.qmp_socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise GuestError(f"{self.spec.name}: QEMU did not start: "
                                 f"{(self.dir / 'qemu.stderr').read_text(errors='replace')[-800:]}")
            time.sleep(0.05)
        self._loop = _Loop()
        self._qmp = QMPClient(self.spec.name)
        self._loop.run(self._connect())
        self.console.t0 = time.monotonic()
        self.qmp("cont")
        return self

    async def _connect(self) -> None:
        assert self._qmp is not None
        await self._qmp.connect(str(self.qmp_socket))
        self._events_task = asyncio.get_running_loop().create_task(self._collect_events())

    async def _disconnect(self) -> None:
        if self._events_task is not None:
            self._events_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._events_task
        if self._qmp is not None:
            with contextlib.suppress(Exception):  # best effort on a dead socket
                await self._qmp.disconnect()

    async def _collect_events(self) -> None:
        assert self._qmp is not None
        with self._qmp.listener() as listener:
            async for ev in listener:
                raw = ev.get("data")
                data: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
                self.events.append((self.console.now(), str(ev["event"]), data))

    def _read_console(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self.console.feed(chunk)

    def qmp(self, command: str, **args: Any) -> Any:
        if self._qmp is None or self._loop is None:
            raise GuestError(f"{self.spec.name}: not started")
        return self._loop.run(self._qmp.execute(command, args or None))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def power_on(self) -> Guest:
        """Same as start(): QEMU is started paused and `cont` is the power button."""
        return self.start()

    def system_reset(self) -> None:
        """The reset button (with -no-reboot QEMU then exits, as for a guest-initiated reset)."""
        self.qmp("system_reset")

    reset = system_reset

    def system_powerdown(self) -> None:
        """An ACPI power-button press: the guest decides what to do (a POWERDOWN event is emitted)."""
        self.qmp("system_powerdown")

    def quit(self) -> None:
        """Pull the plug through QMP; QEMU exits at once."""
        with contextlib.suppress(Exception):  # the reply may be lost as QEMU goes
            self.qmp("quit")

    def kill(self) -> None:
        """Pull the plug from outside: SIGKILL to QEMU, for when QMP no longer answers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def stop(self, timeout: float = 10) -> int | None:
        """Power off: QMP `quit`, then kill if QEMU does not go."""
        if self.proc is None:
            return None
        if self.running:
            self.quit()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait()
        if self._reader:
            self._reader.join(5)
        if self._loop:
            with contextlib.suppress(Exception):
                self._loop.run(self._disconnect(), timeout=5)
            self._loop.stop()
        self.console.close()
        return self.proc.returncode

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- waiting ------------------------------------------------------------------------------
    def wait_for_console(self, pattern: str, timeout: float, start: int = 0) -> tuple[ConsoleLine, re.Match[str]]:
        try:
            return self.console.wait_for(pattern, timeout, start=start, alive=lambda: self.running)
        except GuestError as e:
            raise GuestError(f"{self.spec.name}: {e}; console tail:\n{self.console.text()[-2500:]}") from None

    def wait_for_exit(self, timeout: float) -> int:
        """Wait for the guest to power off (QEMU exits: -no-reboot turns resets into exits too)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"{self.spec.name}: still running after {timeout:.0f} s; console tail:\n"
                             f"{self.console.text()[-2500:]}") from None

    def wait_for_event(self, name: str, timeout: float) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, ev, data in list(self.events):
                if ev == name:
                    return t, data
            if not self.running:
                break
            time.sleep(0.1)
        raise GuestError(f"{self.spec.name}: no QMP event {name} within {timeout:.0f} s")
