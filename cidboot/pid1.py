"""PID-1 duties shared by the three stages' /init (firmware, bootstrap, image agent).

There is no shell or busybox in the images, so Python itself is init: it mounts devtmpfs
first (CPython needs /dev/urandom at start-up and fails with "failed to get random numbers"
otherwise; /init runs with -I -S so nothing before this needs randomness), then proc and
sys; it reaps orphaned children (init inherits them); it loads kernel modules with
finit_module(2) in dependency order read from each module's `.modinfo` (`depends=`) with
pyelftools, since there is no modprobe; and on any fatal error it prints the reason to the
console and powers off, because a PID 1 that exits panics the kernel and hides the cause.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path

from cidboot.errors import CidbootError, NotFoundError

LINUX_REBOOT_MAGIC1 = 0xFEE1DEAD
LINUX_REBOOT_MAGIC2 = 672274793
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
LINUX_REBOOT_CMD_RESTART = 0x01234567
SYS_FINIT_MODULE = {"x86_64": 313, "aarch64": 273}
MODULE_DIR = "/lib/modules"
MODULE_LIST = "/etc/cidboot/modules"
MOUNTS = (("devtmpfs", "/dev", "devtmpfs"), ("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs"))


class Pid1Error(CidbootError):
    """A PID-1 duty (mount, module load) failed."""


class ModuleNotFound(NotFoundError):
    """A kernel module (or one it depends on) is not in the image."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); an already mounted target is fine (EBUSY)."""
    os.makedirs(target, exist_ok=True)
    rc = _libc().mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                       data.encode() or None)
    if rc != 0:
        err = ctypes.get_errno()
        if err != errno.EBUSY:
            raise Pid1Error(f"mount {fstype} on {target}: {os.strerror(err)}")


def mount_basics() -> None:
    """devtmpfs first (Python needs /dev/urandom), then proc and sys."""
    for source, target, fstype in MOUNTS:
        mount(source, target, fstype)


def reap() -> list[tuple[int, int]]:
    """Collect every exited child (orphans are re-parented to PID 1); returns (pid, status)."""
    out: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append((pid, status))


def power_off(reason: str = "", *, restart: bool = False) -> None:
    """Print the reason on the console, sync, and power off (or restart) with reboot(2).

    Only ever as PID 1 (the stage's /init inside a guest or board): anywhere else this would
    power off the host, so it refuses.
    """
    if os.getpid() != 1:
        raise Pid1Error(f"refusing to power off: not PID 1 (reason was: {reason or 'none'})")
    if reason:
        try:
            with open("/dev/console", "w") as con:
                con.write(f"\ncidboot: fatal: {reason}\n")
        except OSError:
            sys.stderr.write(f"\ncidboot: fatal: {reason}\n")
    os.sync()
    cmd = LINUX_REBOOT_CMD_RESTART if restart else LINUX_REBOOT_CMD_POWER_OFF
    libc = _libc()
    libc.syscall(169 if os.uname().machine == "x86_64" else 142, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
                 ctypes.c_uint(cmd), None)
    raise Pid1Error(f"reboot(2) failed: {os.strerror(ctypes.get_errno())}")


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The `.modinfo` section of a .ko: key -> values (NUL-separated key=value strings)."""
    import io

    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        sec = ELFFile(io.BytesIO(data)).get_section_by_name(".modinfo")
    except ELFError as e:
        raise Pid1Error(f"not a kernel module: {e}") from None
    out: dict[str, list[str]] = {}
    if sec is None:
        return out
    for item in sec.data().split(b"\0"):
        k, sep, v = item.decode(errors="replace").partition("=")
        if sep:
            out.setdefault(k, []).append(v)
    return out


def module_index(root: str | Path) -> dict[str, Path]:
    """Module name -> .ko path under a modules directory ('-' and '_' are the same name)."""
    return {p.name.removesuffix(".ko").replace("-", "_"): p for p in sorted(Path(root).rglob("*.ko"))}


def load_order(names: Iterable[str], index: dict[str, Path]) -> list[str]:
    """Dependencies first (post-order over `depends=`), each module once."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        n = name.replace("-", "_")
        if n in seen:
            return
        if n not in index:
            via = f" (needed by {' -> '.join(chain)})" if chain else ""
            raise ModuleNotFound(f"kernel module {n} not in the image{via}")
        seen.add(n)
        deps = modinfo(index[n].read_bytes()).get("depends", [""])[0]
        for d in sorted(x for x in deps.split(",") if x):
            visit(d, (*chain, n))
        order.append(n)

    for name in names:
        visit(name, ())
    return order


def finit_module(path: Path) -> None:
    """Load one module; EEXIST (already loaded or built in) is fine."""
    libc = _libc()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        rc = libc.syscall(SYS_FINIT_MODULE[os.uname().machine], fd, b"", 0)
    finally:
        os.close(fd)
    if rc != 0 and ctypes.get_errno() != errno.EEXIST:
        raise Pid1Error(f"finit_module {path.name}: {os.strerror(ctypes.get_errno())}")


def load_modules(names: Iterable[str], root: str | Path = MODULE_DIR) -> list[str]:
    index = module_index(root)
    order = load_order(names, index)
    for n in order:
        finit_module(index[n])
    return order


def run_stage(module: str) -> None:
    """Entry of /init: PID-1 set-up, then `module`'s main(); power off on any fatal error."""
    if os.getpid() != 1:
        raise Pid1Error("run_stage is the /init of a boot image and must run as PID 1")
    try:
        mount_basics()
        signal.signal(signal.SIGCHLD, lambda *_: reap())
        listed = Path(MODULE_LIST)
        if listed.is_file():  # the image builder resolved depends= already: load in the listed order
            names = [n for n in listed.read_text().split() if n]
            for n in names:
                finit_module(Path(MODULE_DIR, f"{n}.ko"))
            print(f"cidboot: loaded {' '.join(names)}", file=sys.stderr, flush=True)
        import runpy

        runpy.run_module(module, run_name="__main__", alter_sys=True)
        power_off("stage exited")
    except SystemExit as e:
        power_off(f"stage exited with status {e.code}")
    except BaseException as e:  # PID 1 must never just die: report, then power off
        traceback.print_exc()
        power_off(f"{type(e).__name__}: {e}")
