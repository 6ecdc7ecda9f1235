"""The few Linux system calls the stages make through libc, with their numbers per machine.

CPython's `os` has no reboot(2), finit_module(2), delete_module(2), kexec_file_load(2), mount(2)
or umount2(2), so the stages call them through ctypes. The numbers and magic constants live here once; callers name the call, this
module finds its number for the running machine (x86_64, aarch64) or says it cannot.

ctypes (and its libc) are imported at the first call, not with this module: every stage imports
it through pid1 and most calls are not needed after a same-kernel hand-over.
"""

from __future__ import annotations

import os

from cidboot.errors import CidbootError

SYSCALLS = {
    "reboot": {"x86_64": 169, "aarch64": 142},
    "finit_module": {"x86_64": 313, "aarch64": 273},
    "kexec_file_load": {"x86_64": 320, "aarch64": 294},
    "delete_module": {"x86_64": 176, "aarch64": 106},
}
LINUX_REBOOT_MAGIC1 = 0xFEE1DEAD
LINUX_REBOOT_MAGIC2 = 672274793
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
LINUX_REBOOT_CMD_RESTART = 0x01234567
LINUX_REBOOT_CMD_KEXEC = 0x45584543
MS_MOVE = 0x2000  # mount(2): move an existing mount (switch_root's `mount --move newroot /`)
MNT_DETACH = 0x2  # umount2(2): lazy unmount, detaches now even if something is still open
O_NONBLOCK = os.O_NONBLOCK  # delete_module(2): fail with EWOULDBLOCK instead of waiting for users


TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; typing is not imported at start
if TYPE_CHECKING:
    import ctypes


class SyscallError(CidbootError):
    """A system call failed or does not exist on this machine (the message has the errno's
    meaning; `errno` is the number, None when the call does not exist here)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library, loaded once. By its soname, not ctypes.util.find_library: that runs
    `ldconfig -p`, then looks for gcc and ld, in subprocesses, on every call; in a stage image
    none of them exists, so each call was failed fork+execs under emulation (and imported
    subprocess and shutil at start-up) only to fall back to this same name. Cached, so a stage
    switching roots still reaches libc after the old root's files are gone (switch_root)."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL("libc.so.6", use_errno=True)
    return _libc


def number(name: str) -> int:
    """The syscall number of `name` on the running machine."""
    machine = os.uname().machine
    table = SYSCALLS[name]
    if machine not in table:
        raise SyscallError(f"{name}: unsupported machine {machine}")
    return table[machine]


def reboot(cmd: int) -> None:
    """reboot(2) with the magic numbers; returns only by raising (the kernel refused)."""
    import ctypes

    libc().syscall(ctypes.c_long(number("reboot")), ctypes.c_uint(LINUX_REBOOT_MAGIC1),
                   ctypes.c_uint(LINUX_REBOOT_MAGIC2), ctypes.c_uint(cmd), None)
    err = ctypes.get_errno()
    raise SyscallError(f"reboot(2): {os.strerror(err)} (errno {err})", err)


def _errno_error(what: str) -> SyscallError:
    import ctypes

    err = ctypes.get_errno()
    return SyscallError(f"{what}: {os.strerror(err)} (errno {err})", err)


def mount(source: str, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    """mount(2) through libc; raises SyscallError with the errno's meaning."""
    import ctypes

    rc = libc().mount(source.encode(), target.encode(), fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                      data.encode() if data else None)
    if rc != 0:
        raise _errno_error(f"mount {source} on {target}")


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2) through libc; raises SyscallError with the errno's meaning."""
    import ctypes

    if libc().umount2(target.encode(), ctypes.c_int(flags)) != 0:
        raise _errno_error(f"umount {target}")


def delete_module(name: str, flags: int = O_NONBLOCK) -> None:
    """delete_module(2): unload a kernel module by name; raises SyscallError (ENOENT: not loaded)."""
    import ctypes

    rc = libc().syscall(ctypes.c_long(number("delete_module")), ctypes.c_char_p(name.encode()), ctypes.c_uint(flags))
    if rc != 0:
        raise _errno_error(f"delete_module {name}")


def finit_module(fd: int) -> None:
    """finit_module(2): load the kernel module open at `fd` (no parameters, no flags); raises
    SyscallError (EEXIST: loaded already or built in)."""
    import ctypes

    if libc().syscall(ctypes.c_long(number("finit_module")), ctypes.c_int(fd), ctypes.c_char_p(b""),
                      ctypes.c_int(0)) != 0:
        raise _errno_error("finit_module")
