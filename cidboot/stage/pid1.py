"""PID-1 duties shared by the three stages' /init (firmware, bootstrap, image agent).

There is no shell or busybox in the images, so Python itself is init: it mounts devtmpfs
first (CPython needs /dev/urandom at start-up and fails with "failed to get random numbers"
otherwise; /init runs with -I -S so nothing before this needs randomness), then proc and
sys; it reaps orphaned children (init inherits them); it loads kernel modules with
finit_module(2) in the order the image builder resolved from each module's `depends=`
(imagebuilder/kmod.py; /etc/cidboot/modules), since there is no modprobe; and on any fatal error it prints the reason to the
console and powers off, because a PID 1 that exits panics the kernel and hides the cause.
"""

from __future__ import annotations

import _signal  # signal's builtin core: the same handler, without signal.py's enum classes
import errno
import os
import sys

from cidboot.errors import CidbootError
from cidboot.stage import dccache, deferred

# Imports here are what every stage pays (three times a boot): os, sys and errno are loaded by the
# interpreter anyway. Not pathlib (re, fnmatch, urllib.parse, ipaddress), not signal (enum: the
# builtin _signal does the same here), not ctypes (only for a mount or a module load that is
# actually needed: cidboot.stage.syscalls imports it then). cidboot.stage.dccache (marshal, zlib: built
# in) loads the image's table of dataclass and namedtuple code before the stage imports anything.

MODULE_DIR = "/lib/modules"
MODULE_LIST = "/etc/cidboot/modules"
MOUNTS = (("devtmpfs", "/dev", "devtmpfs"), ("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs"))


class Pid1Error(CidbootError):
    """A PID-1 duty (mount, module load) failed."""


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); an already mounted target is fine (EBUSY)."""
    from cidboot.stage import syscalls

    os.makedirs(target, exist_ok=True)
    try:
        syscalls.mount(source, target, fstype, flags, data or None)
    except syscalls.SyscallError as e:
        if e.errno != errno.EBUSY:
            raise Pid1Error(f"mount {fstype} on {target}: {os.strerror(e.errno or 0)}") from None


def mount_basics() -> None:
    """devtmpfs first (Python needs /dev/urandom), then proc and sys; one already mounted there
    (another file system than the root's) is left as it is, without a mount(2) call."""
    for source, target, fstype in MOUNTS:
        if not os.path.ismount(target):
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
    from cidboot.stage import syscalls

    if reason:
        try:
            with open("/dev/console", "w") as con:
                con.write(f"\ncidboot: fatal: {reason}\n")
        except OSError:
            sys.stderr.write(f"\ncidboot: fatal: {reason}\n")
    os.sync()
    try:
        syscalls.reboot(syscalls.LINUX_REBOOT_CMD_RESTART if restart else syscalls.LINUX_REBOOT_CMD_POWER_OFF)
    except syscalls.SyscallError as e:
        raise Pid1Error(str(e)) from None


def finit_module(path: str | os.PathLike[str]) -> None:
    """Load one module; EEXIST (already loaded or built in) is fine."""
    from cidboot.stage import syscalls

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.finit_module(fd)
    except syscalls.SyscallError as e:
        if e.errno != errno.EEXIST:
            raise Pid1Error(f"finit_module {os.path.basename(path)}: {os.strerror(e.errno or 0)}") from None
    finally:
        os.close(fd)


def loaded_modules(proc_modules: str = "/proc/modules") -> set[str]:
    """Names of the modules the running kernel has loaded (none when /proc is not there)."""
    try:
        with open(proc_modules) as f:
            return {line.split(" ", 1)[0] for line in f if line.strip()}
    except OSError:
        return set()


def run_stage(module: str) -> None:
    """Entry of /init: PID-1 set-up, then `module`'s main(); power off on any fatal error.

    `module` is the stage's own entry (firmware.stage, bootstrap.stage.main, agent.device: the
    image builder's imagebuilder.build.ENTRY), imported and its main() called: not the
    package's __main__, whose CLI branch would have to ship too."""
    if os.getpid() != 1:
        raise Pid1Error("run_stage is the /init of a boot image and must run as PID 1")
    try:
        mount_basics()
        _signal.signal(_signal.SIGCHLD, lambda *_: reap())
        if os.path.isfile(MODULE_LIST):  # the image builder resolved depends= already: load in the listed order
            with open(MODULE_LIST) as f:
                names = f.read().split()
            running = loaded_modules()
            for n in names:
                if n not in running:  # after a same-kernel hand-over most are: the kernel would verify each signature again for EEXIST
                    finit_module(os.path.join(MODULE_DIR, f"{n}.ko"))
            print(f"cidboot: loaded {' '.join(names)}", file=sys.stderr, flush=True)
        deferred.install()  # stdlib modules the stages import but do not run at start (cidboot.stage.deferred)
        dccache.install()  # dataclass method code compiled at build time (cidboot.stage.dccache)
        stage = __import__(module, fromlist=["main"])
        if "importtime" in sys._xoptions:  # a start-up profile (cidboot_importtime=1): what the table saved
            print(f"cidboot: dataclass code: hits={dccache.stats['hits']} misses={dccache.stats['misses']}",
                  file=sys.stderr, flush=True)
        stage.main()
        power_off("stage exited")
    except SystemExit as e:
        power_off(f"stage exited with status {e.code}")
    except BaseException as e:  # PID 1 must never just die: report, then power off
        try:
            import traceback  # only on the way down: linecache, tokenize are not start-up's to pay

            traceback.print_exc()
        except BaseException:  # noqa: S110 -- power off regardless; its line below names the failure
            pass
        power_off(f"{type(e).__name__}: {e}")
