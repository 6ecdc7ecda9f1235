"""Hand over to the next stage's kernel with kexec_file_load(2) + reboot(LINUX_REBOOT_CMD_KEXEC).

The stages have no files to point kexec at (everything was fetched into memory), so the kernel
and initrd go into memfds. kexec_file_load (not kexec_load) lets the running kernel parse and
place the bzImage itself, and is the variant a kernel with signature enforcement would check.

Split in two so the syscall can be tested without rebooting anything:

- `load(kernel, initrd, cmdline)`: validate, memfds, kexec_file_load; raises KexecError with the
  errno (e.g. ENOEXEC for a blob that is not a kernel, EPERM without CAP_SYS_BOOT);
- `kexec_boot(kernel, initrd, cmdline)`: refuses unless PID 1 (it would reboot the host), then
  load, sync and reboot into the loaded kernel; returns only by raising.

Before calling kexec_boot, zero your copies of the CDIs (bytearray): the next kernel's memory
is not guaranteed to be cleared.
"""

from __future__ import annotations

import ctypes
import os

from cidboot.errors import CidbootError
from cidboot.stage import syscalls

KEXEC_FILE_NO_INITRAMFS = 0x4
COMMAND_LINE_SIZE = 2048  # x86_64 and arm64; includes the terminating NUL


class KexecError(CidbootError):
    """The next kernel could not be loaded or started (the message has the errno's meaning)."""


def check_args(kernel: bytes, initrd: bytes, cmdline: str) -> bytes:
    """Validate the arguments; returns the command line as the NUL-terminated bytes the syscall takes."""
    if not kernel:
        raise KexecError("kexec: empty kernel")
    if "\0" in cmdline:
        raise KexecError("kexec: command line contains a NUL byte")
    raw = cmdline.encode() + b"\0"
    if len(raw) > COMMAND_LINE_SIZE:
        raise KexecError(f"kexec: command line is {len(raw)} bytes with its NUL, the kernel takes {COMMAND_LINE_SIZE}")
    return raw


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def load(kernel: bytes, initrd: bytes, cmdline: str) -> None:
    """kexec_file_load the kernel (+ initrd, may be empty) and command line. Does not reboot."""
    raw = check_args(kernel, initrd, cmdline)
    try:
        nr = syscalls.number("kexec_file_load")
    except syscalls.SyscallError as e:
        raise KexecError(f"kexec: {e}") from None
    kfd = _memfd("kexec-kernel", kernel)
    ifd = _memfd("kexec-initrd", initrd) if initrd else -1
    try:
        flags = 0 if initrd else KEXEC_FILE_NO_INITRAMFS
        rc = syscalls.libc().syscall(ctypes.c_long(nr), ctypes.c_int(kfd), ctypes.c_int(ifd), ctypes.c_ulong(len(raw)),
                             ctypes.c_char_p(raw), ctypes.c_ulong(flags))
        if rc != 0:
            err = ctypes.get_errno()
            raise KexecError(f"kexec_file_load: {os.strerror(err)} (errno {err})")
    finally:
        os.close(kfd)
        if ifd >= 0:
            os.close(ifd)


def reboot_into_loaded_kernel() -> None:
    """reboot(LINUX_REBOOT_CMD_KEXEC); only returns (by raising) if the kernel refused."""
    if os.getpid() != 1:
        raise KexecError("refusing to kexec: not PID 1")
    try:
        syscalls.reboot(syscalls.LINUX_REBOOT_CMD_KEXEC)
    except syscalls.SyscallError as e:
        raise KexecError(f"reboot(LINUX_REBOOT_CMD_KEXEC): {e}") from None


def kexec_boot(kernel: bytes, initrd: bytes, cmdline: str) -> None:
    """Boot `kernel` with `initrd` and `cmdline` now. Only as PID 1 (the stage's /init): anywhere
    else this would replace the running host kernel, so it refuses before touching anything."""
    if os.getpid() != 1:
        raise KexecError("refusing to kexec: not PID 1 (this would replace the host's kernel)")
    load(kernel, initrd, cmdline)
    os.sync()
    reboot_into_loaded_kernel()
