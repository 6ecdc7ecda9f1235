"""cidboot.stage.kexec: argument checks and the PID-1 refusal, without ever rebooting the host."""

from __future__ import annotations

import os

import pytest

from cidboot.stage import kexec
from cidboot.stage.kexec import KexecError


def test_argument_errors() -> None:
    with pytest.raises(KexecError, match="empty kernel"):
        kexec.load(b"", b"", "console=ttyS0")
    with pytest.raises(KexecError, match="NUL"):
        kexec.load(b"k", b"", "a\0b")
    with pytest.raises(KexecError, match="command line is 2049 bytes"):
        kexec.load(b"k", b"", "x" * 2048)
    assert kexec.check_args(b"k", b"", "quiet") == b"quiet\0"


def test_refuses_unless_pid1() -> None:
    assert os.getpid() != 1
    with pytest.raises(KexecError, match="not PID 1"):
        kexec.kexec_boot(b"not a kernel", b"", "quiet")
    with pytest.raises(KexecError, match="not PID 1"):
        kexec.reboot_into_loaded_kernel()


def test_syscall_rejects_a_blob_that_is_not_a_kernel() -> None:
    """The real syscall: a non-kernel is refused (ENOEXEC as root, EPERM without CAP_SYS_BOOT),
    with the errno in the message; nothing is loaded, so nothing can be rebooted into."""
    with pytest.raises(KexecError, match=r"kexec_file_load: .*\(errno \d+\)"):
        kexec.load(b"\x7fELF not a bzImage" * 100, b"initrd", "quiet")
