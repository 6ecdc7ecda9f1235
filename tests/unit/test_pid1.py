"""PID-1 duties that can be checked on a host: refusing to act unless PID 1, the syscall table;
and the image builder's module reader rejecting what is not a kernel module."""

from __future__ import annotations

import pytest

from cidboot.stage import pid1, syscalls
from imagebuilder import kmod


def test_not_a_module() -> None:
    with pytest.raises(kmod.NotAModule, match="not a kernel module"):
        kmod.modinfo(b"hello")


def test_refuses_to_act_outside_pid1() -> None:
    """Called on a host (not as /init), nothing is mounted and nothing powers off."""
    with pytest.raises(pid1.Pid1Error, match="not PID 1"):
        pid1.power_off("test")
    with pytest.raises(pid1.Pid1Error, match="must run as PID 1"):
        pid1.run_stage("agent")


def test_syscall_numbers_are_known_for_both_machines_and_refused_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in ("reboot", "finit_module", "kexec_file_load"):
        assert set(syscalls.SYSCALLS[name]) == {"x86_64", "aarch64"}
    real = os.uname()
    riscv = os.uname_result((real.sysname, real.nodename, real.release, real.version, "riscv64"))
    monkeypatch.setattr(os, "uname", lambda: riscv)
    with pytest.raises(syscalls.SyscallError, match="finit_module: unsupported machine riscv64"):
        syscalls.number("finit_module")


def test_modules_already_loaded_are_read_from_proc_modules(tmp_path: object) -> None:
    """run_stage skips finit_module for these (after a same-kernel hand-over the NIC's are loaded)."""
    from pathlib import Path

    p = Path(str(tmp_path)) / "modules"
    p.write_text("virtio_net 61440 0 - Live 0x0000000000000000\nnet_failover 20480 1 virtio_net, Live 0x0\n\n")
    assert pid1.loaded_modules(str(p)) == {"virtio_net", "net_failover"}
    assert pid1.loaded_modules(str(p.with_name("absent"))) == set()


def test_mount_basics_mounts_only_what_is_not_mounted_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a same-kernel hand-over a mount point may still hold its file system: no mount(2)
    (and no ctypes) for it; the others are mounted, devtmpfs first."""
    import os

    done: list[str] = []
    monkeypatch.setattr(os.path, "ismount", lambda p: p == "/proc")
    monkeypatch.setattr(pid1, "mount", lambda source, target, fstype: done.append(target))
    pid1.mount_basics()
    assert done == ["/dev", "/sys"]


def test_a_failed_syscall_carries_its_errno() -> None:
    """pid1 tells EBUSY/EEXIST (fine) from real failures by the number, not the message."""
    import errno

    e = syscalls.SyscallError("mount x on /y: Device or resource busy (errno 16)", errno.EBUSY)
    assert e.errno == errno.EBUSY and "busy" in str(e)
    assert syscalls.SyscallError("no such call").errno is None
